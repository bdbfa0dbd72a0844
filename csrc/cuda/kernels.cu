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

// ---------------------------------------------------------------------------------------------- gate update
// Small windows (the usual W = 8): the scalar rule of gate_epilogue.h by one thread; its O(W) loops are a few
// dozen iterations, cheaper than any block-wide synchronisation. Large windows: one block of kGateThreads threads
// computes the O(W) parts (the three window sums of each z-score, the push) and one thread the rest of the same
// rule (gate_update_with), so the result equals the scalar kernel's up to the summation order of the window sums.
constexpr int kGateThreads = 1024;
constexpr int64_t kSerialWindow = 128;

__global__ void gate_epilogue_kernel(GateArgs a) { gate_update(a); }

template <typename T>
struct Pair {
  T x, y;
};

// Sum of (x, y) over the block in a fixed order (shuffle trees), returned to every thread.
template <typename T>
__device__ Pair<T> block_sum2_all(Pair<T> v) {
  __shared__ Pair<T> warp_sums[32];
  __shared__ Pair<T> total;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    v.x += __shfl_down_sync(0xffffffffu, v.x, off);
    v.y += __shfl_down_sync(0xffffffffu, v.y, off);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int n_warps = (blockDim.x + 31) >> 5;
    v = lane < n_warps ? warp_sums[lane] : Pair<T>{T(0), T(0)};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      v.x += __shfl_down_sync(0xffffffffu, v.x, off);
      v.y += __shfl_down_sync(0xffffffffu, v.y, off);
    }
    if (lane == 0) total = v;
  }
  __syncthreads();
  const Pair<T> out = total;
  __syncthreads();  // warp_sums / total are reused by the next call
  return out;
}

// zscore() of gate_epilogue.h for both rows at once, operation by operation, with block-wide sums.
__device__ void zscores_block(const float* row_e, const float* row_i, int64_t W, int64_t filled_e, int64_t filled_i,
                              float x_e, float x_i, float std_floor, float* z_e, float* z_i) {
  const float tiny = 1.17549435082228750797e-38f;
  const int64_t first_e = W - filled_e, first_i = W - filled_i;
  const float n_e = static_cast<float>(filled_e < 1 ? 1 : filled_e);
  const float n_i = static_cast<float>(filled_i < 1 ? 1 : filled_i);
  Pair<double> a{0.0, 0.0};  // float64, as zscore(): the sum of W finite float32 values cannot overflow
  for (int64_t j = threadIdx.x; j < W; j += blockDim.x) {
    if (j >= first_e) a.x += fabs(static_cast<double>(row_e[j]));
    if (j >= first_i) a.y += fabs(static_cast<double>(row_i[j]));
  }
  a = block_sum2_all(a);
  const float scale_e = clamp_min_f(static_cast<float>(a.x / static_cast<double>(n_e)), tiny);
  const float scale_i = clamp_min_f(static_cast<float>(a.y / static_cast<double>(n_i)), tiny);
  Pair<float> s{0.0f, 0.0f};
  for (int64_t j = threadIdx.x; j < W; j += blockDim.x) {
    if (j >= first_e) s.x += row_e[j] / scale_e;
    if (j >= first_i) s.y += row_i[j] / scale_i;
  }
  s = block_sum2_all(s);
  const float mean_e = s.x / n_e, mean_i = s.y / n_i;
  s = Pair<float>{0.0f, 0.0f};
  for (int64_t j = threadIdx.x; j < W; j += blockDim.x) {
    if (j >= first_e) {
      const float d = row_e[j] / scale_e - mean_e;
      s.x += d * d;
    }
    if (j >= first_i) {
      const float d = row_i[j] / scale_i - mean_i;
      s.y += d * d;
    }
  }
  s = block_sum2_all(s);
  const float std_e = sqrtf(s.x / n_e), std_i = sqrtf(s.y / n_i);
  const float ze = (x_e / scale_e - mean_e) / clamp_min_f(clamp_min_f(std_e, std_floor), tiny);
  const float zi = (x_i / scale_i - mean_i) / clamp_min_f(clamp_min_f(std_i, std_floor), tiny);
  *z_e = filled_e >= 2 ? ze : 0.0f;
  *z_i = filled_i >= 2 ? zi : 0.0f;
}

// push() of gate_epilogue.h by the whole block: row[j] = row[j + 1] in chunks of blockDim.x, in increasing order
// (a chunk reads only entries no earlier chunk has written), then row[W - 1] = x. Call with a block-uniform branch.
__device__ void push_block(float* row, int64_t W, float x) {
  for (int64_t base = 0; base + 1 < W; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    const bool active = j + 1 < W;
    const float v = active ? row[j + 1] : 0.0f;
    __syncthreads();
    if (active) row[j] = v;
    __syncthreads();
  }
  if (threadIdx.x == 0) row[W - 1] = x;
}

// The Window of gate_update_with for thread 0 of the block kernel: z-scores computed beforehand by the block,
// pushes recorded and done by the block afterwards.
struct BlockWindow {
  const float* row_e;
  float z_e, z_i;
  bool* push_flag;  // [2], shared
  float* push_x;    // [2], shared
  __host__ __device__ float z(const float* row, int64_t, int64_t, float, float) const {
    return row == row_e ? z_e : z_i;
  }
  __host__ __device__ void push_row(float* row, int64_t, float x) const {
    const int r = row == row_e ? 0 : 1;
    push_flag[r] = true;
    push_x[r] = x;
  }
};

__global__ void __launch_bounds__(kGateThreads) gate_epilogue_block_kernel(GateArgs a) {
  __shared__ float energy, increment;
  __shared__ bool push_flag[2];
  __shared__ float push_x[2];
  if (threadIdx.x == 0) {
    energy = gate_energy(a);
    increment = energy - *a.prev_energy;  // as gate_update_with computes it
    push_flag[0] = push_flag[1] = false;
  }
  __syncthreads();
  float z_e, z_i;
  zscores_block(a.window, a.window + a.W, a.W, a.filled[0], a.filled[1], energy, increment, a.std_floor, &z_e, &z_i);
  __syncthreads();  // every read of the state above happens before thread 0 updates it
  if (threadIdx.x == 0) gate_update_with(a, BlockWindow{a.window, z_e, z_i, push_flag, push_x});
  __syncthreads();
  for (int r = 0; r < 2; ++r)
    if (push_flag[r]) push_block(a.window + r * a.W, a.W, push_x[r]);
}

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
  if (args.W <= kSerialWindow) {
    gate_epilogue_kernel<<<1, 1, 0, stream>>>(args);
  } else {
    gate_epilogue_block_kernel<<<1, kGateThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dgg
