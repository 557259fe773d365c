// The decoder layer's pointwise work for the CPU, one pass over memory per op instead of one per
// torch op: RMSNorm (with the residual add before it), rotary embedding of q and k, SiLU(gate) * up.
//
// Why: in float32 on the CPU the projections run near the machine's peak (oneDNN), and what is
// left between them is a dozen small torch ops per layer (mul, add, pow, mean, rsqrt, cat, neg,
// silu): each reads and writes the whole activation, and once a tensor passes torch's parallel
// grain (32,768 elements: 57 rows of a 576-wide model) each also starts a parallel region. Fused,
// each op reads its inputs once and writes its outputs once, and runs single-threaded until the
// work is worth the threads.
//
// Registered as torch.ops.loraserve.{rms_norm, add_rms_norm, rope_qk, silu_mul}; built with the
// other native ops by engine/native_ops.py. The torch reference is engine/pointwise.py (same
// arithmetic, the oracle in tests/test_pointwise.py). float32 only: other dtypes take the torch path.
//
// NaN and Inf propagate as in the reference (no fast-math): a bad row stays bad, and since every
// op works row by row, it cannot reach another row.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cephes_exp.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

namespace {

// Rows per parallel task: about 64K floats of work, so a decode batch of a small model runs on one
// thread (a parallel region costs more than the whole op there) and a prefill chunk on all.
inline int64_t grain_rows(int64_t row_floats) {
  constexpr int64_t kTaskFloats = 1 << 16;
  return row_floats >= kTaskFloats ? 1 : kTaskFloats / row_floats;
}

// One row's RMSNorm, as the reference computes it: out = weight * (x * rsqrt(mean(x^2) + eps)).
inline void norm_row(const float* x, const float* weight, float* out, int64_t h, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < h; ++i) sum += x[i] * x[i];
  const float r = 1.0f / std::sqrt(sum / static_cast<float>(h) + eps);
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) out[i] = weight[i] * (x[i] * r);
}

void check_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "loraserve pointwise ops run on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "loraserve::rms_norm is float32 only");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && x.size(1) == weight.size(0), "x [T, H], weight [H]");
}

// x [T, H] -> RMSNorm(x) [T, H].
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const int64_t t_count = xc.size(0), h = xc.size(1);
  at::Tensor out = at::empty({t_count, h}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, t_count, grain_rows(h), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) norm_row(xp + t * h, wp, op + t * h, h, e);
  });
  return out;
}

// (x + residual) [T, H] -> (RMSNorm(x + residual), x + residual): the layer's residual add and the
// next norm in one pass. Both results are new tensors (nothing is changed in place).
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == at::kFloat && residual.device().is_cpu(),
              "residual must match x");
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous(), wc = weight.contiguous();
  const int64_t t_count = xc.size(0), h = xc.size(1);
  at::Tensor normed = at::empty({t_count, h}, xc.options());
  at::Tensor summed = at::empty({t_count, h}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* rp = rc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* np = normed.data_ptr<float>();
  float* sp = summed.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, t_count, grain_rows(2 * h), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* s = sp + t * h;
      const float* a = rp + t * h;
      const float* b = xp + t * h;
#pragma omp simd
      for (int64_t i = 0; i < h; ++i) s[i] = a[i] + b[i];
      norm_row(s, wp, np + t * h, h, e);
    }
  });
  return {normed, summed};
}

// Rotate-half rotary embedding (Hugging Face Llama's layout) of `heads` heads of one row.
inline void rope_heads(const float* src, float* dst, const float* cos, const float* sin, int64_t heads, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t hd = 0; hd < heads; ++hd) {
    const float* x = src + hd * d;
    float* y = dst + hd * d;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      y[i] = x[i] * cos[i] - x[i + half] * sin[i];
      y[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
    }
  }
}

// qkv [T, (H + Hkv + Hkv) * D] (the fused projection's output; rows may be strided), cos/sin [T, D]
// -> (q [T, H, D], k [T, Hkv, D]) rotated; v is left to the caller (a view of qkv).
std::tuple<at::Tensor, at::Tensor> rope_qk(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                           int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  TORCH_CHECK(qkv.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(),
              "loraserve pointwise ops run on the CPU");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "loraserve::rope_qk is float32 only");
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && head_dim > 0 && head_dim % 2 == 0, "bad head shape");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) >= (num_heads + num_kv_heads) * head_dim && qkv.stride(1) == 1,
              "qkv [T, >= (H + Hkv) * D] with contiguous rows");
  const int64_t t_count = qkv.size(0);
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == t_count && cos.size(1) == head_dim && cos.sizes() == sin.sizes(),
              "cos/sin [T, D]");
  const at::Tensor cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor q = at::empty({t_count, num_heads, head_dim}, qkv.options());
  at::Tensor k = at::empty({t_count, num_kv_heads, head_dim}, qkv.options());
  const float* src = qkv.data_ptr<float>();
  const int64_t stride = qkv.stride(0);
  const float* cp = cc.data_ptr<float>();
  const float* snp = sc.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  const int64_t q_width = num_heads * head_dim, k_width = num_kv_heads * head_dim;
  at::parallel_for(0, t_count, grain_rows(2 * (q_width + k_width)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* row = src + t * stride;
      const float* c = cp + t * head_dim;
      const float* s = snp + t * head_dim;
      rope_heads(row, qp + t * q_width, c, s, num_heads, head_dim);
      rope_heads(row + q_width, kp + t * k_width, c, s, num_kv_heads, head_dim);
    }
  });
  return {q, k};
}

// exp(x) for any float x, ~2 ulp (cephes_exp.h): NaN stays NaN, overflow gives +Inf, underflow 0.
inline float exp_any(float x) {
  const float value = loraserve::cephes_exp(x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x));
  const float inf = std::numeric_limits<float>::infinity();
  return x != x ? x : (x < -87.0f ? 0.0f : (x > 88.0f ? inf : value));
}

// gate_up [T, 2I] (gate columns, then up columns; rows may be strided) -> silu(gate) * up [T, I].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu(), "loraserve pointwise ops run on the CPU");
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat, "loraserve::silu_mul is float32 only");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.stride(1) == 1,
              "gate_up [T, 2I] with contiguous rows");
  const int64_t t_count = gate_up.size(0), width = gate_up.size(1) / 2, stride = gate_up.stride(0);
  at::Tensor out = at::empty({t_count, width}, gate_up.options());
  const float* src = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, t_count, grain_rows(3 * width), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* gate = src + t * stride;
      const float* up = gate + width;
      float* y = op + t * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) y[i] = gate[i] / (1.0f + exp_any(-gate[i])) * up[i];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rope_qk(Tensor qkv, Tensor cos, Tensor sin, int num_heads, int num_kv_heads, int head_dim) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraserve, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope_qk", &rope_qk);
  m.impl("silu_mul", &silu_mul);
}
