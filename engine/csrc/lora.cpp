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
#include <type_traits>
#include <vector>

namespace {

// Fixed-width vectors (GCC/Clang vector extensions: one AVX-512 register, two AVX2 ones). The shrink's
// sums are written out lane by lane, so a token's arithmetic is fixed by this code and not by how the
// compiler vectorises a loop: the same for a token alone and for one computed beside three others
// (tokens of other requests that share its adapter). A request's tokens depend on nothing but itself.
using vfloat = float __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;
constexpr int64_t kTokens = 4;  // tokens per pass of the shrink: each row of A loaded once for four
constexpr int64_t kExpandBlock = 4 * kLanes;  // output columns the expand keeps in registers at once
constexpr int64_t kPrefetchRuns = 2;  // slot runs whose weights are prefetched ahead of the one computing

inline vfloat load(const float* p) {
  vfloat v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// The lanes' sum as a fixed tree of halves (16 -> 8 -> 4 -> 1): the same order for every token, and a
// few independent adds instead of a chain of 15 dependent ones.
using vfloat8 = float __attribute__((vector_size(32)));
using vfloat4 = float __attribute__((vector_size(16)));

inline float lanes_sum(vfloat v) {
  vfloat8 lo8, hi8;
  __builtin_memcpy(&lo8, &v, sizeof(lo8));
  __builtin_memcpy(&hi8, reinterpret_cast<const char*>(&v) + sizeof(lo8), sizeof(hi8));
  const vfloat8 s8 = lo8 + hi8;
  vfloat4 lo4, hi4;
  __builtin_memcpy(&lo4, &s8, sizeof(lo4));
  __builtin_memcpy(&hi4, reinterpret_cast<const char*>(&s8) + sizeof(lo4), sizeof(hi4));
  const vfloat4 s4 = lo4 + hi4;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// h[t * R + r] = A[r] . x[t] for `n` (<= kTokens) tokens and every row of A [R, in] (float).
void shrink(const float* const* xs, int64_t n, const float* a, int64_t rank, int64_t in, float* h) {
  const int64_t body = in - in % kLanes;
  for (int64_t r = 0; r < rank; ++r) {
    const float* ar = a + r * in;
    vfloat acc[kTokens] = {};
    for (int64_t i = 0; i < body; i += kLanes) {
      const vfloat av = load(ar + i);
      for (int64_t t = 0; t < n; ++t) acc[t] += av * load(xs[t] + i);
    }
    for (int64_t t = 0; t < n; ++t) {
      float dot = lanes_sum(acc[t]);
      for (int64_t i = body; i < in; ++i) dot += ar[i] * xs[t][i];
      h[t * rank + r] = dot;
    }
  }
}

// A run of tokens [begin, end) that share slot s (a prefill segment, or decode tokens sorted by slot):
//   out[t, offset:offset+W] += scale * (B @ (A @ x[t])).
// The expand reads B^T [R, W] (R contiguous multiply-adds over the output row). When the slots store
// B transposed (b_transposed: lora_b is a [S, W, R] view of [S, R, W] memory, engine/adapter_slots.py)
// float rows are read in place; otherwise B[s] is converted / transposed into bt once per run (mixed
// decode steps have runs of one or two tokens, where a transpose cost as much as the expand itself).
template <typename T>
void lora_run(const T* x, T* out, const T* lora_a, const T* lora_b, bool b_transposed, float scale, int64_t s,
              int64_t begin, int64_t end, int64_t in, int64_t width, int64_t rank, int64_t out_stride,
              int64_t offset, std::vector<float>& xf, std::vector<float>& af, std::vector<float>& bt,
              std::vector<float>& hf, std::vector<float>& delta) {
  constexpr bool is_float = std::is_same<T, float>::value;
  const T* a = lora_a + s * rank * in;
  const T* b = lora_b + s * width * rank;
  const float* a_rows = nullptr;  // A [R, in]
  const float* b_rows = nullptr;  // B^T [R, W]
  if constexpr (is_float) {
    a_rows = a;
  } else {
    for (int64_t i = 0; i < rank * in; ++i) af[i] = static_cast<float>(a[i]);
    a_rows = af.data();
  }
  if (b_transposed && is_float) {
    b_rows = reinterpret_cast<const float*>(b);
  } else if (b_transposed) {
    for (int64_t i = 0; i < rank * width; ++i) bt[i] = static_cast<float>(b[i]);
    b_rows = bt.data();
  } else {
    for (int64_t o = 0; o < width; ++o)
      for (int64_t r = 0; r < rank; ++r) bt[r * width + o] = static_cast<float>(b[o * rank + r]);
    b_rows = bt.data();
  }
  float* d = delta.data();
  float* h = hf.data();  // [kTokens, R]
  for (int64_t t0 = begin; t0 < end; t0 += kTokens) {
    const int64_t n = std::min(kTokens, end - t0);
    const float* xs[kTokens];
    for (int64_t t = 0; t < n; ++t) {
      if constexpr (is_float) {
        xs[t] = x + (t0 + t) * in;
      } else {
        float* xt = xf.data() + t * in;
        for (int64_t i = 0; i < in; ++i) xt[i] = static_cast<float>(x[(t0 + t) * in + i]);
        xs[t] = xt;
      }
    }
    shrink(xs, n, a_rows, rank, in, h);
    for (int64_t t = 0; t < n; ++t) {
      // The reference's shrink output is in x's dtype: round the same way.
      float* ht = h + t * rank;
      for (int64_t r = 0; r < rank; ++r) ht[r] = static_cast<float>(static_cast<T>(ht[r]));
      // d = sum over r of h[r] * B^T[r], r ascending: blocks of kExpandBlock columns stay in registers
      // over all R rows (one store per block, not one per row), then the columns left over.
      int64_t o0 = 0;
      for (; o0 + kExpandBlock <= width; o0 += kExpandBlock) {
        vfloat acc[kExpandBlock / kLanes] = {};
        for (int64_t r = 0; r < rank; ++r) {
          const float hr = ht[r];
          const float* row = b_rows + r * width + o0;
          for (int64_t c = 0; c < kExpandBlock / kLanes; ++c) acc[c] += hr * load(row + c * kLanes);
        }
        __builtin_memcpy(d + o0, acc, sizeof(acc));
      }
      std::fill(d + o0, d + width, 0.0f);
      for (int64_t r = 0; r < rank && o0 < width; ++r) {
        const float hr = ht[r];
        const float* row = b_rows + r * width;
        for (int64_t o = o0; o < width; ++o) d[o] += hr * row[o];
      }
      T* dst = out + (t0 + t) * out_stride + offset;
      for (int64_t o = 0; o < width; ++o)
        dst[o] = static_cast<T>(dst[o] + static_cast<T>(static_cast<T>(d[o]) * static_cast<T>(scale)));
    }
  }
}

inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 2);
}

template <typename T>
void lora_rows(const T* x, T* out, const T* lora_a, const T* lora_b, bool b_transposed, const float* scaling,
               const int64_t* slots, int64_t begin, int64_t end, int64_t in, int64_t width, int64_t rank,
               int64_t out_stride, int64_t offset) {
  std::vector<float> xf(kTokens * in), af(std::is_same<T, float>::value ? 0 : rank * in), bt(rank * width),
      hf(kTokens * rank), delta(width);
  // Mixed decode steps have runs of one or two tokens, each with its own adapter's A and B (tens of
  // KB, in memory nobody touched since the last step): a cursor walks kPrefetchRuns runs ahead of the
  // one computing and prefetches their weights (the first ones before any computing starts).
  int64_t ahead = begin;  // the first token of the next run to prefetch
  auto prefetch_next_run = [&]() {
    if (ahead >= end) return;
    const int64_t s = slots[ahead];
    while (ahead < end && slots[ahead] == s) ++ahead;
    if (s >= 0) {
      prefetch_bytes(lora_a + s * rank * in, rank * in * static_cast<int64_t>(sizeof(T)));
      prefetch_bytes(lora_b + s * width * rank, rank * width * static_cast<int64_t>(sizeof(T)));
    }
  };
  for (int64_t i = 0; i < kPrefetchRuns; ++i) prefetch_next_run();
  for (int64_t t = begin; t < end;) {
    int64_t run_end = t + 1;
    while (run_end < end && slots[run_end] == slots[t]) ++run_end;
    prefetch_next_run();
    if (slots[t] >= 0)
      lora_run<T>(x, out, lora_a, lora_b, b_transposed, scaling[slots[t]], slots[t], t, run_end, in, width, rank,
                  out_stride, offset, xf, af, bt, hf, delta);
    t = run_end;
  }
}

// x [T, in]; out [T, >= offset + W] (rows contiguous); lora_a [S, R, in]; lora_b [S, W, R], contiguous or
// a transposed view of [S, R, W] memory (read in place); scaling [S] float32; token_slots [T] int64
// (-1: no adapter). Adds into out in place.
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
  const bool b_transposed = lora_b.stride(1) == 1 && lora_b.stride(2) == width && lora_b.stride(0) == width * rank;
  const at::Tensor xc = x.contiguous(), ac = lora_a.contiguous(), bc = b_transposed ? lora_b : lora_b.contiguous();
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
      lora_rows<T>(xp, op, ap, bp, b_transposed, scale, sp, begin, end, in, width, rank, out.stride(0),
                   slice_offset);
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
