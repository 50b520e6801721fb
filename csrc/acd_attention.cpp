// acd_attention on the CPU: streaming (online-softmax) attention over key tiles plus the
// text -> target-image attention mass of SPEC §7, without any N x N buffer.
//
// Pass 0, one task per (b, h, tile of KB keys): packs scale * k transposed into [D][KB] tiles
// (zero-padded), so that the logit micro-kernel reads contiguous key vectors and the raw q rows.
// Pass 1, one task per (b, h, block of QB query rows): out rows = softmax(q kᵀ scale) v, and for
// the text query rows also the log-sum-exp over the image keys only (lse_img).
// Pass 2, one task per (b, h, block of KB image keys): recomputes the text x image logits and
// accumulates p = w_v exp(s - lse_img[v]) over the text rows into a per-(b, h) buffer, which is
// then reduced over heads in a fixed order. Every output element is written by exactly one task
// and every sum runs in a fixed order, so results do not depend on the number of threads.
//
// q, k, v and out are read and written through their B, H, N strides (unit stride in D), so the
// sequence-major layout diffusers produces ([B, N, H, D].transpose(1, 2)) needs no copy; the
// kernels see rows of D floats with a row stride, the same arithmetic in the same order as for a
// dense tensor, so both layouts give bit-identical results.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "common.h"

namespace rcgrpo {
namespace {

constexpr int64_t QB = 64;  // query rows per task (pass 1) / per tile (pass 2)
constexpr int64_t KB = 128; // keys per tile

struct AttnArgs {
    const float* q;
    const float* k;
    const float* v;
    const float* weights;  // [B, text_len] or nullptr
    const float* kT;       // [B, H, ceil(N / KB), D, KB]: scale * k, packed by pass 0
    float* out;            // [B, H, N, D]
    float* lse_img;        // [B, H, text_len]
    double* head_mass;     // [B, H, image_len]
    Strides4 qs, ks, vs, os;
    int64_t B, H, N, D, text_len, image_len;
    float scale;

    /// Offset of row 0 of head bh (= b * H + h) in a tensor of strides `st`.
    int64_t head_offset(const Strides4& st, int64_t bh) const { return (bh / H) * st.b + (bh % H) * st.h; }
};

/// Floats of scratch one thread uses: a transposed key tile (pass 2), logits, accumulators and
/// the four per-row softmax statistics (rounded up to keep per-thread slices 64-byte apart).
int64_t scratch_floats(int64_t D) {
    const int64_t n = D * KB + QB * KB + QB * D + 4 * QB;
    return ceil_div(n, 16) * 16;
}

/// kT[d][j] = keys[j][d] * scale for j < nk and 0 for nk <= j < KB; kT is [D][KB]; key rows are
/// `ldk` floats apart.
inline void pack_keys(const float* keys, int64_t ldk, int64_t nk, int64_t D, float scale, float* kT) {
    for (int64_t j = 0; j < nk; ++j) {
        const float* row = keys + j * ldk;
        for (int64_t d = 0; d < D; ++d) kT[d * KB + j] = row[d] * scale;
    }
    for (int64_t d = 0; d < D; ++d) {
        for (int64_t j = nk; j < KB; ++j) kT[d * KB + j] = 0.0f;
    }
}

// ---- vector primitives ----------------------------------------------------------------------
// The kernels are templates over a vector type V: GCC/Clang generic vectors of 4, 8 or 16 floats,
// lowered to the ISA of the function they are inlined into (see the dispatch at the end), or
// plain float where vector extensions are missing.
#if defined(__GNUC__)
// The helpers taking vectors by value are always inlined, so their out-of-line ABI never matters.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float vf4 __attribute__((vector_size(16)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf16 __attribute__((vector_size(64)));
#endif

template <class V>
constexpr int64_t lanes() {
    return static_cast<int64_t>(sizeof(V) / sizeof(float));
}
template <class V>
RC_INLINE V load(const float* p) {
    V x;
    std::memcpy(&x, p, sizeof(V));
    return x;
}
template <class V>
RC_INLINE void store(float* p, const V& x) {
    std::memcpy(p, &x, sizeof(V));
}
template <class V>
RC_INLINE V splat(float x) {
    return V{} + x;
}
template <class V>
RC_INLINE V vmax(const V& a, const V& b) {
    return a > b ? a : b;
}
template <class V>
RC_INLINE V vmin(const V& a, const V& b) {
    return a < b ? a : b;
}
/// Sum / max of the lanes: halves combined pairwise down to one lane, a fixed order.
template <class V>
struct Half;
#if defined(__GNUC__)
typedef float vf2 __attribute__((vector_size(8)));
template <>
struct Half<vf16> { using type = vf8; };
template <>
struct Half<vf8> { using type = vf4; };
template <>
struct Half<vf4> { using type = vf2; };
template <>
struct Half<vf2> { using type = float; };
#endif
template <class V, class Op>
RC_INLINE float reduce_lanes(const V& x, Op op) {
    if constexpr (std::is_same_v<V, float>) {
        return x;
    } else {
        using H = typename Half<V>::type;
        H lo, hi;
        std::memcpy(&lo, &x, sizeof(H));
        std::memcpy(&hi, reinterpret_cast<const char*>(&x) + sizeof(H), sizeof(H));
        return reduce_lanes(op(lo, hi), op);
    }
}
template <class V>
RC_INLINE float hsum(const V& x) {
    return reduce_lanes(x, [](const auto& a, const auto& b) { return a + b; });
}
template <class V>
RC_INLINE float hmax(const V& x) {
    return reduce_lanes(x, [](const auto& a, const auto& b) { return vmax(a, b); });
}
/// {base, base + 1, ...} as floats.
template <class V>
RC_INLINE V iota(float base) {
    V x = splat<V>(base);
    if constexpr (!std::is_same_v<V, float>) {
        for (int64_t l = 0; l < lanes<V>(); ++l) x[l] += static_cast<float>(l);
    }
    return x;
}

/// exp(x) for the softmax arguments x <= 0 (any x <= 88 works): Cody-Waite reduction and the
/// Cephes minimax polynomial, about 1 ulp; exactly 0 below -87 (and for -inf).
template <class V>
RC_INLINE V exp_approx(const V& x) {
    const V xc = vmin(vmax(x, splat<V>(-87.0f)), splat<V>(88.0f));
    const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const V n = (xc * 1.44269504088896341f + round_magic) - round_magic;
    V r = xc - n * 0.693359375f;  // ln 2 split in a high part exact in float ...
    r = r - n * -2.12194440e-4f;  // ... and the low rest
    V p = splat<V>(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    V two_n;  // 2^n, n in [-126, 127]
    if constexpr (std::is_same_v<V, float>) {
        const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
        std::memcpy(&two_n, &bits, sizeof(two_n));
    } else {
        using VI = decltype(x < x);  // the int32 vector of as many lanes
        const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
        std::memcpy(&two_n, &bits, sizeof(two_n));
    }
    return x < splat<V>(-87.0f) ? V{} : p * two_n;
}

// ---- register-tiled matmuls -----------------------------------------------------------------
// An R x C tile of accumulators (R rows, C vectors of columns) stays in registers over the whole
// reduction; each step loads C vectors and broadcasts R scalars. Every output element is summed
// over d (resp. j) in one fixed order whichever tile shape computes it.

/// Vectors of columns per register tile: 4 x 16 lanes, 2 x 8, 2 x 4, 4 x 1 (all divide KB).
template <class V>
constexpr int score_cols() {
    return lanes<V>() == 8 || lanes<V>() == 4 ? 2 : 4;
}

/// s[r][jb + c] = Σ_d q[r][d] kT[d][jb + c] for r < R, c < C * lanes (q rows of length D, `ldq`
/// floats apart).
template <class V, int R, int C>
RC_INLINE void score_tile(const float* q, int64_t ldq, const float* kT, int64_t D, int64_t jb, float* s) {
    constexpr int64_t W = lanes<V>();
    V c[R][C];
    for (int r = 0; r < R; ++r) {
        for (int t = 0; t < C; ++t) c[r][t] = V{};
    }
    for (int64_t d = 0; d < D; ++d) {
        V kv[C];
        for (int t = 0; t < C; ++t) kv[t] = load<V>(kT + d * KB + jb + t * W);
        for (int r = 0; r < R; ++r) {
            const float a = q[r * ldq + d];
            for (int t = 0; t < C; ++t) c[r][t] += a * kv[t];
        }
    }
    for (int r = 0; r < R; ++r) {
        for (int t = 0; t < C; ++t) store(s + r * KB + jb + t * W, c[r][t]);
    }
}

/// s[i][j] = Σ_d q[i][d] kT[d][j] for i < nq and j < ncols (ncols a multiple of the tile width).
template <class V, int R>
RC_INLINE void tile_scores(const float* q, int64_t ldq, int64_t nq, const float* kT, int64_t D,
                           int64_t ncols, float* s) {
    constexpr int C = score_cols<V>();
    constexpr int64_t CW = C * lanes<V>();
    int64_t i = 0;
    for (; i + R <= nq; i += R) {
        for (int64_t jb = 0; jb < ncols; jb += CW) {
            score_tile<V, R, C>(q + i * ldq, ldq, kT, D, jb, s + i * KB);
        }
    }
    for (; i < nq; ++i) {
        for (int64_t jb = 0; jb < ncols; jb += CW) {
            score_tile<V, 1, C>(q + i * ldq, ldq, kT, D, jb, s + i * KB);
        }
    }
}

/// acc[r][db + c] += Σ_{j < nk} p[r][j] v[j][db + c] for r < R, c < C * lanes (v rows `ldv` apart).
template <class V, int R, int C>
RC_INLINE void pv_tile(const float* p, const float* v, int64_t ldv, int64_t nk, int64_t D, int64_t db,
                       float* acc) {
    constexpr int64_t W = lanes<V>();
    V c[R][C];
    for (int r = 0; r < R; ++r) {
        for (int t = 0; t < C; ++t) c[r][t] = load<V>(acc + r * D + db + t * W);
    }
    for (int64_t j = 0; j < nk; ++j) {
        V vv[C];
        for (int t = 0; t < C; ++t) vv[t] = load<V>(v + j * ldv + db + t * W);
        for (int r = 0; r < R; ++r) {
            const float a = p[r * KB + j];
            for (int t = 0; t < C; ++t) c[r][t] += a * vv[t];
        }
    }
    for (int r = 0; r < R; ++r) {
        for (int t = 0; t < C; ++t) store(acc + r * D + db + t * W, c[r][t]);
    }
}

/// acc[r] += Σ_{j < nk} p[r][j] v[j] for R rows: wide column blocks, single vectors, then the
/// last D % lanes columns one by one.
template <class V, int R>
RC_INLINE void pv_rows(const float* p, const float* v, int64_t ldv, int64_t nk, int64_t D, float* acc) {
    constexpr int C = score_cols<V>();
    constexpr int64_t W = lanes<V>();
    int64_t db = 0;
    for (; db + C * W <= D; db += C * W) pv_tile<V, R, C>(p, v, ldv, nk, D, db, acc);
    for (; db + W <= D; db += W) pv_tile<V, R, 1>(p, v, ldv, nk, D, db, acc);
    for (; db < D; ++db) {
        for (int r = 0; r < R; ++r) {
            float c = acc[r * D + db];
            for (int64_t j = 0; j < nk; ++j) c += p[r * KB + j] * v[j * ldv + db];
            acc[r * D + db] = c;
        }
    }
}

template <class V, int R>
RC_INLINE void tile_pv(const float* p, int64_t nq, const float* v, int64_t ldv, int64_t nk, int64_t D,
                       float* acc) {
    constexpr int C = score_cols<V>();
    // Heads narrower than one wide column block take C times as many rows per tile instead, so
    // that the tile still has R * C independent accumulators.
    constexpr int RN = R * C;
    int64_t i = 0;
    if (D < C * lanes<V>()) {
        for (; i + RN <= nq; i += RN) pv_rows<V, RN>(p + i * KB, v, ldv, nk, D, acc + i * D);
    }
    for (; i + R <= nq; i += R) pv_rows<V, R>(p + i * KB, v, ldv, nk, D, acc + i * D);
    for (; i < nq; ++i) pv_rows<V, 1>(p + i * KB, v, ldv, nk, D, acc + i * D);
}

// ---- the passes -----------------------------------------------------------------------------

/// Pass 0: key tile kt of head (b, h) into the packed buffer.
void pack_task(const AttnArgs& a, int64_t task) {
    const int64_t n_ktiles = ceil_div(a.N, KB);
    const int64_t bh = task / n_ktiles, kt = task % n_ktiles;
    const int64_t k0 = kt * KB;
    pack_keys(a.k + a.head_offset(a.ks, bh) + k0 * a.ks.n, a.ks.n, std::min(KB, a.N - k0), a.D, a.scale,
              const_cast<float*>(a.kT) + task * a.D * KB);
}

/// Pass 1: rows [r0, r0 + QB) of head (b, h).
template <class V, int R>
RC_INLINE void attention_task(const AttnArgs& a, int64_t task, float* scratch) {
    constexpr int64_t W = lanes<V>();
    constexpr int64_t CW = score_cols<V>() * W;
    const int64_t D = a.D, N = a.N;
    const int64_t n_qblocks = ceil_div(N, QB);
    const int64_t n_ktiles = ceil_div(N, KB);
    const int64_t bh = task / n_qblocks;
    const int64_t r0 = (task % n_qblocks) * QB;
    const int64_t nq = std::min(QB, N - r0);
    const int64_t ldq = a.qs.n, ldv = a.vs.n, ldo = a.os.n;
    const float* qh = a.q + a.head_offset(a.qs, bh) + r0 * ldq;
    const float* vh = a.v + a.head_offset(a.vs, bh);
    const float* kTh = a.kT + bh * n_ktiles * D * KB;

    float* s = scratch + D * KB;
    float* acc = s + QB * KB;
    float* m = acc + QB * D;  // running max over all keys
    float* l = m + QB;        // running sum of exp(s - m)
    float* mi = l + QB;       // same two over the image keys (text rows only)
    float* li = mi + QB;

    const float neg_inf = -std::numeric_limits<float>::infinity();
    std::fill(acc, acc + nq * D, 0.0f);
    std::fill(m, m + QB, neg_inf);
    std::fill(mi, mi + QB, neg_inf);
    std::fill(l, l + QB, 0.0f);
    std::fill(li, li + QB, 0.0f);
    const int64_t img_lo = a.text_len, img_hi = a.text_len + a.image_len;
    const int64_t n_text = std::clamp<int64_t>(a.text_len - r0, 0, nq);

    for (int64_t kt = 0; kt < n_ktiles; ++kt) {
        const int64_t k0 = kt * KB;
        const int64_t nk = std::min(KB, N - k0);
        const int64_t nv = ceil_div(nk, W);  // vectors covering the real keys of a row
        tile_scores<V, R>(qh, ldq, nq, kTh + kt * D * KB, D, ceil_div(nk, CW) * CW, s);
        const int64_t j0 = std::clamp<int64_t>(img_lo - k0, 0, nk);
        const int64_t j1 = std::clamp<int64_t>(img_hi - k0, 0, nk);
        for (int64_t i = 0; i < nq; ++i) {
            float* srow = s + i * KB;
            for (int64_t j = nk; j < nv * W; ++j) srow[j] = neg_inf;  // padding keys: p = 0
            if (i < n_text && j0 < j1) {  // image-only log-sum-exp of a text query row
                const V lo = splat<V>(static_cast<float>(j0)), hi = splat<V>(static_cast<float>(j1));
                V mx = splat<V>(neg_inf);
                for (int64_t t = j0 / W; t * W < j1; ++t) {
                    const V idx = iota<V>(static_cast<float>(t * W));
                    const V x = load<V>(srow + t * W);
                    mx = vmax(mx, (idx >= lo) & (idx < hi) ? x : splat<V>(neg_inf));
                }
                const float m_new = std::max(mi[i], hmax(mx));
                V sum{};
                for (int64_t t = j0 / W; t * W < j1; ++t) {
                    const V idx = iota<V>(static_cast<float>(t * W));
                    const V e = exp_approx(load<V>(srow + t * W) - m_new);
                    sum += (idx >= lo) & (idx < hi) ? e : V{};
                }
                li[i] = li[i] * std::exp(mi[i] - m_new) + hsum(sum);
                mi[i] = m_new;
            }
            V mx = splat<V>(neg_inf);
            for (int64_t t = 0; t < nv; ++t) mx = vmax(mx, load<V>(srow + t * W));
            const float m_new = std::max(m[i], hmax(mx));
            const float alpha = std::exp(m[i] - m_new);
            V sum{};
            for (int64_t t = 0; t < nv; ++t) {
                const V e = exp_approx(load<V>(srow + t * W) - m_new);
                store(srow + t * W, e);
                sum += e;
            }
            l[i] = l[i] * alpha + hsum(sum);
            m[i] = m_new;
            if (alpha != 1.0f) {
                float* ai = acc + i * D;
                for (int64_t d = 0; d < D; ++d) ai[d] *= alpha;
            }
        }
        tile_pv<V, R>(s, nq, vh + k0 * ldv, ldv, nk, D, acc);
    }

    float* out = a.out + a.head_offset(a.os, bh) + r0 * ldo;
    for (int64_t i = 0; i < nq; ++i) {
        const float inv = 1.0f / l[i];
        for (int64_t d = 0; d < D; ++d) out[i * ldo + d] = acc[i * D + d] * inv;
    }
    for (int64_t i = 0; i < n_text; ++i) a.lse_img[bh * a.text_len + r0 + i] = mi[i] + std::log(li[i]);
}

/// Pass 2: image keys [u0, u0 + KB) of head (b, h), summed over all text rows in order.
template <class V, int R>
RC_INLINE void mass_task(const AttnArgs& a, int64_t task, float* scratch, double* buf) {
    constexpr int64_t W = lanes<V>();
    constexpr int64_t CW = score_cols<V>() * W;
    const int64_t D = a.D, T = a.text_len;
    const int64_t n_ublocks = ceil_div(a.image_len, KB);
    const int64_t bh = task / n_ublocks;
    const int64_t b = bh / a.H;
    const int64_t u0 = (task % n_ublocks) * KB;
    const int64_t nu = std::min(KB, a.image_len - u0);
    const int64_t ldq = a.qs.n, ldk = a.ks.n;
    const float* qh = a.q + a.head_offset(a.qs, bh);

    float* kT = scratch;
    float* s = kT + D * KB;
    // The same scale * k values as pass 1, so the logits match those of lse_img bit for bit.
    pack_keys(a.k + a.head_offset(a.ks, bh) + (T + u0) * ldk, ldk, nu, D, a.scale, kT);
    std::fill(buf, buf + KB, 0.0);
    const float* lse = a.lse_img + bh * T;
    const float* w = a.weights ? a.weights + b * T : nullptr;
    const int64_t nv = ceil_div(nu, W);
    for (int64_t r0 = 0; r0 < T; r0 += QB) {
        const int64_t nr = std::min(QB, T - r0);
        tile_scores<V, R>(qh + r0 * ldq, ldq, nr, kT, D, ceil_div(nu, CW) * CW, s);
        for (int64_t i = 0; i < nr; ++i) {
            const float c = lse[r0 + i];
            const float wi = w ? w[r0 + i] : 1.0f;
            float* srow = s + i * KB;
            for (int64_t t = 0; t < nv; ++t) {
                store(srow + t * W, wi * exp_approx(load<V>(srow + t * W) - c));
            }
            for (int64_t j = 0; j < nu; ++j) buf[j] += static_cast<double>(srow[j]);
        }
    }
    double* hm = a.head_mass + bh * a.image_len + u0;
    for (int64_t j = 0; j < nu; ++j) hm[j] = buf[j];
}

// ---- ISA dispatch ---------------------------------------------------------------------------
// setup.py builds for the baseline target; the task bodies are instantiated once per ISA level
// with the matching vector width (x86-64-v4: AVX-512, 16 lanes; v3: AVX2+FMA, 8 lanes; baseline:
// 4 lanes), inlined into a wrapper compiled for that ISA, and picked once by `selected_isa()`
// (CPU features capped by RCGRPO_CPU_ISA, see cpu_isa.cpp). target_clones cannot be used here: it
// compiles one body, so one vector width.
using AttentionFn = void (*)(const AttnArgs&, int64_t, float*);
using MassFn = void (*)(const AttnArgs&, int64_t, float*, double*);
struct TaskFns {
    AttentionFn attention;
    MassFn mass;
};

#if defined(__GNUC__)
using BaseVec = vf4;
#else
using BaseVec = float;
#endif
void attention_base(const AttnArgs& a, int64_t t, float* s) { attention_task<BaseVec, 4>(a, t, s); }
void mass_base(const AttnArgs& a, int64_t t, float* s, double* buf) { mass_task<BaseVec, 4>(a, t, s, buf); }

#ifdef RC_X86_DISPATCH
RC_TARGET("arch=x86-64-v3") void attention_v3(const AttnArgs& a, int64_t t, float* s) {
    attention_task<vf8, 4>(a, t, s);
}
RC_TARGET("arch=x86-64-v3") void mass_v3(const AttnArgs& a, int64_t t, float* s, double* buf) {
    mass_task<vf8, 4>(a, t, s, buf);
}
RC_TARGET("arch=x86-64-v4") void attention_v4(const AttnArgs& a, int64_t t, float* s) {
    attention_task<vf16, 4>(a, t, s);
}
RC_TARGET("arch=x86-64-v4") void mass_v4(const AttnArgs& a, int64_t t, float* s, double* buf) {
    mass_task<vf16, 4>(a, t, s, buf);
}
#endif

TaskFns select_task_fns() {
#ifdef RC_X86_DISPATCH
    const int level = selected_isa();
    if (level >= ISA_AVX512) return {attention_v4, mass_v4};
    if (level >= ISA_AVX2) return {attention_v3, mass_v3};
#endif
    return {attention_base, mass_base};
}

}  // namespace

void acd_attention_cpu(const float* q, Strides4 qs, const float* k, Strides4 ks, const float* v,
                       Strides4 vs, const float* weights, float* out, Strides4 os, float* mass,
                       int64_t B, int64_t H, int64_t N, int64_t D, int64_t text_len,
                       int64_t image_len, float scale, int num_threads) {
    static const TaskFns fns = select_task_fns();
    const int nt = std::max(1, num_threads);
    const int64_t n_ktiles = ceil_div(N, KB);
    // Uninitialized: pass 0 writes every element (padding included).
    std::unique_ptr<float[]> kT(new float[static_cast<size_t>(B * H * n_ktiles * D * KB)]);
    std::vector<float> lse(static_cast<size_t>(B * H * text_len));
    std::vector<double> head_mass(static_cast<size_t>(B * H * image_len));
    const int64_t per_thread = scratch_floats(D);
    std::vector<float> scratch(static_cast<size_t>(nt * per_thread));
    std::vector<double> mass_buf(static_cast<size_t>(nt * KB));
    const AttnArgs args{q,  k,  v,  weights, kT.get(), out, lse.data(), head_mass.data(),
                        qs, ks, vs, os,      B,        H,   N,          D,
                        text_len, image_len, scale};

    const int64_t n_pass0 = B * H * n_ktiles;
    const int64_t n_pass1 = B * H * ceil_div(N, QB);
    const int64_t n_pass2 = B * H * ceil_div(image_len, KB);
#pragma omp parallel num_threads(nt)
    {
        float* mine = scratch.data() + thread_index() * per_thread;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_pass0; ++t) pack_task(args, t);
        // implicit barrier: every key tile is packed before pass 1 reads it
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_pass1; ++t) fns.attention(args, t, mine);
        // implicit barrier: every lse_img is written before pass 2 reads it
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_pass2; ++t) {
            fns.mass(args, t, mine, mass_buf.data() + thread_index() * KB);
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
