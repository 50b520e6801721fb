// CPU ISA level of the C++ kernels: detected once from the CPU, capped by RCGRPO_CPU_ISA.
//
// RCGRPO_CPU_ISA=avx2 (or baseline) makes an AVX-512 machine run the AVX2 (or SSE2 baseline)
// kernels, so that CI executes and checks every code path on one CPU. A cap above what the CPU
// supports is no error: the kernels use the detected level (`_C.cpu_isa_detected()` tells it).
#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

#include "common.h"

namespace rcgrpo {

int detected_isa() {
#ifdef RC_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return ISA_AVX512;
    if (__builtin_cpu_supports("x86-64-v3")) return ISA_AVX2;
#endif
    return ISA_BASELINE;
}

namespace {

int parse_cap(const char* value) {
    if (value == nullptr) return ISA_AVX512;
    std::string v(value);
    std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return std::tolower(c); });
    if (v.empty() || v == "avx512") return ISA_AVX512;
    if (v == "avx2") return ISA_AVX2;
    if (v == "baseline") return ISA_BASELINE;
    throw std::invalid_argument("RCGRPO_CPU_ISA must be one of avx512, avx2, baseline (or unset), got '" +
                                std::string(value) + "'");
}

}  // namespace

int selected_isa() {
    // Thread-safe one-time initialization; an invalid value throws on every call.
    static const int cap = parse_cap(std::getenv("RCGRPO_CPU_ISA"));
    static const int level = std::min(cap, detected_isa());
    return level;
}

const char* isa_name(int level) {
    switch (level) {
        case ISA_AVX512: return "avx512";
        case ISA_AVX2: return "avx2";
        default: return "baseline";
    }
}

}  // namespace rcgrpo
