// CPU block kernels of dgg_fused::_C_sumsq that live outside dgg_fused.cpp: the AVX-512 variants, and the choice of
// instruction set (run-time CPU features, overridable with DGG_FUSED_CPU_ISA for tests and as a kill switch).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace dgg {
namespace cpu {

constexpr int64_t kSumsqBlock = 1024;  // elements per float32 block sum (shared by every block kernel)

// Software prefetch distance of the SIMD block loops, in bytes (0: none). 2-byte types consume one 64-byte line per
// 32 elements, and there the hardware prefetcher alone left the loop ~20% short of the DRAM read rate on a Zen 4
// EPYC (one core: 24 vs 31 GB/s in a standalone microbenchmark, 4 KiB ahead; 8 KiB the same); fp32 streams at the
// read rate without it, and a prefetch costs it a few percent. A prefetch never faults, past the end either.
template <typename T>
constexpr int kPrefetchBytes = sizeof(T) == 2 ? 4096 : 0;

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// The instruction set the CPU sum of squares uses now: the best this CPU supports, or DGG_FUSED_CPU_ISA
// ("portable", "avx2", "avx512"; "auto" or unset = best) when set; asking for one the CPU lacks raises.
// Read on every call (a getenv), so a test can switch it in-process. AVX2 and AVX-512 give identical bits.
Isa sumsq_isa();
// What this CPU supports (cpuid + OS support of the register state, via __builtin_cpu_supports).
bool cpu_has_avx2();
bool cpu_has_avx512();

// Sum of squares of p[0..n) in blocks of kSumsqBlock elements, block sums accumulated in double, with the AVX-512
// block kernels: the same 32 float32 lanes, the same FMA per lane, the same reduction tree and scalar tail as the
// AVX2 block kernels of dgg_fused.cpp, so the result is bitwise identical to the AVX2 path.
double chunk_sumsq_avx512(const float* p, int64_t n);
double chunk_sumsq_avx512(const c10::BFloat16* p, int64_t n);
double chunk_sumsq_avx512(const c10::Half* p, int64_t n);

}  // namespace cpu
}  // namespace dgg
