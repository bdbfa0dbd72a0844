// Host-side helpers shared by the CPU (dgg_fused.cpp) and CUDA (cuda/ops_cuda.cpp) implementations.
#pragma once

#include <ATen/core/Tensor.h>

#include "gate_epilogue.h"

namespace dgg {

// Validates the gate-state tensors (dtype, size, contiguity, one device) and collects their data pointers.
GateArgs make_gate_args(const at::Tensor& partials, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& external_skip, const at::Tensor& window,
                        const at::Tensor& filled, const at::Tensor& prev_energy, const at::Tensor& reuse_index,
                        const at::Tensor& stopped, const at::Tensor& counters, const at::Tensor& last,
                        const at::Tensor& skip, double tau, double std_floor, int64_t statistic, int64_t reference);

}  // namespace dgg

namespace dgg {
// Same device, float32/bfloat16/float16, strided: the inputs every _C_sumsq implementation accepts.
void check_sumsq_inputs(const at::TensorList& tensors);
}  // namespace dgg
