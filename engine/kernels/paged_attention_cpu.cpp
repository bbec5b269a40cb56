// Decode attention straight from the paged KV pool, on the CPU.
//
// One query token per sequence attends to its first context_lens[b] cached
// tokens, found through its block table: no gather of the cache into a
// padded tensor first, so each K and V value is read from memory once.
// With a sliding window W > 0 only the last W of them (blocks before are never
// read: a freed block's table entry may be -1); with softcap c > 0 each score s
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
// Work is split over sequences; a token's K (or V) row for all kv heads is
// contiguous in the pool and is read once for all query heads. Two passes:
// scores (q . k) for all tokens, then softmax and the weighted sum of V.
// Accumulation in float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <cmath>
#include <limits>
#include <vector>

template <typename T>
static inline float to_f(T x) { return static_cast<float>(x); }

// One token's row (all kv heads) as float32; `scales` (one per kv head) only for int8 pools.
template <typename KV>
static inline void load_row(const KV* src, const float* /*scales*/, float* dst, int64_t KVH, int64_t D) {
  for (int64_t i = 0; i < KVH * D; ++i) dst[i] = to_f(src[i]);
}

static inline void load_row(const int8_t* src, const float* scales, float* dst, int64_t KVH, int64_t D) {
  for (int64_t h = 0; h < KVH; ++h) {
    const float s = scales[h];
    for (int64_t d = 0; d < D; ++d) dst[h * D + d] = static_cast<float>(src[h * D + d]) * s;
  }
}

template <typename T, typename KV>
static void decode_kernel(const T* q, const KV* k_pool, const KV* v_pool, const float* k_scale,
                          const float* v_scale, const int64_t* tables, const int64_t* lens, T* out,
                          int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t MB, float scale,
                          int64_t window, float softcap) {
  const int64_t G = H / KVH;
  const int64_t row = KVH * D;  // one token's K (or V) for all kv heads: contiguous
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(H * D), acc(H * D), rowf(row), scores;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t ctx = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;  // oldest key it sees
      const int64_t len = ctx - first;
      const int64_t* table = tables + b * MB;
      for (int64_t i = 0; i < H * D; ++i) qf[i] = to_f(q[b * H * D + i]) * scale;
      scores.resize(H * len);
      // Pass 1: scores[h][t] = q_h . k_t, reading each token's row once for all heads.
      for (int64_t t = 0; t < len; ++t) {
        const int64_t pos = first + t;
        const int64_t slot = table[pos / BS] * BS + pos % BS;
        load_row(k_pool + slot * row, k_scale ? k_scale + slot * KVH : nullptr, rowf.data(), KVH, D);
        for (int64_t h = 0; h < H; ++h) {
          const float* qh = qf.data() + h * D;
          const float* kh = rowf.data() + (h / G) * D;
          float s = 0.f;
          for (int64_t d = 0; d < D; ++d) s += qh[d] * kh[d];
          scores[h * len + t] = softcap > 0.f ? softcap * std::tanh(s / softcap) : s;
        }
      }
      for (int64_t h = 0; h < H; ++h) {  // softmax per query head
        float* sh = scores.data() + h * len;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < len; ++t) m = std::max(m, sh[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) { sh[t] = std::exp(sh[t] - m); sum += sh[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; ++t) sh[t] *= inv;
      }
      // Pass 2: out_h = sum_t p[h][t] * v_t
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const int64_t pos = first + t;
        const int64_t slot = table[pos / BS] * BS + pos % BS;
        load_row(v_pool + slot * row, v_scale ? v_scale + slot * KVH : nullptr, rowf.data(), KVH, D);
        for (int64_t h = 0; h < H; ++h) {
          const float p = scores[h * len + t];
          const float* vh = rowf.data() + (h / G) * D;
          float* ah = acc.data() + h * D;
          for (int64_t d = 0; d < D; ++d) ah[d] += p * vh[d];
        }
      }
      for (int64_t i = 0; i < H * D; ++i) out[b * H * D + i] = static_cast<T>(acc[i]);
    }
  });
}

template <typename T>
static void dispatch_kv(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                        const c10::optional<torch::Tensor>& k_scale, const c10::optional<torch::Tensor>& v_scale,
                        const torch::Tensor& tables, const torch::Tensor& lens, torch::Tensor& out,
                        int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t MB, float scale,
                        int64_t window, float softcap) {
  pybind11::gil_scoped_release no_gil;  // pure C++ from here: let other Python threads run
  if (k_pool.scalar_type() == torch::kInt8) {
    decode_kernel<T, int8_t>(q.data_ptr<T>(), k_pool.data_ptr<int8_t>(), v_pool.data_ptr<int8_t>(),
                             k_scale->data_ptr<float>(), v_scale->data_ptr<float>(), tables.data_ptr<int64_t>(),
                             lens.data_ptr<int64_t>(), out.data_ptr<T>(), B, H, KVH, D, BS, MB, scale, window, softcap);
  } else {
    decode_kernel<T, T>(q.data_ptr<T>(), k_pool.data_ptr<T>(), v_pool.data_ptr<T>(), nullptr, nullptr,
                        tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<T>(),
                        B, H, KVH, D, BS, MB, scale, window, softcap);
  }
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                                     c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                                     int64_t window, double softcap) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && v_pool.dim() == 4, "q [B,H,D], pools [NB,BS,KVH,D]");
  TORCH_CHECK(q.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous(), "inputs must be contiguous");
  const bool int8_kv = k_pool.scalar_type() == torch::kInt8;
  TORCH_CHECK(k_pool.scalar_type() == v_pool.scalar_type() && (int8_kv || q.scalar_type() == k_pool.scalar_type()),
              "dtype mismatch: pools must be q's dtype or int8");
  if (int8_kv) {
    TORCH_CHECK(k_scale.has_value() && v_scale.has_value(), "an int8 pool needs k_scale and v_scale");
    TORCH_CHECK(k_scale->scalar_type() == torch::kFloat32 && v_scale->scalar_type() == torch::kFloat32 &&
                k_scale->is_contiguous() && v_scale->is_contiguous(), "scales must be contiguous float32");
    TORCH_CHECK(k_scale->numel() * k_pool.size(3) == k_pool.numel() && v_scale->numel() * v_pool.size(3) == v_pool.numel(),
                "scales must be [NB, BS, KVH]");
  }
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && context_lens.scalar_type() == torch::kInt64,
              "block_tables and context_lens must be int64");
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_pool.size(1), KVH = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) == D, "head_dim mismatch");
  TORCH_CHECK(H % KVH == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(tables.size(0) == B && lens.size(0) == B, "one block table and length per sequence");
  auto out = torch::empty_like(q);
  const int64_t MB = tables.size(1);
  TORCH_CHECK(window >= 0 && softcap >= 0, "window and softcap must be >= 0 (0: off)");
  const float s = static_cast<float>(scale), cap = static_cast<float>(softcap);
  if (q.scalar_type() == torch::kFloat32) {
    dispatch_kv<float>(q, k_pool, v_pool, k_scale, v_scale, tables, lens, out, B, H, KVH, D, BS, MB, s, window, cap);
  } else if (q.scalar_type() == torch::kBFloat16) {
    dispatch_kv<c10::BFloat16>(q, k_pool, v_pool, k_scale, v_scale, tables, lens, out, B, H, KVH, D, BS, MB, s,
                               window, cap);
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16 queries");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV pool (CPU)",
        pybind11::arg("q"), pybind11::arg("k_pool"), pybind11::arg("v_pool"), pybind11::arg("block_tables"),
        pybind11::arg("context_lens"), pybind11::arg("scale"), pybind11::arg("k_scale") = pybind11::none(),
        pybind11::arg("v_scale") = pybind11::none(), pybind11::arg("window") = 0, pybind11::arg("softcap") = 0.0);
}
