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
#include <limits>
#include <vector>

#include "common.h"

namespace rcgrpo {
namespace {

constexpr int64_t QB = 32;  // query rows per task (pass 1) / per tile (pass 2)
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

/// s[i][j] = Σ_d qs[i][d] kT[d][j] for i < nq and all KB columns (s is [QB][KB]).
/// Outer-product form: the inner loop runs over contiguous keys, so it vectorizes without
/// reassociating a reduction; every logit sums its D products in the same order.
RC_INLINE void tile_scores(const float* qs, int64_t nq, const float* kT, int64_t D, float* s) {
    int64_t i = 0;
    for (; i + 2 <= nq; i += 2) {  // two rows share each load of a key row
        float* s0 = s + i * KB;
        float* s1 = s0 + KB;
        const float* q0 = qs + i * D;
        const float* q1 = q0 + D;
        for (int64_t j = 0; j < KB; ++j) s0[j] = s1[j] = 0.0f;
        for (int64_t d = 0; d < D; ++d) {
            const float a0 = q0[d];
            const float a1 = q1[d];
            const float* kr = kT + d * KB;
            for (int64_t j = 0; j < KB; ++j) {
                s0[j] += a0 * kr[j];
                s1[j] += a1 * kr[j];
            }
        }
    }
    for (; i < nq; ++i) {
        float* s0 = s + i * KB;
        const float* q0 = qs + i * D;
        for (int64_t j = 0; j < KB; ++j) s0[j] = 0.0f;
        for (int64_t d = 0; d < D; ++d) {
            const float a0 = q0[d];
            const float* kr = kT + d * KB;
            for (int64_t j = 0; j < KB; ++j) s0[j] += a0 * kr[j];
        }
    }
}

RC_INLINE float max_of(const float* x, int64_t lo, int64_t hi) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = lo; j < hi; ++j) m = x[j] > m ? x[j] : m;
    return m;
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
        const int64_t j0 = std::clamp<int64_t>(img_lo - k0, 0, nk);
        const int64_t j1 = std::clamp<int64_t>(img_hi - k0, 0, nk);
        for (int64_t i = 0; i < nq; ++i) {
            float* srow = s + i * KB;
            if (i < n_text && j0 < j1) {  // image-only log-sum-exp of a text query row
                const float m_new = std::max(mi[i], max_of(srow, j0, j1));
                float sum = 0.0f;
                for (int64_t j = j0; j < j1; ++j) sum += std::exp(srow[j] - m_new);
                li[i] = li[i] * std::exp(mi[i] - m_new) + sum;
                mi[i] = m_new;
            }
            const float m_new = std::max(m[i], max_of(srow, 0, nk));
            const float alpha = std::exp(m[i] - m_new);
            float sum = 0.0f;
            for (int64_t j = 0; j < nk; ++j) {
                const float p = std::exp(srow[j] - m_new);
                srow[j] = p;
                sum += p;
            }
            l[i] = l[i] * alpha + sum;
            m[i] = m_new;
            float* ai = acc + i * D;
            if (alpha != 1.0f) {
                for (int64_t d = 0; d < D; ++d) ai[d] *= alpha;
            }
            int64_t j = 0;
            for (; j + 2 <= nk; j += 2) {  // two value rows per pass over the accumulator
                const float p0 = srow[j], p1 = srow[j + 1];
                const float* v0 = vh + (k0 + j) * D;
                const float* v1 = v0 + D;
                for (int64_t d = 0; d < D; ++d) ai[d] += p0 * v0[d] + p1 * v1[d];
            }
            for (; j < nk; ++j) {
                const float p0 = srow[j];
                const float* v0 = vh + (k0 + j) * D;
                for (int64_t d = 0; d < D; ++d) ai[d] += p0 * v0[d];
            }
        }
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
            for (int64_t j = 0; j < nu; ++j) buf[j] += static_cast<double>(wi * std::exp(srow[j] - c));
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
