// Decode attention straight from the paged KV pool, on the CPU.
//
// One query token per sequence attends to its first context_lens[b] cached
// tokens, found through its block table: no gather of the cache into a
// padded tensor first, so each K and V value is read from memory once.
// With a sliding window W > 0 only the last W of them (p - W < j <= p for the row at position p = len - 1;
// blocks before are never read: a freed block's table entry may be -1); with a softcap c > 0 each score s
// becomes c * tanh(s / c) before the softmax (Gemma 2).
//
//   q            [B, H, D]            float32 or bfloat16
//   k_pool/v_pool[NB, BS, KVH, D]     one layer's K or V (a view of the pool): q's dtype, or int8
//   k_scale/v_scale [NB, BS, KVH]     float32, int8 pools only (--kv-cache-dtype int8): value = q8 * scale
//   block_tables [B, MB] int64        physical block of each logical block
//   context_lens [B] int64
//   window       int (0: none), softcap float (0: none)
//   out          [B, H, D]
//
// An int8 pool is read as it is stored: each token's row is converted to float32 with its per-head
// scale while it is loaded (half the bytes of bf16 to read), nothing is dequantized up front.
//
// Work items are (sequence, chunk of 512 tokens), merged in order afterwards (flash-decoding's split-K):
// a long context spreads over threads, and the result depends on the context, never on the thread count.
// Within a chunk, one pass (online softmax) over runs of <= 16 slots of one block: the run's K rows (all
// kv heads, contiguous in the pool) are widened once into an L1 buffer and scored by every query head
// that shares them, its exps taken, then its V rows widened and accumulated; the next run's rows are
// prefetched meanwhile. Arithmetic in float32 through 16-lane vector types (vec16.h: no -ffast-math,
// FMA where the CPU has it, fixed summation trees), so a kernel gives the same bits on every run. The CPU
// backend calls it, and so does the compiled decode step (cpu_kernels.cpp); it runs without the GIL.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "fused_ops_cpu.h"
#include "vec16.h"

namespace pdserve_attention {

using namespace pdserve_vec;
using pdserve_fused::load;

constexpr int64_t CHUNK = 512;  // tokens per work item: a long context spreads over threads, a short one is one item

// `count` consecutive token rows (KVH heads of D values) from `src`, as float32 into dst [count, KVH, Dp]
// (lanes past D are 0; an int8 row times its per-head scales). Read in memory order: one stream per run.
template <typename KV>
void stage_rows(const KV* src, const float* scales, int64_t count, int64_t KVH, int64_t D, int64_t Dp, float* dst) {
  const int64_t full = D / W * W;
  for (int64_t r = 0; r < count * KVH; ++r) {
    const KV* x = src + r * D;
    float* y = dst + r * Dp;
    const float s = scales != nullptr ? scales[r] : 1.f;
    for (int64_t d = 0; d < full; d += W) storeu(y + d, widen(x + d, s));
    for (int64_t d = full; d < D; ++d) y[d] = widen_one(x[d], s);
  }
}

// Scores of GT query heads sharing kv head g against `count` (<= 16) staged rows:
// scores[j * 16 + i] = q_j . k_i (lanes past `count`: whatever the staging buffer held, masked by the caller).
// Per head, all 16 rows advance one vector at a time (16 independent FMA chains in registers, each in d order),
// then are reduced together (hsum16: one vector of scores, no horizontal sum per row); rows [16, KVH, C * 16].
template <int C, int GT>
void score_tile(const float* qf, const float* rows, int64_t /*count*/, int64_t KVH, int64_t g, float* scores) {
  for (int j = 0; j < GT; ++j) {
    f32x16 acc[W] = {};
    for (int c = 0; c < C; ++c) {
      const f32x16 q = loadu(qf + (j * C + c) * W);
      for (int i = 0; i < W; ++i) acc[i] = fmadd(q, loadu(rows + (i * KVH + g) * C * W + c * W), acc[i]);
    }
    storeu(scores + j * W, hsum16(acc));
  }
}

// o_j += p[j * 16 + i] * v_i over `count` (<= 16) staged rows, for GT heads sharing kv head g; o [GT, C * 16]
// stays in registers for the run.
template <int C, int GT>
void value_tile(const float* p, const float* rows, int64_t count, int64_t KVH, int64_t g, float* o) {
  f32x16 out[GT][C];
  for (int j = 0; j < GT; ++j)
    for (int c = 0; c < C; ++c) out[j][c] = loadu(o + (j * C + c) * W);
  for (int64_t i = 0; i < count; ++i) {
    const float* v = rows + (i * KVH + g) * C * W;
    for (int j = 0; j < GT; ++j) {
      const float pj = p[j * W + i];
      for (int c = 0; c < C; ++c) out[j][c] = fmadd(splat(pj), loadu(v + c * W), out[j][c]);
    }
  }
  for (int j = 0; j < GT; ++j)
    for (int c = 0; c < C; ++c) storeu(o + (j * C + c) * W, out[j][c]);
}

struct Tiles {
  void (*score)(const float*, const float*, int64_t, int64_t, int64_t, float*);
  void (*value)(const float*, const float*, int64_t, int64_t, int64_t, float*);
  int gt;  // query heads per tile
};

// Ask for `n` values from `p` into L2 while the current run computes: a run is one block's slots, blocks are
// scattered, so the hardware prefetcher cannot guess the next one (measured: 15-25% off a batch-64 step's
// attention when the pool is out of cache).
template <typename KV>
inline void prefetch_l2(const KV* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(KV)); off += 64) __builtin_prefetch(bytes + off, 0, 1);
}

// Attention of all H heads of one query row over tokens [t0, t1) of its sequence, unnormalised:
// m[h] = max_t s[h][t], l[h] = sum_t exp(s - m), o[h] = sum_t exp(s - m) v_t [H, Dp]. One pass (online
// softmax) over runs of at most 16 slots of one block: the run's K rows are staged as float32 and scored
// for all heads, the exps taken, then its V rows staged and added (a new maximum rescales o and l first).
// qf [H, Dp]: the query times the softmax scale; scratch: 2 * H * 16 + 16 * KVH * Dp floats.
template <typename KV>
void chunk_attention(const Tiles& tiles, const float* qf, const KV* k_pool, const KV* v_pool, const float* k_scale,
                     const float* v_scale, const int64_t* table, int64_t t0, int64_t t1, int64_t H, int64_t KVH,
                     int64_t D, int64_t Dp, int64_t BS, float softcap, float* scratch, float* m, float* l, float* o) {
  const int64_t G = H / KVH, gt = tiles.gt;
  float* p = scratch;                  // [H, 16]: scores, then their exps
  float* lanes = scratch + H * W;      // [H, 16]: the exps' sums, in lanes
  float* rows = scratch + 2 * H * W;   // [16, KVH, Dp]: the run's K, then V, as float32
  std::fill(m, m + H, -std::numeric_limits<float>::infinity());
  std::fill(lanes, lanes + H * W, 0.f);
  std::fill(o, o + H * Dp, 0.f);
  const int64_t row = KVH * D;
  for (int64_t t = t0; t < t1;) {
    const int64_t count = std::min({W, BS - t % BS, t1 - t}), slot = table[t / BS] * BS + t % BS;
    const int64_t after = t + count, next_count = std::min({W, BS - after % BS, t1 - after});
    const int64_t next = after < t1 ? table[after / BS] * BS + after % BS : -1;  // the next run's first slot
    if (next >= 0) prefetch_l2(k_pool + next * row, next_count * row);
    stage_rows(k_pool + slot * row, k_scale ? k_scale + slot * KVH : nullptr, count, KVH, D, Dp, rows);
    for (int64_t h = 0; h < H; h += gt) tiles.score(qf + h * Dp, rows, count, KVH, h / G, p + h * W);
    if (softcap > 0.f)  // c * tanh(s / c), as the reference caps the scaled scores
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < count; ++i) p[h * W + i] = softcap * std::tanh(p[h * W + i] / softcap);
    const auto live = lane_index() < splat(static_cast<float>(count));  // lanes of this run's tokens
    for (int64_t h = 0; h < H; ++h) {
      float* ph = p + h * W;
      const f32x16 s = live ? loadu(ph) : splat(-std::numeric_limits<float>::infinity());
      const float mx = std::max(m[h], hmax(s));
      if (mx > m[h]) {  // a new maximum: what was summed so far shrinks by exp(old - new)
        const float c = pdserve_fused::exp_f(m[h] - mx);
        for (int64_t d = 0; d < Dp; d += W) storeu(o + h * Dp + d, loadu(o + h * Dp + d) * c);
        storeu(lanes + h * W, loadu(lanes + h * W) * c);
        m[h] = mx;
      }
      const f32x16 e = live ? exp16(s - mx) : splat(0.f);  // lanes past the run add nothing
      storeu(ph, e);
      storeu(lanes + h * W, loadu(lanes + h * W) + e);
    }
    if (next >= 0) prefetch_l2(v_pool + next * row, next_count * row);
    stage_rows(v_pool + slot * row, v_scale ? v_scale + slot * KVH : nullptr, count, KVH, D, Dp, rows);
    for (int64_t h = 0; h < H; h += gt) tiles.value(p + h * W, rows, count, KVH, h / G, o + h * Dp);
    t += count;
  }
  for (int64_t h = 0; h < H; ++h) l[h] = hsum(loadu(lanes + h * W));
}

// GT: the most of a kv head's G query heads that share one pass (registers: GT * C accumulators <= 16).
inline int tile_heads(int64_t G, int64_t C) {
  for (int gt = 4; gt > 1; --gt)
    if (G % gt == 0 && gt * C <= 16) return gt;
  return 1;
}

template <int C, int GT>
Tiles tiles_of() { return {&score_tile<C, GT>, &value_tile<C, GT>, GT}; }

template <int C>
Tiles tiles_for_gt(int gt) {
  switch (gt) {
    case 4: return tiles_of<C, 4>();
    case 3: return tiles_of<C, 3>();
    case 2: return tiles_of<C, 2>();
    default: return tiles_of<C, 1>();
  }
}

// C: 16-lane vectors per head (head_dim rounded up to 16, 32, 64, 128 or 256).
inline Tiles tiles_for(int64_t C, int64_t G) {
  const int gt = tile_heads(G, C);
  switch (C) {
    case 1: return tiles_for_gt<1>(gt);
    case 2: return tiles_for_gt<2>(gt);
    case 4: return tiles_for_gt<4>(gt);
    case 8: return tiles_for_gt<8>(gt);
    case 16: return tiles_for_gt<16>(gt);
    default: TORCH_CHECK(false, "paged_decode_attention: head_dim must be at most 256, got ", C * W);
  }
}

// Work items are (sequence, chunk of CHUNK tokens); a sequence's chunks are merged in order afterwards
// (flash-decoding's split-K), so the result depends on the context length only, not on the thread count.
template <typename T, typename KV>
static void decode_kernel(const T* q, const KV* k_pool, const KV* v_pool, const float* k_scale,
                          const float* v_scale, const int64_t* tables, const int64_t* lens, T* out,
                          int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t MB, float scale,
                          int64_t window, float softcap) {
  // Dp: head_dim rounded up to a power-of-two number of 16-lane vectors (1, 2, 4, 8 or 16).
  int64_t C = 1;
  while (C * W < D) C *= 2;
  const int64_t Dp = C * W, G = H / KVH;
  const Tiles tiles = tiles_for(C, G);
  // Sequence b reads positions [oldest[b], lens[b]): all of them, or the last `window`.
  std::vector<int64_t> first(B + 1, 0), oldest(B, 0);  // items of sequence b: first[b] .. first[b + 1]
  for (int64_t b = 0; b < B; ++b) {
    oldest[b] = window > 0 ? std::max<int64_t>(0, lens[b] - window) : 0;
    first[b + 1] = first[b] + std::max<int64_t>(1, (lens[b] - oldest[b] + CHUNK - 1) / CHUNK);
  }
  const int64_t items = first[B], per_item = H * (Dp + 2);  // m [H], l [H], o [H, Dp]
  std::vector<float> partial(items * per_item);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(H * Dp, 0.f), scratch(2 * H * W + W * KVH * Dp, 0.f);
    int64_t b = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (int64_t it = begin; it < end; ++it) {
      while (it >= first[b + 1]) ++b;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) qf[h * Dp + d] = load(q[(b * H + h) * D + d]) * scale;
      const int64_t t0 = oldest[b] + (it - first[b]) * CHUNK, t1 = std::min(lens[b], t0 + CHUNK);
      float* part = partial.data() + it * per_item;  // m [H], l [H], o [H, Dp]
      chunk_attention(tiles, qf.data(), k_pool, v_pool, k_scale, v_scale, tables + b * MB, t0, t1, H, KVH, D, Dp,
                      BS, softcap, scratch.data(), part, part + H, part + 2 * H);
    }
  });
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {  // merge each sequence's chunks, in order
    std::vector<float> acc(Dp);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t it = first[b]; it < first[b + 1]; ++it) mx = std::max(mx, partial[it * per_item + h]);
        float sum = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t it = first[b]; it < first[b + 1]; ++it) {
          const float* part = partial.data() + it * per_item;
          const float w = pdserve_fused::exp_f(part[h] - mx);  // 1 exactly for the chunk holding the maximum
          sum += part[H + h] * w;
          const float* oh = part + 2 * H + h * Dp;
          for (int64_t d = 0; d < Dp; d += W) storeu(acc.data() + d, loadu(acc.data() + d) + loadu(oh + d) * w);
        }
        const float inv = 1.f / sum;
        for (int64_t d = 0; d < D; ++d) out[(b * H + h) * D + d] = pdserve_fused::store<T>(acc[d] * inv);
      }
    }
  });
}

template <typename T>
static void dispatch_kv(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale,
                        const at::Tensor& tables, const at::Tensor& lens, at::Tensor& out,
                        int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t MB, float scale,
                        int64_t window, float softcap) {
  if (k_pool.scalar_type() == at::kChar) {
    decode_kernel<T, int8_t>(q.data_ptr<T>(), k_pool.data_ptr<int8_t>(), v_pool.data_ptr<int8_t>(),
                             k_scale->data_ptr<float>(), v_scale->data_ptr<float>(), tables.data_ptr<int64_t>(),
                             lens.data_ptr<int64_t>(), out.data_ptr<T>(), B, H, KVH, D, BS, MB, scale, window, softcap);
  } else {
    decode_kernel<T, T>(q.data_ptr<T>(), k_pool.data_ptr<T>(), v_pool.data_ptr<T>(), nullptr, nullptr,
                        tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<T>(),
                        B, H, KVH, D, BS, MB, scale, window, softcap);
  }
}

inline at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_pool, at::Tensor v_pool,
                                     at::Tensor block_tables, at::Tensor context_lens, double scale,
                                     c10::optional<at::Tensor> k_scale, c10::optional<at::Tensor> v_scale,
                                     int64_t window = 0, double softcap = 0.0) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && v_pool.dim() == 4, "q [B,H,D], pools [NB,BS,KVH,D]");
  TORCH_CHECK(q.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous(), "inputs must be contiguous");
  const bool int8_kv = k_pool.scalar_type() == at::kChar;
  TORCH_CHECK(k_pool.scalar_type() == v_pool.scalar_type() && (int8_kv || q.scalar_type() == k_pool.scalar_type()),
              "dtype mismatch: pools must be q's dtype or int8");
  if (int8_kv) {
    TORCH_CHECK(k_scale.has_value() && v_scale.has_value(), "an int8 pool needs k_scale and v_scale");
    TORCH_CHECK(k_scale->scalar_type() == at::kFloat && v_scale->scalar_type() == at::kFloat &&
                k_scale->is_contiguous() && v_scale->is_contiguous(), "scales must be contiguous float32");
    TORCH_CHECK(k_scale->numel() * k_pool.size(3) == k_pool.numel() && v_scale->numel() * v_pool.size(3) == v_pool.numel(),
                "scales must be [NB, BS, KVH]");
  }
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_tables and context_lens must be int64");
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_pool.size(1), KVH = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) == D, "head_dim mismatch");
  TORCH_CHECK(H % KVH == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(tables.size(0) == B && lens.size(0) == B, "one block table and length per sequence");
  auto out = at::empty_like(q);
  const int64_t MB = tables.size(1);
  TORCH_CHECK(window >= 0 && softcap >= 0, "window and softcap must be >= 0 (0: off)");
  const float s = static_cast<float>(scale), cap = static_cast<float>(softcap);
  if (q.scalar_type() == at::kFloat) {
    dispatch_kv<float>(q, k_pool, v_pool, k_scale, v_scale, tables, lens, out, B, H, KVH, D, BS, MB, s, window, cap);
  } else if (q.scalar_type() == at::kBFloat16) {
    dispatch_kv<c10::BFloat16>(q, k_pool, v_pool, k_scale, v_scale, tables, lens, out, B, H, KVH, D, BS, MB, s,
                               window, cap);
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16 queries");
  }
  return out;
}

}  // namespace pdserve_attention
