// Shared helpers of the rcgrpo_kernels._C CPU backend: thread counts, size checks, CPU dispatch.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

// Hot per-task functions are compiled twice (x86-64-v3, i.e. AVX2+FMA, and the baseline ISA)
// and picked at load time by CPU features, since setup.py builds for the baseline x86-64 target
// ("arch=haswell" would dispatch on that CPU model only). Helpers they call are force-inlined so
// that they are compiled for the clone's ISA too.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RC_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"), noinline))
#else
#define RC_CLONES
#endif

#if defined(__GNUC__)
#define RC_INLINE inline __attribute__((always_inline))
#define RC_RESTRICT __restrict__
#else
#define RC_INLINE inline
#define RC_RESTRICT
#endif

namespace rcgrpo {

/// Threads a parallel region uses: `requested` if > 0, else the OpenMP default (1 without OpenMP).
inline int resolve_threads(int64_t requested) {
    if (requested < 0) {
        throw std::invalid_argument("num_threads must be >= 0 (0 = OpenMP default), got " +
                                    std::to_string(requested));
    }
#ifdef _OPENMP
    if (requested > 0) return static_cast<int>(requested);
    return omp_get_max_threads();
#else
    return 1;
#endif
}

inline bool openmp_enabled() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
}

inline int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/// Index of the calling thread inside a parallel region (0 without OpenMP).
inline int thread_index() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

inline void require(bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument(message);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace rcgrpo

namespace rcgrpo {

// ---- kernels (raw contiguous buffers; sizes are checked by the bindings) ----

/// q, k, v: [B, H, N, D] fp32; weights: [B, text_len] or nullptr (w = 1).
/// Writes out [B, H, N, D] = softmax(q kᵀ scale) v and mass [B, image_len] (SPEC §7).
void acd_attention_cpu(const float* q, const float* k, const float* v, const float* weights,
                       float* out, float* mass, int64_t B, int64_t H, int64_t N, int64_t D,
                       int64_t text_len, int64_t image_len, float scale, int num_threads);

/// x [T, G, D], y [T, K, D], mask [D] -> S [T, K, G, 2] (inside / outside the mask).
void region_sq_dists_fwd_cpu(const float* x, const float* y, const float* mask, float* S,
                             int64_t T, int64_t G, int64_t K, int64_t D, int num_threads);
void region_sq_dists_fwd_cpu(const double* x, const double* y, const double* mask, double* S,
                             int64_t T, int64_t G, int64_t K, int64_t D, int num_threads);

/// dS [T, K, G, 2], x [T, G, D], y [T, K, D], mask [D] -> dx [T, G, D], dy [T, K, D].
void region_sq_dists_bwd_cpu(const float* dS, const float* x, const float* y, const float* mask,
                             float* dx, float* dy, int64_t T, int64_t G, int64_t K, int64_t D,
                             int num_threads);
void region_sq_dists_bwd_cpu(const double* dS, const double* x, const double* y,
                             const double* mask, double* dx, double* dy, int64_t T, int64_t G,
                             int64_t K, int64_t D, int num_threads);

}  // namespace rcgrpo
