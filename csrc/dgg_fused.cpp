// dgg_fused._C: the op schemas of the compiled backends and their CPU implementations.
//
//   dgg_fused::_C_sumsq(Tensor[] tensors) -> Tensor
//       sum of squares of every element, float32 accumulation, returned as a 0-d float32 tensor.
//   dgg_fused::_C_gate_epilogue(...) -> ()
//       the DGG gate update (gate_epilogue.h) on the device-resident gate state, in one call / one kernel.
//
// Each schema is defined here, once; the CPU kernels are registered below, the CUDA ones in cuda/ops_cuda.cpp (built
// only by CUDAExtension). dgg_fused/ops calls _C_sumsq for the "cpp" and "cuda" backends, dgg_fused/gate calls
// _C_gate_epilogue; their fake (meta) implementations are registered in Python when the extension is loaded.
//
// CPU reduction (deterministic, independent of the thread count): every tensor is cut into fixed chunks of
// kChunk elements; a chunk is summed in blocks of kBlock elements with 32 float32 lanes (4 AVX2 FMA accumulators
// when the CPU has AVX2, else portable code the compiler vectorises), lanes combined pairwise in a fixed order,
// block sums accumulated in double; chunk results are summed in order in double and rounded once to float32.
// CPUs with AVX-512 run the same 32 lanes as two 16-lane accumulators (sumsq_avx512.cpp): identical bits, fewer
// instructions per byte; DGG_FUSED_CPU_ISA=portable|avx2|avx512 overrides the run-time choice.
// Threads (at::parallel_for) only decide *who* computes a chunk, never how it is summed.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DGG_X86 1
#endif

#include "dgg_fused.h"
#include "sumsq_cpu.h"

extern "C" {
// An importable, empty Python module: importing dgg_fused._C runs the static op registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace dgg {
namespace {

constexpr int64_t kChunk = int64_t(1) << 16;  // elements per deterministic work item
constexpr int64_t kBlock = cpu::kSumsqBlock;  // elements per float32 block sum
constexpr int kLanes = 32;

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// Portable block sum (SSE2 baseline; GCC vectorises the lane loop at -O3 without reassociating anything).
template <typename T>
float block_sumsq_portable(const T* p, int64_t n) {
  float lanes[kLanes] = {0.0f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float x = to_float(p[i + j]);
      lanes[j] += x * x;
    }
  }
  float tail = 0.0f;
  for (; i < n; ++i) {
    const float x = to_float(p[i]);
    tail += x * x;
  }
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) lanes[j] += lanes[j + w];
  return lanes[0] + tail;
}

#ifdef DGG_X86
#define DGG_AVX2 __attribute__((target("avx2,fma,f16c")))
DGG_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
DGG_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Shared end of both AVX2 block kernels: the four accumulators in a fixed tree, plus the scalar tail [i, n).
template <typename T>
DGG_AVX2 inline float finish_block(__m256 a0, __m256 a1, __m256 a2, __m256 a3, const T* p, int64_t i, int64_t n) {
  float tail = 0.0f;
  for (; i < n; ++i) {
    const float x = to_float(p[i]);
    tail += x * x;
  }
  const __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a1, a3));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h) + tail;
}

template <typename T>
DGG_AVX2 float block_sumsq_avx2(const T* p, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    if constexpr (cpu::kPrefetchBytes<T> > 0)
      _mm_prefetch(reinterpret_cast<const char*>(p + i) + cpu::kPrefetchBytes<T>, _MM_HINT_T0);
    const __m256 x0 = load8(p + i), x1 = load8(p + i + 8), x2 = load8(p + i + 16), x3 = load8(p + i + 24);
    a0 = _mm256_fmadd_ps(x0, x0, a0);
    a1 = _mm256_fmadd_ps(x1, x1, a1);
    a2 = _mm256_fmadd_ps(x2, x2, a2);
    a3 = _mm256_fmadd_ps(x3, x3, a3);
  }
  return finish_block(a0, a1, a2, a3, p, i, n);
}

// bf16: one 32-byte load holds 16 values; (v << 16) is the even ones as float32, (v & 0xffff0000) the odd ones.
// Two integer ops per 16 values instead of a widening shuffle per 8 (the order of the terms changes, not the sum
// of squares' meaning).
template <>
DGG_AVX2 float block_sumsq_avx2<c10::BFloat16>(const c10::BFloat16* p, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    _mm_prefetch(reinterpret_cast<const char*>(p + i) + cpu::kPrefetchBytes<c10::BFloat16>, _MM_HINT_T0);
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 16));
    const __m256 x0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
    const __m256 x1 = _mm256_castsi256_ps(_mm256_and_si256(v0, hi_mask));
    const __m256 x2 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
    const __m256 x3 = _mm256_castsi256_ps(_mm256_and_si256(v1, hi_mask));
    a0 = _mm256_fmadd_ps(x0, x0, a0);
    a1 = _mm256_fmadd_ps(x1, x1, a1);
    a2 = _mm256_fmadd_ps(x2, x2, a2);
    a3 = _mm256_fmadd_ps(x3, x3, a3);
  }
  return finish_block(a0, a1, a2, a3, p, i, n);
}
#endif

// isa: cpu::sumsq_isa(), read once per op call. AVX-512 (sumsq_avx512.cpp) gives the same bits as AVX2.
template <typename T>
double chunk_sumsq(const T* p, int64_t n, cpu::Isa isa) {
  double acc = 0.0;
#ifdef DGG_X86
  if (isa == cpu::kAvx512) return cpu::chunk_sumsq_avx512(p, n);
  if (isa == cpu::kAvx2) {
    for (int64_t b = 0; b < n; b += kBlock) acc += block_sumsq_avx2(p + b, std::min(kBlock, n - b));
    return acc;
  }
#endif
  for (int64_t b = 0; b < n; b += kBlock) acc += block_sumsq_portable(p + b, std::min(kBlock, n - b));
  return acc;
}

double chunk_sumsq_any(const void* base, at::ScalarType dt, int64_t offset, int64_t n, cpu::Isa isa) {
  switch (dt) {
    case at::kFloat:
      return chunk_sumsq(static_cast<const float*>(base) + offset, n, isa);
    case at::kBFloat16:
      return chunk_sumsq(static_cast<const c10::BFloat16*>(base) + offset, n, isa);
    case at::kHalf:
      return chunk_sumsq(static_cast<const c10::Half*>(base) + offset, n, isa);
    default:
      TORCH_CHECK(false, "dgg_fused::_C_sumsq: unsupported dtype ", dt);
  }
}

}  // namespace

void check_sumsq_inputs(const at::TensorList& tensors) {
  TORCH_CHECK(!tensors.empty(), "dgg_fused::_C_sumsq: need at least one tensor");
  const auto dev = tensors[0].device();
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device() == dev, "dgg_fused::_C_sumsq: all tensors must be on one device, got ", dev, " and ",
                t.device());
    const auto dt = t.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                "dgg_fused::_C_sumsq: expected float32/bfloat16/float16 tensors, got ", dt);
    TORCH_CHECK(t.layout() == at::kStrided, "dgg_fused::_C_sumsq: expected strided tensors");
  }
}

namespace {
at::Tensor sumsq_cpu(at::TensorList tensors) {
  check_sumsq_inputs(tensors);
  const cpu::Isa isa = cpu::sumsq_isa();
  // Dense (contiguous or merely permuted) tensors are read in place: a sum of squares does not care about order.
  // Anything else (strided slices, expanded views) is copied once; documented in docs/kernels.md.
  std::vector<at::Tensor> dense;
  dense.reserve(tensors.size());
  for (const auto& t : tensors) {
    if (t.numel() == 0) continue;
    dense.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
  }
  std::vector<int64_t> first_task(dense.size() + 1, 0);
  for (size_t i = 0; i < dense.size(); ++i)
    first_task[i + 1] = first_task[i] + (dense[i].numel() + kChunk - 1) / kChunk;
  const int64_t n_tasks = first_task.back();
  std::vector<double> partial(static_cast<size_t>(n_tasks), 0.0);
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const size_t i = std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
      const int64_t chunk = task - first_task[i];
      const int64_t off = chunk * kChunk;
      const int64_t n = std::min(kChunk, dense[i].numel() - off);
      partial[task] = chunk_sumsq_any(dense[i].data_ptr(), dense[i].scalar_type(), off, n, isa);
    }
  };
  if (n_tasks > 1) {
    at::parallel_for(0, n_tasks, 1, run);
  } else {
    run(0, n_tasks);
  }
  double total = 0.0;
  for (const double v : partial) total += v;
  at::Tensor out = at::empty({}, tensors[0].options().dtype(at::kFloat));
  *out.data_ptr<float>() = static_cast<float>(total);
  return out;
}

void check_state(const at::Tensor& t, at::ScalarType dt, const char* name, int64_t numel) {
  TORCH_CHECK(t.scalar_type() == dt, "dgg_fused::_C_gate_epilogue: ", name, " must be ", dt, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "dgg_fused::_C_gate_epilogue: ", name, " must be contiguous");
  TORCH_CHECK(numel < 0 || t.numel() == numel, "dgg_fused::_C_gate_epilogue: ", name, " must have ", numel,
              " elements, got ", t.numel());
}

}  // namespace

GateArgs make_gate_args(const at::Tensor& partials, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& external_skip, const at::Tensor& window,
                        const at::Tensor& filled, const at::Tensor& prev_energy, const at::Tensor& reuse_index,
                        const at::Tensor& stopped, const at::Tensor& counters, const at::Tensor& last,
                        const at::Tensor& skip, double tau, double std_floor, int64_t statistic, int64_t reference) {
  TORCH_CHECK(window.dim() == 2 && window.size(0) == 2 && window.size(1) >= 1,
              "dgg_fused::_C_gate_epilogue: window must be (2, W)");
  check_state(partials, at::kFloat, "partials", -1);
  TORCH_CHECK(partials.numel() >= 1, "dgg_fused::_C_gate_epilogue: partials must not be empty");
  check_state(window, at::kFloat, "window", -1);
  check_state(filled, at::kLong, "filled", 2);
  check_state(prev_energy, at::kFloat, "prev_energy", 1);
  check_state(reuse_index, at::kLong, "reuse_index", 1);
  check_state(stopped, at::kBool, "stopped", 1);
  check_state(counters, at::kLong, "counters", 3);
  check_state(last, at::kFloat, "last", 4);
  check_state(skip, at::kFloat, "skip", 1);
  if (grad_scale.has_value()) check_state(*grad_scale, at::kFloat, "grad_scale", 1);
  if (external_skip.has_value()) check_state(*external_skip, at::kFloat, "external_skip", 1);
  TORCH_CHECK(statistic >= 0 && statistic <= 2, "dgg_fused::_C_gate_epilogue: bad statistic code ", statistic);
  TORCH_CHECK(reference >= 0 && reference <= 2, "dgg_fused::_C_gate_epilogue: bad reference code ", reference);
  const auto dev = window.device();
  for (const at::Tensor* t : {&partials, &filled, &prev_energy, &reuse_index, &stopped, &counters, &last, &skip})
    TORCH_CHECK(t->device() == dev, "dgg_fused::_C_gate_epilogue: all tensors must be on ", dev);
  GateArgs a;
  a.partials = partials.data_ptr<float>();
  a.n_partials = partials.numel();
  a.grad_scale = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  a.external_skip = external_skip.has_value() ? external_skip->data_ptr<float>() : nullptr;
  a.window = window.data_ptr<float>();
  a.W = window.size(1);
  a.filled = filled.data_ptr<int64_t>();
  a.prev_energy = prev_energy.data_ptr<float>();
  a.reuse_index = reuse_index.data_ptr<int64_t>();
  a.stopped = stopped.data_ptr<bool>();
  a.counters = counters.data_ptr<int64_t>();
  a.last = last.data_ptr<float>();
  a.skip = skip.data_ptr<float>();
  a.tau = static_cast<float>(tau);
  a.std_floor = static_cast<float>(std_floor);
  a.statistic = statistic;
  a.reference = reference;
  return a;
}

namespace {
void gate_epilogue_cpu(const at::Tensor& partials, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& external_skip, const at::Tensor& window,
                       const at::Tensor& filled, const at::Tensor& prev_energy, const at::Tensor& reuse_index,
                       const at::Tensor& stopped, const at::Tensor& counters, const at::Tensor& last,
                       const at::Tensor& skip, double tau, double std_floor, int64_t statistic, int64_t reference) {
  const GateArgs a = make_gate_args(partials, grad_scale, external_skip, window, filled, prev_energy, reuse_index,
                                    stopped, counters, last, skip, tau, std_floor, statistic, reference);
  gate_update(a);
}
}  // namespace

}  // namespace dgg

TORCH_LIBRARY_FRAGMENT(dgg_fused, m) {
  m.def("_C_sumsq(Tensor[] tensors) -> Tensor");
  m.def(
      "_C_gate_epilogue(Tensor partials, Tensor? grad_scale, Tensor? external_skip, Tensor(a!) window, "
      "Tensor(b!) filled, Tensor(c!) prev_energy, Tensor reuse_index, Tensor(d!) stopped, Tensor(e!) counters, "
      "Tensor(f!) last, Tensor(g!) skip, float tau, float std_floor, int statistic, int reference) -> ()");
}

TORCH_LIBRARY_IMPL(dgg_fused, CPU, m) {
  m.impl("_C_sumsq", &dgg::sumsq_cpu);
  m.impl("_C_gate_epilogue", &dgg::gate_epilogue_cpu);
}
