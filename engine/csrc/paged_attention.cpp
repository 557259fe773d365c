// Paged attention for the CPU: every query row attends to its own sequence's cached K/V, read once,
// straight from the paged cache through the sequence's block table (no gather into a padded batch).
// Prefill rows (each at its own position: causal) and decode rows go through the same loop.
//
// Registered as torch.ops.loraserve.paged_attention; built on first use by engine/native_ops.py
// (torch.utils.cpp_extension) with the machine's compiler. The torch path in engine/attention.py is
// the reference and test oracle.
//
// Work items run in parallel (OpenMP, torch's thread count): one per query row and all its kv heads
// when there are rows enough (a cache slot's heads are adjacent, so each block is read front to back,
// which the memory system rewards), else one per (row, kv head). A kv head's query heads (GQA) share
// each K/V vector as it is read. Online softmax over the row's positions [lo, position], one cache
// block at a time, while the next block (whose address only the table knows) is prefetched. Only
// positions a sequence has written are read: nothing past the row's own position and nothing through
// another sequence's table row, so a batch-mate's NaN/Inf or a freed block's stale contents cannot
// reach the output (the isolation rule in engine/attention.py).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cephes_exp.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// exp for x <= 0 (all this file needs: scores minus their running maximum), ~2 ulp (cephes_exp.h).
inline float exp_nonpositive(float x) {
  const float value = loraserve::cephes_exp(x < -87.0f ? -87.0f : x);
  // NaN stays NaN (the comparisons are false); below -87 the true value is under 1.7e-38: 0.
  return x < -87.0f ? 0.0f : (x != x ? x : value);
}

// One block of scores -> their exp(score - new running max) in place; updates the running max `m`
// and denominator `l`, returns the factor that rescales what was accumulated before this block.
inline float softmax_block(float* sc, int64_t n, float& m, float& l) {
  float block_max = sc[0];
  for (int64_t j = 1; j < n; ++j) block_max = sc[j] > block_max || sc[j] != sc[j] ? sc[j] : block_max;
  const float new_max = m > block_max ? m : block_max;
  const float alpha = exp_nonpositive(m - new_max);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    sc[j] = exp_nonpositive(sc[j] - new_max);
    sum += sc[j];
  }
  l = l * alpha + sum;
  m = new_max;
  return alpha;
}

// 16-float vectors (GCC/Clang vector extensions): one AVX-512 register, two AVX2 ones, four NEON ones.
typedef float vec16 __attribute__((vector_size(64), aligned(4)));
typedef float vec8 __attribute__((vector_size(32), aligned(4)));
typedef float vec4 __attribute__((vector_size(16), aligned(4)));
constexpr int64_t kLanes = 16;

inline vec16 load16(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Sum of the lanes as a tree of halves (extract + add, not 15 dependent adds).
inline float hsum(vec16 v) {
  vec8 lo8, hi8;
  std::memcpy(&lo8, &v, sizeof(lo8));
  std::memcpy(&hi8, reinterpret_cast<const char*>(&v) + sizeof(lo8), sizeof(hi8));
  const vec8 s8 = lo8 + hi8;
  vec4 lo4, hi4;
  std::memcpy(&lo4, &s8, sizeof(lo4));
  std::memcpy(&hi4, reinterpret_cast<const char*>(&s8) + sizeof(lo4), sizeof(hi4));
  const vec4 s4 = lo4 + hi4;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

struct Shape {
  int64_t num_rows, num_heads, num_kv_heads, head_dim, group, block_size, max_blocks, num_blocks;
};

// Per-thread working memory, sized once per call for the largest item (all kv heads of one row).
struct Scratch {
  std::vector<float> q, acc, scores, m, l, kv_block;
  explicit Scratch(const Shape& s)
      : q(s.num_heads * s.head_dim),
        acc(s.num_heads * s.head_dim),
        scores(s.num_heads * s.block_size),
        m(s.num_heads),
        l(s.num_heads),
        kv_block(2 * s.block_size * s.num_kv_heads * s.head_dim) {}
};

// The n cache rows of one block chunk as float, heads [h0, h1) of each: float rows are used in place
// (row stride `stride`), others are converted into scratch (row stride (h1 - h0) * d). Returns the
// pointer to head h0 of the first row and sets `row_stride`.
template <typename T>
inline const float* chunk_as_float(const T* first, int64_t stride, int64_t n, int64_t width, float* scratch,
                                   int64_t& row_stride) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < width; ++i) scratch[j * width + i] = static_cast<float>(first[j * stride + i]);
  row_stride = width;
  return scratch;
}

template <>
inline const float* chunk_as_float<float>(const float* first, int64_t stride, int64_t /*n*/, int64_t /*width*/,
                                          float* /*scratch*/, int64_t& row_stride) {
  row_stride = stride;
  return first;
}

// Attention of one query row over its context, for kv heads [h0, h1) and their query heads.
// NV > 0: head_dim == NV * 16, explicit vectors; NV == 0: any head_dim, loops the compiler vectorises.
template <typename T, int NV>
void attend_item(const Shape& s, const T* q, const T* k_cache, const T* v_cache, const int64_t* table,
                 int64_t position, int64_t window, float scale, int64_t row, int64_t h0, int64_t h1, T* out,
                 Scratch& w) {
  const int64_t d = NV > 0 ? NV * kLanes : s.head_dim;
  const int64_t g_count = s.group, bs = s.block_size;
  const int64_t kv_stride = s.num_kv_heads * d;  // between consecutive cache slots
  const int64_t width = (h1 - h0) * d;           // floats of one slot this item reads
  const int64_t qh0 = h0 * g_count, qh1 = h1 * g_count;
  float* qs = w.q.data();  // [query head - qh0][d], pre-scaled
  float* accs = w.acc.data();
  float* scores = w.scores.data();  // [query head - qh0][bs]
  for (int64_t h = qh0; h < qh1; ++h) {
    const T* src = q + (row * s.num_heads + h) * d;
    float* dst = qs + (h - qh0) * d;
    for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]) * scale;
    w.m[h - qh0] = -std::numeric_limits<float>::infinity();
    w.l[h - qh0] = 0.0f;
  }
  std::fill(accs, accs + (qh1 - qh0) * d, 0.0f);
  float* k_scratch = w.kv_block.data();
  float* v_scratch = k_scratch + bs * width;
  const int64_t lo = window > 0 ? std::max<int64_t>(0, position - window + 1) : 0;
  for (int64_t start = lo; start <= position;) {
    const int64_t block = start / bs, offset = start % bs;
    const int64_t n = std::min(bs - offset, position - start + 1);
    const int64_t first = (table[block] * bs + offset) * kv_stride + h0 * d;
    int64_t k_stride = 0, v_stride = 0;
    const float* kb = chunk_as_float(k_cache + first, kv_stride, n, width, k_scratch, k_stride);
    const float* vb = chunk_as_float(v_cache + first, kv_stride, n, width, v_scratch, v_stride);
    // The next block's address comes from the table, not a stride the hardware could guess: its rows
    // are prefetched one per row of this block, spread through the passes below.
    const bool has_next = start + n <= position;
    const int64_t next = has_next ? table[(start + n) / bs] * bs * kv_stride + h0 * d : 0;
    const int64_t lines = (width * static_cast<int64_t>(sizeof(T)) + 63) / 64;
    if constexpr (NV > 0) {
      // K pass over the block's rows in memory order (all heads of a row are adjacent), then the
      // softmax per query head, then the V pass in the same order.
      for (int64_t j = 0; j < n; ++j) {
        if (has_next) {
          const char* kr = reinterpret_cast<const char*>(k_cache + next + j * kv_stride);
          for (int64_t c = 0; c < lines; ++c) __builtin_prefetch(kr + 64 * c);
        }
        for (int64_t h = h0; h < h1; ++h) {
          const float* k = kb + j * k_stride + (h - h0) * d;
          vec16 kv[NV];
          for (int c = 0; c < NV; ++c) kv[c] = load16(k + c * kLanes);
          for (int64_t g = 0; g < g_count; ++g) {
            const int64_t qi = (h - h0) * g_count + g;
            const float* qg = qs + qi * d;
            vec16 t = load16(qg) * kv[0];
            for (int c = 1; c < NV; ++c) t += load16(qg + c * kLanes) * kv[c];
            scores[qi * bs + j] = hsum(t);
          }
        }
      }
      for (int64_t qi = 0; qi < qh1 - qh0; ++qi) {
        const float alpha = softmax_block(scores + qi * bs, n, w.m[qi], w.l[qi]);
        float* acc = accs + qi * d;
        for (int64_t i = 0; i < d; ++i) acc[i] *= alpha;
      }
      for (int64_t j = 0; j < n; ++j) {
        if (has_next) {
          const char* vr = reinterpret_cast<const char*>(v_cache + next + j * kv_stride);
          for (int64_t c = 0; c < lines; ++c) __builtin_prefetch(vr + 64 * c);
        }
        for (int64_t h = h0; h < h1; ++h) {
          const float* v = vb + j * v_stride + (h - h0) * d;
          vec16 vv[NV];
          for (int c = 0; c < NV; ++c) vv[c] = load16(v + c * kLanes);
          for (int64_t g = 0; g < g_count; ++g) {
            const int64_t qi = (h - h0) * g_count + g;
            const float p = scores[qi * bs + j];
            float* acc = accs + qi * d;
            for (int c = 0; c < NV; ++c) {
              const vec16 a = load16(acc + c * kLanes) + p * vv[c];
              std::memcpy(acc + c * kLanes, &a, sizeof(a));
            }
          }
        }
      }
    } else {
      for (int64_t h = h0; h < h1; ++h) {
        const int64_t head_off = (h - h0) * d;
        for (int64_t g = 0; g < g_count; ++g) {
          const int64_t qi = (h - h0) * g_count + g;
          const float* qg = qs + qi * d;
          float* sc = scores + qi * bs;
          if constexpr (NV > 0) {
            vec16 qv[NV];
            for (int c = 0; c < NV; ++c) qv[c] = load16(qg + c * kLanes);
            for (int64_t j = 0; j < n; ++j) {
              const float* k = kb + j * k_stride + head_off;
              vec16 t = qv[0] * load16(k);
              for (int c = 1; c < NV; ++c) t += qv[c] * load16(k + c * kLanes);
              sc[j] = hsum(t);
            }
          } else {
            for (int64_t j = 0; j < n; ++j) {
              const float* k = kb + j * k_stride + head_off;
              float dot = 0.0f;
  #pragma omp simd reduction(+ : dot)
              for (int64_t i = 0; i < d; ++i) dot += qg[i] * k[i];
              sc[j] = dot;
            }
          }
          const float alpha = softmax_block(sc, n, w.m[qi], w.l[qi]);
          float* acc = accs + qi * d;
          if constexpr (NV > 0) {
            vec16 a[NV];
            for (int c = 0; c < NV; ++c) a[c] = load16(acc + c * kLanes) * alpha;
            for (int64_t j = 0; j < n; ++j) {
              const float* v = vb + j * v_stride + head_off;
              const float p = sc[j];
              for (int c = 0; c < NV; ++c) a[c] += p * load16(v + c * kLanes);
            }
            std::memcpy(acc, a, sizeof(a));
          } else {
  #pragma omp simd
            for (int64_t i = 0; i < d; ++i) acc[i] *= alpha;
            for (int64_t j = 0; j < n; ++j) {
              const float* v = vb + j * v_stride + head_off;
              const float p = sc[j];
  #pragma omp simd
              for (int64_t i = 0; i < d; ++i) acc[i] += p * v[i];
            }
          }
        }
      }
    }
    start += n;
  }
  for (int64_t h = qh0; h < qh1; ++h) {
    T* dst = out + (row * s.num_heads + h) * d;
    const float inv = 1.0f / w.l[h - qh0];
    const float* acc = accs + (h - qh0) * d;
    for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<T>(acc[i] * inv);
  }
}

template <typename T, int NV>
void attend_all(const Shape& s, const T* q, const T* k_cache, const T* v_cache, const int64_t* tables,
                const int64_t* row_seq, const int64_t* positions, int64_t window, float scale, T* out) {
  // A row's kv heads are one item when there are rows enough to keep every thread busy: its cache
  // rows are then read whole (all heads of a slot are adjacent). Few rows: one item per kv head.
  const int64_t threads = at::get_num_threads();
  const int64_t splits = s.num_rows >= 4 * threads ? 1 : s.num_kv_heads;
  const int64_t heads_per_item = s.num_kv_heads / splits;
  const int64_t items = s.num_rows * splits;
  // Items differ in length (each row's context), hence dynamic scheduling; torch's thread count.
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    Scratch w(s);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t row = item / splits, h0 = (item % splits) * heads_per_item;
      attend_item<T, NV>(s, q, k_cache, v_cache, tables + row_seq[row] * s.max_blocks, positions[row], window,
                         scale, row, h0, h0 + heads_per_item, out, w);
    }
  }
}

template <typename T>
void dispatch_head_dim(const Shape& s, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& tables, const at::Tensor& row_seq, const at::Tensor& positions,
                       int64_t window, double scale, at::Tensor& out) {
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* sp = row_seq.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  const float fs = static_cast<float>(scale);
  switch (s.head_dim) {
    case 16: return attend_all<T, 1>(s, qp, kp, vp, tp, sp, pp, window, fs, op);
    case 32: return attend_all<T, 2>(s, qp, kp, vp, tp, sp, pp, window, fs, op);
    case 64: return attend_all<T, 4>(s, qp, kp, vp, tp, sp, pp, window, fs, op);
    case 96: return attend_all<T, 6>(s, qp, kp, vp, tp, sp, pp, window, fs, op);
    case 128: return attend_all<T, 8>(s, qp, kp, vp, tp, sp, pp, window, fs, op);
    case 256: return attend_all<T, 16>(s, qp, kp, vp, tp, sp, pp, window, fs, op);
    default: return attend_all<T, 0>(s, qp, kp, vp, tp, sp, pp, window, fs, op);
  }
}

// q [T, H, D]; k_cache / v_cache [slots, Hkv, D] (one layer of the paged cache); block_tables [N, B]
// int64 (-1 past a sequence's last block); row_seq [T] int64: the table row of each query row;
// positions [T] int64: each row attends to its sequence's positions [lo, position], lo = 0 or
// position - sliding_window + 1 when sliding_window > 0. Returns [T, H, D] in q's dtype.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& row_seq, const at::Tensor& positions,
                           int64_t block_size, double scale, int64_t sliding_window) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "loraserve::paged_attention runs on the CPU");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "q [T,H,D], k/v cache [slots,Hkv,D]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k and v cache shapes differ");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q, k cache and v cache must share one dtype");
  TORCH_CHECK(q.size(2) == k_cache.size(2), "q and the cache differ in head_dim");
  TORCH_CHECK(k_cache.size(1) > 0 && q.size(1) % k_cache.size(1) == 0,
              "query heads must be a multiple of kv heads");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kLong, "block_tables [N,B] int64");
  TORCH_CHECK(row_seq.dim() == 1 && row_seq.scalar_type() == at::kLong && row_seq.size(0) == q.size(0),
              "row_seq [T] int64");
  TORCH_CHECK(positions.dim() == 1 && positions.scalar_type() == at::kLong && positions.size(0) == q.size(0),
              "positions [T] int64");
  TORCH_CHECK(block_size > 0 && k_cache.size(0) % block_size == 0, "cache slots must be whole blocks");
  const at::Tensor qc = q.contiguous(), kc = k_cache.contiguous(), vc = v_cache.contiguous();
  const at::Tensor tables = block_tables.contiguous(), seqs = row_seq.contiguous(), pos = positions.contiguous();
  Shape s{qc.size(0), qc.size(1), kc.size(1), qc.size(2), qc.size(1) / kc.size(1), block_size, tables.size(1),
          kc.size(0) / block_size};
  // Every block a row will read must be one of the cache's: a bad table is an error, never a stray read.
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* sp = seqs.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t row = 0; row < s.num_rows; ++row) {
    TORCH_CHECK(sp[row] >= 0 && sp[row] < tables.size(0), "row_seq out of range");
    TORCH_CHECK(pp[row] >= 0 && pp[row] / block_size < s.max_blocks, "position beyond the block table");
    const int64_t lo = sliding_window > 0 ? std::max<int64_t>(0, pp[row] - sliding_window + 1) : 0;
    for (int64_t b = lo / block_size; b <= pp[row] / block_size; ++b) {
      const int64_t block = tp[sp[row] * s.max_blocks + b];
      TORCH_CHECK(block >= 0 && block < s.num_blocks, "block table entry out of range");
    }
  }
  at::Tensor out = at::empty_like(qc);
  if (s.num_rows == 0) return out;
  switch (qc.scalar_type()) {
    case at::kFloat:
      dispatch_head_dim<float>(s, qc, kc, vc, tables, seqs, pos, sliding_window, scale, out);
      break;
    case at::kBFloat16:
      dispatch_head_dim<c10::BFloat16>(s, qc, kc, vc, tables, seqs, pos, sliding_window, scale, out);
      break;
    case at::kHalf:
      dispatch_head_dim<c10::Half>(s, qc, kc, vc, tables, seqs, pos, sliding_window, scale, out);
      break;
    default:
      TORCH_CHECK(false, "loraserve::paged_attention supports float32, bfloat16 and float16");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(loraserve, m) {
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor row_seq, "
      "Tensor positions, int block_size, float scale, int sliding_window) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraserve, CPU, m) { m.impl("paged_attention", &paged_attention); }
