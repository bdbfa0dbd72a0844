// CUDA kernels behind dgg_fused::_C_sumsq and dgg_fused::_C_gate_epilogue (schemas in ../dgg_fused.cpp; torch
// glue in ops_cuda.cpp). No ATen headers here: nvcc compiles this file in seconds.
//
// _C_sumsq is a two-stage, deterministic reduction:
//   stage 1: a fixed grid of P blocks (P depends only on the element count, never on the GPU), each summing one
//            contiguous range of a padded "global element space" that concatenates the tensors of a batch
//            (tensor starts padded to kPad elements so every range starts 16-byte aligned when the tensor does).
//            16-byte vector loads (8 bf16/fp16 or 4 fp32), float32 accumulation per thread, a fixed
//            shuffle-tree block reduction, one float per block written to a partials buffer.
//   stage 2: one block sums the partials in a fixed order in double and writes the 0-d float32 result.
// Tensors are passed by value in a kernel-argument table (no host-to-device copy, CUDA-graph capturable);
// more than kMaxTensors tensors, or several dtypes, take one stage-1 launch per batch into the same buffer.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace dgg {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ float sumsq_vec(const uint4& raw) {
  constexpr int V = 16 / sizeof(T);
  T vals[V];
  memcpy(vals, &raw, 16);
  float s = 0.0f;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const float x = to_f(vals[v]);
    s += x * x;
  }
  return s;
}

// Fixed-order block reduction: shuffle tree within warps, then the first warp over the warp sums.
template <typename Acc>
__device__ Acc block_sum(Acc v) {
  __shared__ Acc warp_sums[32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  v = (threadIdx.x < n_warps) ? warp_sums[threadIdx.x] : Acc(0);
  if (warp == 0) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;  // valid in thread 0
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sumsq_stage1(TensorTable tab, int64_t span, float* partials) {
  constexpr int V = 16 / sizeof(T);
  const int64_t lo_b = static_cast<int64_t>(blockIdx.x) * span;
  const int64_t hi_b = lo_b + span;
  float acc = 0.0f;
  for (int i = 0; i < tab.n; ++i) {
    const int64_t s = tab.start[i];
    const int64_t e = s + tab.numel[i];
    const int64_t lo = s > lo_b ? s : lo_b, hi = e < hi_b ? e : hi_b;
    if (lo >= hi) continue;
    const T* p = static_cast<const T*>(tab.ptr[i]) + (lo - s);  // 64-bit offsets throughout
    const int64_t n = hi - lo;
    int64_t done = 0;
    if ((reinterpret_cast<uintptr_t>(p) & 15) == 0) {
      const uint4* pv = reinterpret_cast<const uint4*>(p);
      const int64_t nv = n / V;
      int64_t j = threadIdx.x;
      for (; j + 3 * kThreads < nv; j += 4 * kThreads) {  // 4 independent 16-byte loads in flight per thread
        const uint4 r0 = __ldg(pv + j), r1 = __ldg(pv + j + kThreads), r2 = __ldg(pv + j + 2 * kThreads),
                    r3 = __ldg(pv + j + 3 * kThreads);
        acc += sumsq_vec<T>(r0);
        acc += sumsq_vec<T>(r1);
        acc += sumsq_vec<T>(r2);
        acc += sumsq_vec<T>(r3);
      }
      for (; j < nv; j += kThreads) acc += sumsq_vec<T>(__ldg(pv + j));
      done = nv * V;
    }
    for (int64_t j = done + threadIdx.x; j < n; j += kThreads) {
      const float x = to_f(p[j]);
      acc += x * x;
    }
  }
  const float total = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

__global__ void __launch_bounds__(1024) sumsq_stage2(const float* partials, int64_t n, float* out) {
  double acc = 0.0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) acc += static_cast<double>(partials[j]);
  const double total = block_sum(acc);
  if (threadIdx.x == 0) *out = static_cast<float>(total);
}

__global__ void gate_epilogue_kernel(GateArgs a) { gate_update(a); }

}  // namespace

cudaError_t launch_sumsq_stage1(const TensorTable& tab, DType dtype, int64_t blocks, int64_t span, float* partials,
                                cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (dtype) {
    case kF32:
      sumsq_stage1<float><<<grid, kThreads, 0, stream>>>(tab, span, partials);
      break;
    case kBF16:
      sumsq_stage1<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(tab, span, partials);
      break;
    default:
      sumsq_stage1<__half><<<grid, kThreads, 0, stream>>>(tab, span, partials);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_sumsq_stage2(const float* partials, int64_t n, float* out, cudaStream_t stream) {
  sumsq_stage2<<<1, 1024, 0, stream>>>(partials, n, out);
  return cudaGetLastError();
}

cudaError_t launch_gate_epilogue(const GateArgs& args, cudaStream_t stream) {
  gate_epilogue_kernel<<<1, 1, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dgg
