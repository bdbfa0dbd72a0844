// The DGG gate update as scalar code shared by the CPU op and the CUDA kernels (one thread runs it; for windows
// above 128 the CUDA block kernel supplies the O(W) parts through gate_update_with's Window).
//
// It mirrors dgg_fused/gate/reference.py (the reference) operation by operation, in float32 (the window's mean
// absolute value in float64, so that it cannot overflow), so the two agree to rounding of the window statistics
// (the reference sums with torch's reduction order, this sums left to right). Keep the two in step:
// tests/test_gate.py compares them on random and adversarial sequences.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DGG_HD __host__ __device__
#else
#define DGG_HD
#endif

namespace dgg {

// The codes of dgg_fused.config.Statistic / Reference (tests/test_gate.py parses these two lines and checks them).
enum Statistic : int64_t { kEnergy = 0, kIncrement = 1, kBoth = 2 };
enum Reference : int64_t { kFirstPass = 0, kAccepted = 1, kAll = 2 };

struct GateArgs {
  const float* partials;        // energy = sum of partials (left to right, in double), then float32
  int64_t n_partials;
  const float* grad_scale;      // nullable: energy /= grad_scale**2 (float32, as the reference does)
  const float* external_skip;   // nullable: > 0 means the caller drops the step anyway
  float* window;                // (2, W) row-major
  int64_t W;
  int64_t* filled;              // (2,)
  float* prev_energy;           // ()
  const int64_t* reuse_index;   // ()
  bool* stopped;                // ()
  int64_t* counters;            // (3,) steps, gated steps, stopped batches
  float* last;                  // (4,) energy, statistic, gated, skipped
  float* skip;                  // ()
  float tau;
  float std_floor;
  int64_t statistic;
  int64_t reference;
};

DGG_HD inline float clamp_min_f(float a, float b) { return a < b ? b : a; }  // torch.clamp: NaN stays NaN
DGG_HD inline bool finite_f(float x) { return x - x == 0.0f; }  // false for NaN and +-inf (no fast-math)

// Z-score of x against the last `filled` entries of row (see dgg_fused/gate/reference.py::zscore).
DGG_HD inline float zscore(const float* row, int64_t W, int64_t filled, float x, float std_floor) {
  const float tiny = 1.17549435082228750797e-38f;  // torch.finfo(torch.float32).tiny
  const int64_t first = W - filled;
  const float n = static_cast<float>(filled < 1 ? 1 : filled);
  double abs_sum = 0.0;  // float64: the sum of W finite float32 values cannot overflow
  for (int64_t j = first; j < W; ++j) abs_sum += fabs(static_cast<double>(row[j]));
  const float scale = clamp_min_f(static_cast<float>(abs_sum / static_cast<double>(n)), tiny);
  float v_sum = 0.0f;
  for (int64_t j = first; j < W; ++j) v_sum += row[j] / scale;
  const float mean = v_sum / n;
  float dev_sum = 0.0f;
  for (int64_t j = first; j < W; ++j) {
    const float d = row[j] / scale - mean;
    dev_sum += d * d;
  }
  const float stdv = sqrtf(dev_sum / n);
  const float denom = clamp_min_f(clamp_min_f(stdv, std_floor), tiny);
  const float z = (x / scale - mean) / denom;
  return filled >= 2 ? z : 0.0f;
}

DGG_HD inline void push(float* row, int64_t W, float x) {
  for (int64_t j = 0; j + 1 < W; ++j) row[j] = row[j + 1];
  row[W - 1] = x;
}

// Serial window helpers: the default of gate_update_with (the CPU op and the CUDA kernel for small windows).
struct SerialWindow {
  DGG_HD float z(const float* row, int64_t W, int64_t filled, float x, float std_floor) const {
    return zscore(row, W, filled, x, std_floor);
  }
  DGG_HD void push_row(float* row, int64_t W, float x) const { push(row, W, x); }
};

// The energy: partials summed left to right in double, rounded to float32, divided by grad_scale**2.
DGG_HD inline float gate_energy(const GateArgs& a) {
  double acc = 0.0;
  for (int64_t i = 0; i < a.n_partials; ++i) acc += static_cast<double>(a.partials[i]);
  float e = static_cast<float>(acc);
  if (a.grad_scale != nullptr) {
    const float s = *a.grad_scale;
    e = e / (s * s);
  }
  return e;
}

// The rule; `win` supplies the two O(W) parts (z-score of a row, push onto a row), so the CUDA kernel for large
// windows can compute them with a whole block while this scalar code runs once (csrc/cuda/kernels.cu).
template <class Window>
DGG_HD inline void gate_update_with(const GateArgs& a, const Window& win) {
  const float e = gate_energy(a);
  const bool finite = finite_f(e);
  const bool stopped_before = *a.stopped;
  bool observed = !stopped_before;
  if (a.external_skip != nullptr) observed = observed && !(*a.external_skip > 0.0f);
  const int64_t k = *a.reuse_index;
  const int64_t W = a.W;
  float* row_e = a.window;
  float* row_i = a.window + W;

  const float inc = e - *a.prev_energy;
  const bool inc_ok = finite_f(inc);
  const float z_e = win.z(row_e, W, a.filled[0], e, a.std_floor);
  const float z_i = win.z(row_i, W, a.filled[1], inc, a.std_floor);
  const bool full_e = a.filled[0] >= W;
  const bool full_i = a.filled[1] >= W;
  float z;
  bool full;
  if (a.statistic == kEnergy) {
    z = z_e;
    full = full_e;
  } else if (a.statistic == kIncrement) {
    z = inc_ok ? z_i : 0.0f;
    full = full_i;
  } else {  // both: fmax ignores a NaN
    z = fmaxf(z_e, z_i);
    full = full_e && full_i;
  }
  if (!finite) z = INFINITY;

  const bool active = (k > 1) && full && observed;
  const bool trip = active && (z > a.tau);
  const bool skipped = stopped_before || trip;

  bool enter;
  if (a.reference == kFirstPass) {
    enter = observed && (k == 1);
  } else if (a.reference == kAccepted) {
    enter = !skipped;
  } else {
    enter = observed;
  }
  const bool enter_e = enter && finite;
  const bool enter_i = enter && finite && inc_ok;
  if (enter_e) win.push_row(row_e, W, e);
  if (enter_i) win.push_row(row_i, W, inc);
  a.filled[0] = a.filled[0] + (enter_e ? 1 : 0) > W ? W : a.filled[0] + (enter_e ? 1 : 0);
  a.filled[1] = a.filled[1] + (enter_i ? 1 : 0) > W ? W : a.filled[1] + (enter_i ? 1 : 0);
  if (observed && finite) *a.prev_energy = e;
  *a.stopped = skipped;
  a.counters[0] += 1;
  a.counters[1] += skipped ? 1 : 0;
  a.counters[2] += trip ? 1 : 0;
  const float skip = skipped ? 1.0f : 0.0f;
  a.last[0] = e;
  a.last[1] = z;
  a.last[2] = trip ? 1.0f : 0.0f;
  a.last[3] = skip;
  *a.skip = skip;
}

DGG_HD inline void gate_update(const GateArgs& a) { gate_update_with(a, SerialWindow{}); }

}  // namespace dgg
