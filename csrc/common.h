// Shared helpers of the rcgrpo_kernels._C CPU backend: thread counts, size checks, CPU dispatch.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

// Hot per-task functions are instantiated once per ISA level, each inlined into a wrapper compiled
// with `RC_TARGET(...)` for that level (setup.py builds for the baseline x86-64 target), and one of
// them is picked at run time by `selected_isa()` (CPU features, capped by RCGRPO_CPU_ISA).
// Helpers they call are force-inlined so that they are compiled for the wrapper's ISA too.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RC_X86_DISPATCH 1
#define RC_TARGET(isa) __attribute__((target(isa), noinline))
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

// ---- CPU ISA level of the kernels ----
// Levels: ISA_AVX512 (x86-64-v4), ISA_AVX2 (x86-64-v3: AVX2 + FMA), ISA_BASELINE (x86-64: SSE2).
enum IsaLevel : int { ISA_BASELINE = 0, ISA_AVX2 = 3, ISA_AVX512 = 4 };

/// The highest level this CPU (and this build) supports.
int detected_isa();
/// The level the kernels use: detected_isa() capped by the environment variable RCGRPO_CPU_ISA
/// ("avx512" | "avx2" | "baseline", case-insensitive; unset or empty: no cap), read once.
/// Throws std::invalid_argument for any other value.
int selected_isa();
/// "avx512", "avx2" or "baseline".
const char* isa_name(int level);

}  // namespace rcgrpo

namespace rcgrpo {

// ---- kernels (raw buffers; sizes and strides are checked by the bindings) ----

/// Element strides of the B, H and N dimensions of a [B, H, N, D] tensor whose D stride is 1
/// (dense: {H*N*D, N*D, D}; diffusers' [B, N, H, D].transpose(1, 2): {N*H*D, D, H*D}).
struct Strides4 {
    int64_t b, h, n;
};

/// q, k, v: [B, H, N, D] fp32 with the given strides; weights: [B, text_len] dense or nullptr
/// (w = 1). Writes out [B, H, N, D] (strides `os`) = softmax(q kᵀ scale) v and mass
/// [B, image_len] dense (SPEC §7).
void acd_attention_cpu(const float* q, Strides4 qs, const float* k, Strides4 ks, const float* v,
                       Strides4 vs, const float* weights, float* out, Strides4 os, float* mass,
                       int64_t B, int64_t H, int64_t N, int64_t D, int64_t text_len,
                       int64_t image_len, float scale, int num_threads);

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
