// acd_attention on the CPU: streaming (online-softmax) attention over key tiles plus the
// text -> target-image attention mass of SPEC §7, without any N x N buffer.
//
// Pass 1, one task per (b, h, block of QB query rows): out rows = softmax(q kᵀ scale) v, and for
// the text query rows also the log-sum-exp over the image keys only (lse_img).
// Pass 2, one task per (b, h, block of KB image keys): recomputes the text x image logits and
// accumulates p = w_v exp(s - lse_img[v]) over the text rows into a per-(b, h) buffer, which is
// then reduced over heads in a fixed order. Every output element is written by exactly one task
// and every sum runs in a fixed order, so results do not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

namespace rcgrpo {
namespace {

constexpr int64_t QB = 64;  // query rows per task (pass 1) / per tile (pass 2)
constexpr int64_t KB = 64;  // keys per tile

struct AttnArgs {
    const float* q;
    const float* k;
    const float* v;
    const float* weights;  // [B, text_len] or nullptr
    float* out;            // [B, H, N, D]
    float* lse_img;        // [B, H, text_len]
    double* head_mass;     // [B, H, image_len]
    int64_t B, H, N, D, text_len, image_len;
    float scale;
};

/// Floats of scratch one thread uses: scaled q rows, transposed key tile, logits, accumulators
/// and the four per-row softmax statistics (rounded up to keep per-thread slices 64-byte apart).
int64_t scratch_floats(int64_t D) {
    const int64_t n = QB * D + D * KB + QB * KB + QB * D + 4 * QB;
    return ceil_div(n, 16) * 16;
}

/// qs[i][d] = src[i][d] * scale for nr rows of length D.
RC_INLINE void load_scaled_rows(const float* src, int64_t nr, int64_t D, float scale, float* qs) {
    const int64_t n = nr * D;
    for (int64_t i = 0; i < n; ++i) qs[i] = src[i] * scale;
}

/// kT[d][j] = keys[j][d] for j < nk and 0 for nk <= j < KB; kT is [D][KB].
RC_INLINE void load_keys_transposed(const float* keys, int64_t nk, int64_t D, float* kT) {
    for (int64_t j = 0; j < nk; ++j) {
        const float* row = keys + j * D;
        for (int64_t d = 0; d < D; ++d) kT[d * KB + j] = row[d];
    }
    if (nk < KB) {
        for (int64_t d = 0; d < D; ++d) {
            for (int64_t j = nk; j < KB; ++j) kT[d * KB + j] = 0.0f;
        }
    }
}

// Register-tiled matmuls of the two attention products:
//   score_rows: s[r][j] = Σ_d qs[r][d] kT[d][j] for R rows and all KB keys (s is [R][KB]);
//   pv_rows:    acc[r][d] += Σ_{j < nk} p[r][j] v[j][d] for R rows (p is [R][KB], v is [nk][D]).
// Both keep an R x 16 accumulator tile in registers, load contiguous rows of kT / v, and sum every
// output over d (resp. j) in one fixed order whichever tile computes it.
#if defined(__GNUC__)
// GCC/Clang generic vectors, lowered to the clone's ISA (2 x SSE or 1 x AVX per vector); plain
// loops here get vectorized along the wrong axis.
typedef float vec8 __attribute__((vector_size(32)));

#define RC_LOAD8(dst, ptr) std::memcpy(&(dst), (ptr), sizeof(vec8))
#define RC_STORE8(ptr, src) std::memcpy((ptr), &(src), sizeof(vec8))

template <int R>
RC_INLINE void score_rows(const float* qs, const float* kT, int64_t D, float* s) {
    for (int64_t jb = 0; jb < KB; jb += 16) {
        vec8 c0[R], c1[R];
        for (int r = 0; r < R; ++r) c0[r] = c1[r] = vec8{};
        for (int64_t d = 0; d < D; ++d) {
            vec8 k0, k1;
            RC_LOAD8(k0, kT + d * KB + jb);
            RC_LOAD8(k1, kT + d * KB + jb + 8);
            for (int r = 0; r < R; ++r) {
                const float a = qs[r * D + d];
                c0[r] += a * k0;
                c1[r] += a * k1;
            }
        }
        for (int r = 0; r < R; ++r) {
            RC_STORE8(s + r * KB + jb, c0[r]);
            RC_STORE8(s + r * KB + jb + 8, c1[r]);
        }
    }
}

template <int R>
RC_INLINE void pv_rows(const float* p, const float* v, int64_t nk, int64_t D, float* acc) {
    int64_t db = 0;
    for (; db + 16 <= D; db += 16) {
        vec8 c0[R], c1[R];
        for (int r = 0; r < R; ++r) {
            RC_LOAD8(c0[r], acc + r * D + db);
            RC_LOAD8(c1[r], acc + r * D + db + 8);
        }
        for (int64_t j = 0; j < nk; ++j) {
            vec8 v0, v1;
            RC_LOAD8(v0, v + j * D + db);
            RC_LOAD8(v1, v + j * D + db + 8);
            for (int r = 0; r < R; ++r) {
                const float a = p[r * KB + j];
                c0[r] += a * v0;
                c1[r] += a * v1;
            }
        }
        for (int r = 0; r < R; ++r) {
            RC_STORE8(acc + r * D + db, c0[r]);
            RC_STORE8(acc + r * D + db + 8, c1[r]);
        }
    }
    for (; db + 8 <= D; db += 8) {
        vec8 c0[R];
        for (int r = 0; r < R; ++r) RC_LOAD8(c0[r], acc + r * D + db);
        for (int64_t j = 0; j < nk; ++j) {
            vec8 v0;
            RC_LOAD8(v0, v + j * D + db);
            for (int r = 0; r < R; ++r) c0[r] += p[r * KB + j] * v0;
        }
        for (int r = 0; r < R; ++r) RC_STORE8(acc + r * D + db, c0[r]);
    }
    for (; db < D; ++db) {  // the last D % 8 columns
        for (int r = 0; r < R; ++r) {
            float c = acc[r * D + db];
            for (int64_t j = 0; j < nk; ++j) c += p[r * KB + j] * v[j * D + db];
            acc[r * D + db] = c;
        }
    }
}

#undef RC_LOAD8
#undef RC_STORE8
#else
template <int R>
RC_INLINE void score_rows(const float* qs, const float* kT, int64_t D, float* s) {
    for (int r = 0; r < R; ++r) {
        float* row = s + r * KB;
        for (int64_t j = 0; j < KB; ++j) row[j] = 0.0f;
        for (int64_t d = 0; d < D; ++d) {
            const float a = qs[r * D + d];
            const float* kr = kT + d * KB;
            for (int64_t j = 0; j < KB; ++j) row[j] += a * kr[j];
        }
    }
}

template <int R>
RC_INLINE void pv_rows(const float* p, const float* v, int64_t nk, int64_t D, float* acc) {
    for (int r = 0; r < R; ++r) {
        float* row = acc + r * D;
        for (int64_t j = 0; j < nk; ++j) {
            const float a = p[r * KB + j];
            for (int64_t d = 0; d < D; ++d) row[d] += a * v[j * D + d];
        }
    }
}
#endif

RC_INLINE void tile_scores(const float* qs, int64_t nq, const float* kT, int64_t D, float* s) {
    int64_t i = 0;
    for (; i + 4 <= nq; i += 4) score_rows<4>(qs + i * D, kT, D, s + i * KB);
    for (; i < nq; ++i) score_rows<1>(qs + i * D, kT, D, s + i * KB);
}

/// acc[i] += Σ_{j < nk} p[i][j] v[j] for i < nq.
RC_INLINE void tile_pv(const float* p, int64_t nq, const float* v, int64_t nk, int64_t D, float* acc) {
    int64_t i = 0;
    for (; i + 4 <= nq; i += 4) pv_rows<4>(p + i * KB, v, nk, D, acc + i * D);
    for (; i < nq; ++i) pv_rows<1>(p + i * KB, v, nk, D, acc + i * D);
}

/// exp(x) for the softmax arguments x <= 0 (any x <= 88 works): Cody-Waite reduction and the
/// Cephes minimax polynomial, about 1 ulp; exactly 0 below -87 (and for -inf). Plain arithmetic,
/// so loops calling it vectorize (std::exp would be a scalar libm call per element).
RC_INLINE float exp_approx(float x) {
    const float xc = std::min(std::max(x, -87.0f), 88.0f);
    const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const float n = (xc * 1.44269504088896341f + round_magic) - round_magic;
    float r = xc - n * 0.693359375f;  // ln 2 split in a high part exact in float ...
    r = r - n * -2.12194440e-4f;      // ... and the low rest
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return x < -87.0f ? 0.0f : p * scale;
}

constexpr int64_t LANES = 8;  // independent partial max / sum accumulators

/// max of x[lo:hi].
RC_INLINE float range_max(const float* x, int64_t lo, int64_t hi) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    float lane[LANES];
    for (int64_t l = 0; l < LANES; ++l) lane[l] = neg_inf;
    int64_t j = lo;
    for (; j + LANES <= hi; j += LANES) {
        for (int64_t l = 0; l < LANES; ++l) lane[l] = x[j + l] > lane[l] ? x[j + l] : lane[l];
    }
    for (int64_t l = 0; j < hi; ++j, ++l) lane[l] = x[j] > lane[l] ? x[j] : lane[l];
    float m = lane[0];
    for (int64_t l = 1; l < LANES; ++l) m = lane[l] > m ? lane[l] : m;
    return m;
}

/// Σ_{j in [lo, hi)} exp(x[j] - m); with `store`, also x[j] = exp(x[j] - m).
template <bool store>
RC_INLINE float range_exp_sum(float* x, int64_t lo, int64_t hi, float m) {
    float lane[LANES];
    for (int64_t l = 0; l < LANES; ++l) lane[l] = 0.0f;
    int64_t j = lo;
    for (; j + LANES <= hi; j += LANES) {
        for (int64_t l = 0; l < LANES; ++l) {
            const float p = exp_approx(x[j + l] - m);
            if (store) x[j + l] = p;
            lane[l] += p;
        }
    }
    for (int64_t l = 0; j < hi; ++j, ++l) {
        const float p = exp_approx(x[j] - m);
        if (store) x[j] = p;
        lane[l] += p;
    }
    float sum = 0.0f;
    for (int64_t l = 0; l < LANES; ++l) sum += lane[l];
    return sum;
}

/// Pass 1: rows [r0, r0 + QB) of head (b, h).
RC_CLONES void attention_task(const AttnArgs& a, int64_t task, float* scratch) {
    const int64_t D = a.D, N = a.N;
    const int64_t n_qblocks = ceil_div(N, QB);
    const int64_t bh = task / n_qblocks;
    const int64_t r0 = (task % n_qblocks) * QB;
    const int64_t nq = std::min(QB, N - r0);
    const int64_t base = bh * N * D;
    const float* qh = a.q + base;
    const float* kh = a.k + base;
    const float* vh = a.v + base;

    float* qs = scratch;
    float* kT = qs + QB * D;
    float* s = kT + D * KB;
    float* acc = s + QB * KB;
    float* m = acc + QB * D;  // running max over all keys
    float* l = m + QB;        // running sum of exp(s - m)
    float* mi = l + QB;       // same two over the image keys (text rows only)
    float* li = mi + QB;

    const float neg_inf = -std::numeric_limits<float>::infinity();
    load_scaled_rows(qh + r0 * D, nq, D, a.scale, qs);
    for (int64_t i = 0; i < nq * D; ++i) acc[i] = 0.0f;
    for (int64_t i = 0; i < QB; ++i) {
        m[i] = mi[i] = neg_inf;
        l[i] = li[i] = 0.0f;
    }
    const int64_t img_lo = a.text_len, img_hi = a.text_len + a.image_len;
    const int64_t n_text = std::clamp<int64_t>(a.text_len - r0, 0, nq);

    for (int64_t k0 = 0; k0 < N; k0 += KB) {
        const int64_t nk = std::min(KB, N - k0);
        load_keys_transposed(kh + k0 * D, nk, D, kT);
        tile_scores(qs, nq, kT, D, s);
        if (nk < KB) {  // padding keys of the last tile get probability 0
            for (int64_t i = 0; i < nq; ++i) {
                for (int64_t j = nk; j < KB; ++j) s[i * KB + j] = neg_inf;
            }
        }
        const int64_t j0 = std::clamp<int64_t>(img_lo - k0, 0, nk);
        const int64_t j1 = std::clamp<int64_t>(img_hi - k0, 0, nk);
        for (int64_t i = 0; i < nq; ++i) {
            float* srow = s + i * KB;
            if (i < n_text && j0 < j1) {  // image-only log-sum-exp of a text query row
                const float m_new = std::max(mi[i], range_max(srow, j0, j1));
                const float sum = range_exp_sum<false>(srow, j0, j1, m_new);
                li[i] = li[i] * std::exp(mi[i] - m_new) + sum;
                mi[i] = m_new;
            }
            const float m_new = std::max(m[i], range_max(srow, 0, KB));
            const float alpha = std::exp(m[i] - m_new);
            l[i] = l[i] * alpha + range_exp_sum<true>(srow, 0, KB, m_new);
            m[i] = m_new;
            if (alpha != 1.0f) {
                float* ai = acc + i * D;
                for (int64_t d = 0; d < D; ++d) ai[d] *= alpha;
            }
        }
        tile_pv(s, nq, vh + k0 * D, nk, D, acc);
    }

    float* out = a.out + base + r0 * D;
    for (int64_t i = 0; i < nq; ++i) {
        const float inv = 1.0f / l[i];
        for (int64_t d = 0; d < D; ++d) out[i * D + d] = acc[i * D + d] * inv;
    }
    for (int64_t i = 0; i < n_text; ++i) a.lse_img[bh * a.text_len + r0 + i] = mi[i] + std::log(li[i]);
}

/// Pass 2: image keys [u0, u0 + KB) of head (b, h), summed over all text rows in order.
RC_CLONES void mass_task(const AttnArgs& a, int64_t task, float* scratch, double* buf) {
    const int64_t D = a.D, N = a.N, T = a.text_len;
    const int64_t n_ublocks = ceil_div(a.image_len, KB);
    const int64_t bh = task / n_ublocks;
    const int64_t b = bh / a.H;
    const int64_t u0 = (task % n_ublocks) * KB;
    const int64_t nu = std::min(KB, a.image_len - u0);
    const int64_t base = bh * N * D;

    float* qs = scratch;
    float* kT = qs + QB * D;
    float* s = kT + D * KB;
    load_keys_transposed(a.k + base + (T + u0) * D, nu, D, kT);
    for (int64_t j = 0; j < KB; ++j) buf[j] = 0.0;
    const float* lse = a.lse_img + bh * T;
    const float* w = a.weights ? a.weights + b * T : nullptr;
    for (int64_t r0 = 0; r0 < T; r0 += QB) {
        const int64_t nr = std::min(QB, T - r0);
        load_scaled_rows(a.q + base + r0 * D, nr, D, a.scale, qs);
        tile_scores(qs, nr, kT, D, s);
        for (int64_t i = 0; i < nr; ++i) {
            const float c = lse[r0 + i];
            const float wi = w ? w[r0 + i] : 1.0f;
            const float* srow = s + i * KB;
            for (int64_t j = 0; j < nu; ++j) buf[j] += static_cast<double>(wi * exp_approx(srow[j] - c));
        }
    }
    double* hm = a.head_mass + bh * a.image_len + u0;
    for (int64_t j = 0; j < nu; ++j) hm[j] = buf[j];
}

}  // namespace

void acd_attention_cpu(const float* q, const float* k, const float* v, const float* weights,
                       float* out, float* mass, int64_t B, int64_t H, int64_t N, int64_t D,
                       int64_t text_len, int64_t image_len, float scale, int num_threads) {
    const int nt = std::max(1, num_threads);
    std::vector<float> lse(static_cast<size_t>(B * H * text_len));
    std::vector<double> head_mass(static_cast<size_t>(B * H * image_len));
    const int64_t per_thread = scratch_floats(D);
    std::vector<float> scratch(static_cast<size_t>(nt * per_thread));
    std::vector<double> mass_buf(static_cast<size_t>(nt * KB));
    const AttnArgs args{q, k, v, weights, out, lse.data(), head_mass.data(),
                        B, H, N, D, text_len, image_len, scale};

    const int64_t n_pass1 = B * H * ceil_div(N, QB);
    const int64_t n_pass2 = B * H * ceil_div(image_len, KB);
#pragma omp parallel num_threads(nt)
    {
        float* mine = scratch.data() + thread_index() * per_thread;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_pass1; ++t) attention_task(args, t, mine);
        // implicit barrier: every lse_img is written before pass 2 reads it
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_pass2; ++t) {
            mass_task(args, t, mine, mass_buf.data() + thread_index() * KB);
        }
    }
    // Mean over heads, in head order.
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t u = 0; u < image_len; ++u) {
            double total = 0.0;
            for (int64_t h = 0; h < H; ++h) total += head_mass[(b * H + h) * image_len + u];
            mass[b * image_len + u] = static_cast<float>(total / static_cast<double>(H));
        }
    }
}

}  // namespace rcgrpo
