// AVX-512 block kernels of the CPU sum of squares, and the run-time choice of instruction set (sumsq_cpu.h).
//
// Bitwise identical to the AVX2 kernels of dgg_fused.cpp. Those keep 32 float32 lanes in four 8-lane FMA
// accumulators a0..a3 and finish with (a0 + a2) + (a1 + a3), then a fixed 8 -> 4 -> 2 -> 1 tree, then the scalar
// tail. Here the same 32 lanes sit in two 16-lane accumulators, every lane sees the same products in the same order
// (one FMA per element, as there), and the finish forms exactly (a0 + a2) + (a1 + a3) with the same operand order
// before the same 8-lane tree:
//   fp32 / fp16: A = [a0 | a1] (elements 0..15 of each 32), B = [a2 | a3] (16..31); A + B = [a0+a2 | a1+a3].
//   bf16: one 64-byte load holds the 32 values; (v << 16) is the even ones = [a0 | a2] lanes (elements 0,2,..,14 |
//         16,18,..,30, like the AVX2 x0 | x2), (v & 0xffff0000) the odd ones = [a1 | a3].
// What changes is the number of instructions per byte: half the loads and FMAs, and one load and two integer ops
// per 32 bf16 values; and bf16/fp16 prefetch 4 KiB ahead (kPrefetchBytes). (Summing two or four blocks side by side, each
// exactly as alone, to put more FMA chains in flight measured no better on a Zen 4 EPYC: the loop is not
// FMA-latency bound: ~94 GB/s on one core with the data in L2.)
#include "sumsq_cpu.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DGG_X86 1
#endif

// GCC 12 reports its own _mm512_undefined_* placeholders inside the intrinsics headers as maybe-uninitialized.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace dgg {
namespace cpu {

#ifdef DGG_X86
bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

bool cpu_has_avx512() {  // libgcc also checks that the OS saves the zmm/opmask state (XCR0)
  static const bool ok = cpu_has_avx2() && __builtin_cpu_supports("avx512f");
  return ok;
}
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
#endif

Isa sumsq_isa() {
  const Isa best = cpu_has_avx512() ? kAvx512 : (cpu_has_avx2() ? kAvx2 : kPortable);
  const char* env = std::getenv("DGG_FUSED_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return best;
  Isa want;
  if (std::strcmp(env, "portable") == 0) {
    want = kPortable;
  } else if (std::strcmp(env, "avx2") == 0) {
    want = kAvx2;
  } else if (std::strcmp(env, "avx512") == 0) {
    want = kAvx512;
  } else {
    TORCH_CHECK(false, "DGG_FUSED_CPU_ISA must be auto, portable, avx2 or avx512, got '", env, "'");
  }
  TORCH_CHECK(want <= best, "DGG_FUSED_CPU_ISA=", env, ": this CPU does not support it");
  return want;
}

#ifdef DGG_X86
namespace {

#define DGG_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

DGG_AVX512 inline __m256 lo256(__m512 v) { return _mm512_castps512_ps256(v); }
DGG_AVX512 inline __m256 hi256(__m512 v) {
  return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

// s = (a0 + a2) + (a1 + a3) as 8 lanes; then exactly the AVX2 finish_block: the 8 -> 1 tree and the scalar tail.
template <typename T>
DGG_AVX512 inline float finish(__m256 s, const T* p, int64_t i, int64_t n) {
  float tail = 0.0f;
  for (; i < n; ++i) {
    const float x = to_float(p[i]);
    tail += x * x;
  }
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h) + tail;
}

DGG_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
DGG_AVX512 inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// One group of 32 elements into the two accumulators, and the accumulators' (a0 + a2) + (a1 + a3).
// fp32 / fp16: a = [a0 | a1], b = [a2 | a3].
template <typename T>
DGG_AVX512 inline void step32(const T* p, __m512& a, __m512& b) {
  const __m512 x01 = load16(p), x23 = load16(p + 16);
  a = _mm512_fmadd_ps(x01, x01, a);
  b = _mm512_fmadd_ps(x23, x23, b);
}
template <typename T>
DGG_AVX512 inline __m256 combine(__m512 a, __m512 b) {
  const __m512 t = _mm512_add_ps(a, b);  // [a0 + a2 | a1 + a3]
  return _mm256_add_ps(lo256(t), hi256(t));
}
// bf16: a = [a0 | a2] (even elements), b = [a1 | a3] (odd elements).
template <>
DGG_AVX512 inline void step32<c10::BFloat16>(const c10::BFloat16* p, __m512& a, __m512& b) {
  const __m512i v = _mm512_loadu_si512(reinterpret_cast<const void*>(p));
  const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  a = _mm512_fmadd_ps(even, even, a);
  b = _mm512_fmadd_ps(odd, odd, b);
}
template <>
DGG_AVX512 inline __m256 combine<c10::BFloat16>(__m512 a, __m512 b) {
  return _mm256_add_ps(_mm256_add_ps(lo256(a), hi256(a)), _mm256_add_ps(lo256(b), hi256(b)));
}

// One block of n <= kSumsqBlock elements (the last one of a chunk may be short).
template <typename T>
DGG_AVX512 float block_sumsq(const T* p, int64_t n) {
  __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    if constexpr (kPrefetchBytes<T> > 0)
      _mm_prefetch(reinterpret_cast<const char*>(p + i) + kPrefetchBytes<T>, _MM_HINT_T0);
    step32(p + i, a, b);
  }
  return finish(combine<T>(a, b), p, i, n);
}

template <typename T>
DGG_AVX512 double chunk(const T* p, int64_t n) {
  double acc = 0.0;
  for (int64_t b = 0; b < n; b += kSumsqBlock) acc += block_sumsq(p + b, std::min(kSumsqBlock, n - b));
  return acc;
}

}  // namespace

double chunk_sumsq_avx512(const float* p, int64_t n) { return chunk(p, n); }
double chunk_sumsq_avx512(const c10::BFloat16* p, int64_t n) { return chunk(p, n); }
double chunk_sumsq_avx512(const c10::Half* p, int64_t n) { return chunk(p, n); }
#endif

}  // namespace cpu
}  // namespace dgg
