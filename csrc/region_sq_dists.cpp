// region_sq_dists on the CPU (SPEC §5, §8): masked squared distances of candidates to anchors,
// forward and backward, for float32 (sums of float blocks accumulated in double) and float64.
//
// Forward: one task per (t, i, fixed span of D); partial sums go to a buffer and are added over
// the spans in order. Backward: one task per (t, chunk of D) writes its slice of dx and dy.
// The split never depends on the thread count, so results are bit-identical for any of them.
// The task bodies are compiled for AVX-512, AVX2 and the baseline ISA and picked at run time by
// `selected_isa()` (CPU features, capped by RCGRPO_CPU_ISA; see cpu_isa.cpp).
//
// Inputs are dense (the Python wrapper makes x and y contiguous; they are contiguous in practice).
#include <algorithm>
#include <vector>

#include "common.h"

namespace rcgrpo {
namespace {

constexpr int64_t LANES = 16;     // independent partial sums of the inner loop (vector lanes)
constexpr int64_t CHUNK = 256;    // elements summed in the input precision before going to double
constexpr int64_t SPAN = 16384;   // D-extent of one forward task
constexpr int64_t BCHUNK = 1024;  // D-extent of one backward task

/// Adds Σ_d M_d (x_d - y_d)² and Σ_d (1 - M_d)(x_d - y_d)² over d < n to acc[0], acc[1].
template <typename S>
RC_INLINE void masked_sq_chunk(const S* RC_RESTRICT x, const S* RC_RESTRICT y,
                               const S* RC_RESTRICT m, int64_t n, double* acc) {
    S in[LANES], out[LANES];
    for (int64_t l = 0; l < LANES; ++l) in[l] = out[l] = S(0);
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES) {
        for (int64_t l = 0; l < LANES; ++l) {
            const S diff = x[d + l] - y[d + l];
            const S sq = diff * diff;
            const S w = m[d + l];
            in[l] += w * sq;
            out[l] += (S(1) - w) * sq;
        }
    }
    for (int64_t l = 0; d < n; ++d, ++l) {
        const S diff = x[d] - y[d];
        const S sq = diff * diff;
        in[l] += m[d] * sq;
        out[l] += (S(1) - m[d]) * sq;
    }
    double s_in = 0.0, s_out = 0.0;
    for (int64_t l = 0; l < LANES; ++l) {
        s_in += static_cast<double>(in[l]);
        s_out += static_cast<double>(out[l]);
    }
    acc[0] += s_in;
    acc[1] += s_out;
}

/// part[k][0..1] = sums over d in [lo, hi) for candidate row x_i against every anchor y[k].
template <typename S>
RC_INLINE void fwd_span(const S* xi, const S* yt, const S* mask, int64_t K, int64_t D, int64_t lo,
                        int64_t hi, double* part) {
    for (int64_t k = 0; k < 2 * K; ++k) part[k] = 0.0;
    for (int64_t c0 = lo; c0 < hi; c0 += CHUNK) {  // the x chunk stays in L1 across anchors
        const int64_t n = std::min(CHUNK, hi - c0);
        for (int64_t k = 0; k < K; ++k) {
            masked_sq_chunk<S>(xi + c0, yt + k * D + c0, mask + c0, n, part + 2 * k);
        }
    }
}

template <typename S>
RC_INLINE void fwd_task(const S* x, const S* y, const S* mask, int64_t G, int64_t K, int64_t D,
                        int64_t task, double* part) {
    const int64_t n_spans = ceil_div(D, SPAN);
    const int64_t ti = task / n_spans, t = ti / G, lo = (task % n_spans) * SPAN;
    fwd_span<S>(x + ti * D, y + t * K * D, mask, K, D, lo, std::min(D, lo + SPAN), part);
}

template <typename S, typename Task>
void fwd_driver(const S* x, const S* y, const S* mask, S* out, int64_t T, int64_t G, int64_t K,
                int64_t D, int num_threads, Task task_fn) {
    const int nt = std::max(1, num_threads);
    const int64_t n_spans = ceil_div(D, SPAN);
    const int64_t n_tasks = T * G * n_spans;
    std::vector<double> parts(static_cast<size_t>(n_tasks * 2 * K));  // [T, G, spans, K, 2]
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t task = 0; task < n_tasks; ++task) {
        task_fn(x, y, mask, G, K, D, task, parts.data() + task * 2 * K);
    }
    // S[t, k, i, c] = Σ over spans in order.
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t i = 0; i < G; ++i) {
            const double* p = parts.data() + (t * G + i) * n_spans * 2 * K;
            for (int64_t k = 0; k < K; ++k) {
                double s_in = 0.0, s_out = 0.0;
                for (int64_t sp = 0; sp < n_spans; ++sp) {
                    s_in += p[sp * 2 * K + 2 * k];
                    s_out += p[sp * 2 * K + 2 * k + 1];
                }
                S* o = out + ((t * K + k) * G + i) * 2;
                o[0] = static_cast<S>(s_in);
                o[1] = static_cast<S>(s_out);
            }
        }
    }
}

/// dx[t, :, lo:hi] and dy[t, :, lo:hi] for one step t (see region_sq_dists.py for the formulas).
template <typename S>
RC_INLINE void bwd_chunk(const S* dS, const S* x, const S* y, const S* mask, S* dx, S* dy,
                         int64_t t, int64_t G, int64_t K, int64_t D, int64_t lo, int64_t hi) {
    const int64_t n = hi - lo;
    const S* RC_RESTRICT m = mask + lo;
    for (int64_t i = 0; i < G; ++i) std::fill_n(dx + (t * G + i) * D + lo, n, S(0));
    for (int64_t k = 0; k < K; ++k) std::fill_n(dy + (t * K + k) * D + lo, n, S(0));
    for (int64_t i = 0; i < G; ++i) {
        const S* RC_RESTRICT xi = x + (t * G + i) * D + lo;
        S* RC_RESTRICT dxi = dx + (t * G + i) * D + lo;
        for (int64_t k = 0; k < K; ++k) {
            const S* RC_RESTRICT yk = y + (t * K + k) * D + lo;
            S* RC_RESTRICT dyk = dy + (t * K + k) * D + lo;
            const S* g = dS + ((t * K + k) * G + i) * 2;
            const S g_out = g[1];
            const S g_delta = g[0] - g[1];  // weight = g_in M + g_out (1 - M) = g_out + g_delta M
            for (int64_t d = 0; d < n; ++d) {
                const S c = S(2) * (xi[d] - yk[d]) * (g_out + g_delta * m[d]);
                dxi[d] += c;
                dyk[d] -= c;
            }
        }
    }
}

template <typename S>
RC_INLINE void bwd_task(const S* dS, const S* x, const S* y, const S* mask, S* dx, S* dy,
                        int64_t G, int64_t K, int64_t D, int64_t task) {
    const int64_t n_chunks = ceil_div(D, BCHUNK);
    const int64_t t = task / n_chunks, lo = (task % n_chunks) * BCHUNK;
    bwd_chunk<S>(dS, x, y, mask, dx, dy, t, G, K, D, lo, std::min(D, lo + BCHUNK));
}

template <typename S, typename Task>
void bwd_driver(const S* dS, const S* x, const S* y, const S* mask, S* dx, S* dy, int64_t T,
                int64_t G, int64_t K, int64_t D, int num_threads, Task task_fn) {
    const int nt = std::max(1, num_threads);
    const int64_t n_tasks = T * ceil_div(D, BCHUNK);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t task = 0; task < n_tasks; ++task) task_fn(dS, x, y, mask, dx, dy, G, K, D, task);
}

// ---- ISA dispatch: one out-of-line copy of each task per ISA level ----
template <typename S>
using FwdFn = void (*)(const S*, const S*, const S*, int64_t, int64_t, int64_t, int64_t, double*);
template <typename S>
using BwdFn = void (*)(const S*, const S*, const S*, const S*, S*, S*, int64_t, int64_t, int64_t, int64_t);

#define RC_REGION_TASKS(SUFFIX, ATTR)                                                              \
    template <typename S>                                                                          \
    ATTR void fwd_##SUFFIX(const S* x, const S* y, const S* m, int64_t G, int64_t K, int64_t D,    \
                           int64_t task, double* part) {                                           \
        fwd_task<S>(x, y, m, G, K, D, task, part);                                                 \
    }                                                                                              \
    template <typename S>                                                                          \
    ATTR void bwd_##SUFFIX(const S* dS, const S* x, const S* y, const S* m, S* dx, S* dy, int64_t G, \
                           int64_t K, int64_t D, int64_t task) {                                   \
        bwd_task<S>(dS, x, y, m, dx, dy, G, K, D, task);                                           \
    }

RC_REGION_TASKS(base, __attribute__((noinline)))
#ifdef RC_X86_DISPATCH
RC_REGION_TASKS(v3, RC_TARGET("arch=x86-64-v3"))
RC_REGION_TASKS(v4, RC_TARGET("arch=x86-64-v4"))
#endif

template <typename S>
FwdFn<S> select_fwd() {
#ifdef RC_X86_DISPATCH
    const int level = selected_isa();
    if (level >= ISA_AVX512) return fwd_v4<S>;
    if (level >= ISA_AVX2) return fwd_v3<S>;
#endif
    return fwd_base<S>;
}

template <typename S>
BwdFn<S> select_bwd() {
#ifdef RC_X86_DISPATCH
    const int level = selected_isa();
    if (level >= ISA_AVX512) return bwd_v4<S>;
    if (level >= ISA_AVX2) return bwd_v3<S>;
#endif
    return bwd_base<S>;
}

}  // namespace

void region_sq_dists_fwd_cpu(const float* x, const float* y, const float* mask, float* S,
                             int64_t T, int64_t G, int64_t K, int64_t D, int num_threads) {
    static const FwdFn<float> fn = select_fwd<float>();
    fwd_driver<float>(x, y, mask, S, T, G, K, D, num_threads, fn);
}

void region_sq_dists_fwd_cpu(const double* x, const double* y, const double* mask, double* S,
                             int64_t T, int64_t G, int64_t K, int64_t D, int num_threads) {
    static const FwdFn<double> fn = select_fwd<double>();
    fwd_driver<double>(x, y, mask, S, T, G, K, D, num_threads, fn);
}

void region_sq_dists_bwd_cpu(const float* dS, const float* x, const float* y, const float* mask,
                             float* dx, float* dy, int64_t T, int64_t G, int64_t K, int64_t D,
                             int num_threads) {
    static const BwdFn<float> fn = select_bwd<float>();
    bwd_driver<float>(dS, x, y, mask, dx, dy, T, G, K, D, num_threads, fn);
}

void region_sq_dists_bwd_cpu(const double* dS, const double* x, const double* y,
                             const double* mask, double* dx, double* dy, int64_t T, int64_t G,
                             int64_t K, int64_t D, int num_threads) {
    static const BwdFn<double> fn = select_bwd<double>();
    bwd_driver<double>(dS, x, y, mask, dx, dy, T, G, K, D, num_threads, fn);
}

}  // namespace rcgrpo
