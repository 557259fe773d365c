// Mixed-adapter LoRA for the CPU in one call per projection: for every token t whose slot s >= 0,
//   out[t, offset : offset + W] += scaling[s] * (B[s] @ (A[s] @ x[t]))
// (shrink then expand, the formula of kernels/reference.py). Registered as torch.ops.loraserve.lora_apply
// beside paged_attention (engine/native_ops.py builds both); kernels/reference.py is the oracle.
//
// One token at a time, prefill rows and decode rows alike: a token reads only its own slot's A and B
// (S-LoRA / Punica's BGMV), so a batch-mate's adapter, NaN/Inf included, never reaches it, and base
// tokens (slot -1) are not touched at all. The torch reference pays ~15 small ops per projection per
// step; here it is one parallel loop.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// A run of tokens [begin, end) that share slot s (a prefill segment, or decode tokens sorted by slot).
template <typename T>
void lora_run(const T* x, T* out, const T* lora_a, const T* lora_b, float scale, int64_t s, int64_t begin,
              int64_t end, int64_t in, int64_t width, int64_t rank, int64_t out_stride, int64_t offset,
              std::vector<float>& xf, std::vector<float>& h, std::vector<float>& bt, std::vector<float>& delta) {
  const T* a = lora_a + s * rank * in;
  const T* b = lora_b + s * width * rank;
  // B[s] is [W, R]; as B^T [R, W] the expand is R contiguous multiply-adds over the output row. It is
  // transposed once per run, also for a run of one token: the arithmetic must not depend on which
  // batch-mates sit next to a token (a request's tokens depend on nothing but itself).
  for (int64_t o = 0; o < width; ++o)
    for (int64_t r = 0; r < rank; ++r) bt[r * width + o] = static_cast<float>(b[o * rank + r]);
  float* d = delta.data();
  for (int64_t t = begin; t < end; ++t) {
    const T* xt = x + t * in;
    for (int64_t i = 0; i < in; ++i) xf[i] = static_cast<float>(xt[i]);
    for (int64_t r = 0; r < rank; ++r) {
      const T* ar = a + r * in;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < in; ++i) dot += static_cast<float>(ar[i]) * xf[i];
      // The reference's shrink output is in x's dtype: round the same way.
      h[r] = static_cast<float>(static_cast<T>(dot));
    }
    std::fill(d, d + width, 0.0f);
    for (int64_t r = 0; r < rank; ++r) {
      const float hr = h[r];
      const float* row = bt.data() + r * width;
#pragma omp simd
      for (int64_t o = 0; o < width; ++o) d[o] += hr * row[o];
    }
    T* dst = out + t * out_stride + offset;
    for (int64_t o = 0; o < width; ++o)
      dst[o] = static_cast<T>(dst[o] + static_cast<T>(static_cast<T>(d[o]) * static_cast<T>(scale)));
  }
}

template <typename T>
void lora_rows(const T* x, T* out, const T* lora_a, const T* lora_b, const float* scaling, const int64_t* slots,
               int64_t begin, int64_t end, int64_t in, int64_t width, int64_t rank, int64_t out_stride,
               int64_t offset) {
  std::vector<float> xf(in), h(rank), bt(rank * width), delta(width);
  for (int64_t t = begin; t < end;) {
    int64_t run_end = t + 1;
    while (run_end < end && slots[run_end] == slots[t]) ++run_end;
    if (slots[t] >= 0)
      lora_run<T>(x, out, lora_a, lora_b, scaling[slots[t]], slots[t], t, run_end, in, width, rank, out_stride,
                  offset, xf, h, bt, delta);
    t = run_end;
  }
}

// x [T, in]; out [T, >= offset + W] (rows contiguous); lora_a [S, R, in]; lora_b [S, W, R];
// scaling [S] float32; token_slots [T] int64 (-1: no adapter). Adds into out in place.
void lora_apply(const at::Tensor& x, const at::Tensor& out, const at::Tensor& lora_a, const at::Tensor& lora_b,
                const at::Tensor& scaling, const at::Tensor& token_slots, int64_t slice_offset) {
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu() && lora_a.device().is_cpu() && lora_b.device().is_cpu(),
              "loraserve::lora_apply runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && lora_a.dim() == 3 && lora_b.dim() == 3, "x [T,in], out [T,out], "
              "lora_a [S,R,in], lora_b [S,W,R]");
  TORCH_CHECK(x.scalar_type() == out.scalar_type() && x.scalar_type() == lora_a.scalar_type() &&
                  x.scalar_type() == lora_b.scalar_type(), "x, out, lora_a and lora_b must share one dtype");
  const int64_t t_count = x.size(0), in = x.size(1), slots = lora_a.size(0), rank = lora_a.size(1);
  const int64_t width = lora_b.size(1);
  TORCH_CHECK(lora_a.size(2) == in && lora_b.size(0) == slots && lora_b.size(2) == rank, "lora shapes disagree");
  TORCH_CHECK(out.size(0) == t_count && slice_offset >= 0 && slice_offset + width <= out.size(1),
              "out is too narrow for the slice");
  TORCH_CHECK(out.stride(1) == 1, "out's rows must be contiguous");
  TORCH_CHECK(scaling.dim() == 1 && scaling.size(0) == slots && scaling.scalar_type() == at::kFloat,
              "scaling [S] float32");
  TORCH_CHECK(token_slots.dim() == 1 && token_slots.size(0) == t_count && token_slots.scalar_type() == at::kLong,
              "token_slots [T] int64");
  const at::Tensor xc = x.contiguous(), ac = lora_a.contiguous(), bc = lora_b.contiguous();
  const at::Tensor sc = scaling.contiguous(), tc = token_slots.contiguous();
  const int64_t* sp = tc.data_ptr<int64_t>();
  for (int64_t t = 0; t < t_count; ++t) TORCH_CHECK(sp[t] >= -1 && sp[t] < slots, "token slot out of range");
  const float* scale = sc.data_ptr<float>();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = xc.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const T* ap = ac.data_ptr<T>();
    const T* bp = bc.data_ptr<T>();
    // ~(R * (in + W)) multiply-adds per token: a few dozen tokens per task keep the threads' start-up cheap.
    at::parallel_for(0, t_count, 16, [&](int64_t begin, int64_t end) {
      lora_rows<T>(xp, op, ap, bp, scale, sp, begin, end, in, width, rank, out.stride(0), slice_offset);
    });
  };
  switch (x.scalar_type()) {
    case at::kFloat:
      run(float{});
      break;
    case at::kBFloat16:
      run(c10::BFloat16{});
      break;
    case at::kHalf:
      run(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "loraserve::lora_apply supports float32, bfloat16 and float16");
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraserve, m) {
  m.def(
      "lora_apply(Tensor x, Tensor(a!) out, Tensor lora_a, Tensor lora_b, Tensor scaling, Tensor token_slots, "
      "int slice_offset) -> ()");
}

TORCH_LIBRARY_IMPL(loraserve, CPU, m) { m.impl("lora_apply", &lora_apply); }
