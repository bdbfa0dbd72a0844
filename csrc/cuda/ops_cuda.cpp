// CUDA registrations of dgg_fused::_C_sumsq and dgg_fused::_C_gate_epilogue: argument checks, batching of the
// tensors into kernel-argument tables, launches on the current stream. The kernels are in kernels.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../dgg_fused.h"
#include "kernels.h"

namespace dgg {
namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Batch {
  cuda::DType dtype;
  cuda::TensorTable tab;
  int64_t total;  // padded element count
  int64_t blocks;
  int64_t span;
};

cuda::DType dtype_code(at::ScalarType dt) {
  return dt == at::kFloat ? cuda::kF32 : (dt == at::kBFloat16 ? cuda::kBF16 : cuda::kF16);
}

at::Tensor sumsq_cuda(at::TensorList tensors) {
  check_sumsq_inputs(tensors);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  std::vector<at::Tensor> keep;  // dense views or contiguous copies, alive until the launches are queued
  keep.reserve(tensors.size());
  std::vector<Batch> batches;
  for (const at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    Batch cur{};
    cur.dtype = dtype_code(dt);
    for (const auto& t0 : tensors) {
      if (t0.scalar_type() != dt || t0.numel() == 0) continue;
      keep.push_back(t0.is_non_overlapping_and_dense() ? t0 : t0.contiguous());
      const at::Tensor& t = keep.back();
      if (cur.tab.n == cuda::kMaxTensors) {
        batches.push_back(cur);
        cur = Batch{};
        cur.dtype = dtype_code(dt);
      }
      cur.tab.ptr[cur.tab.n] = t.data_ptr();
      cur.tab.numel[cur.tab.n] = t.numel();
      cur.tab.start[cur.tab.n] = cur.total;
      cur.tab.n += 1;
      cur.total += round_up(t.numel(), cuda::kPad);
    }
    if (cur.tab.n > 0) batches.push_back(cur);
  }
  int64_t n_partials = 0;
  for (auto& b : batches) {
    // The grid depends on the element count only: the same input gives the same bits on any GPU.
    b.blocks = std::min<int64_t>(cuda::kMaxBlocks,
                                 std::max<int64_t>(1, (b.total + cuda::kElemsPerBlock - 1) / cuda::kElemsPerBlock));
    b.span = round_up((b.total + b.blocks - 1) / b.blocks, cuda::kPad);
    n_partials += b.blocks;
  }
  const auto opts = tensors[0].options().dtype(at::kFloat);
  at::Tensor out = at::empty({}, opts);
  if (n_partials == 0) {
    out.zero_();
    return out;
  }
  at::Tensor partials = at::empty({n_partials}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t offset = 0;
  for (const auto& b : batches) {
    C10_CUDA_CHECK(cuda::launch_sumsq_stage1(b.tab, b.dtype, b.blocks, b.span, partials.data_ptr<float>() + offset,
                                             stream));
    offset += b.blocks;
  }
  C10_CUDA_CHECK(cuda::launch_sumsq_stage2(partials.data_ptr<float>(), n_partials, out.data_ptr<float>(), stream));
  return out;
}

void gate_epilogue_cuda(const at::Tensor& partials, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& external_skip, const at::Tensor& window,
                        const at::Tensor& filled, const at::Tensor& prev_energy, const at::Tensor& reuse_index,
                        const at::Tensor& stopped, const at::Tensor& counters, const at::Tensor& last,
                        const at::Tensor& skip, double tau, double std_floor, int64_t statistic, int64_t reference) {
  const c10::cuda::CUDAGuard guard(window.device());
  const GateArgs a = make_gate_args(partials, grad_scale, external_skip, window, filled, prev_energy, reuse_index,
                                    stopped, counters, last, skip, tau, std_floor, statistic, reference);
  C10_CUDA_CHECK(cuda::launch_gate_epilogue(a, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace dgg

TORCH_LIBRARY_IMPL(dgg_fused, CUDA, m) {
  m.impl("_C_sumsq", &dgg::sumsq_cuda);
  m.impl("_C_gate_epilogue", &dgg::gate_epilogue_cuda);
}
