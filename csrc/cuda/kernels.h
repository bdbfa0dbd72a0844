// Launchers of the CUDA kernels, with plain C types only, so that kernels.cu compiles without ATen headers
// (fast nvcc builds) and the torch-facing glue (ops_cuda.cpp) is compiled by the host compiler.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../gate_epilogue.h"

namespace dgg {
namespace cuda {

constexpr int kMaxTensors = 32;   // tensors per stage-1 launch (passed by value as a kernel argument)
constexpr int kMaxBlocks = 1024;  // stage-1 grid cap
constexpr int64_t kPad = 4096;    // elements; tensor starts and block spans are multiples of this
constexpr int64_t kElemsPerBlock = int64_t(1) << 16;  // target elements per stage-1 block below the cap

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct TensorTable {
  const void* ptr[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t start[kMaxTensors];  // offset in the padded element space of this launch
  int n;
};

// Stage 1 over one table: `blocks` partial sums (each over `span` padded elements) written to partials[0..blocks).
cudaError_t launch_sumsq_stage1(const TensorTable& tab, DType dtype, int64_t blocks, int64_t span, float* partials,
                                cudaStream_t stream);
// Stage 2: *out = float(sum of partials[0..n) in double, fixed order).
cudaError_t launch_sumsq_stage2(const float* partials, int64_t n, float* out, cudaStream_t stream);
// The gate update (gate_epilogue.h): by one thread for windows up to 128, else by one block of 1024 threads
// (block-wide window sums and push).
cudaError_t launch_gate_epilogue(const GateArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace dgg
