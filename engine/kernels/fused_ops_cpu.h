// The elementwise ops of a Llama-family forward, fused, on the CPU.
//
//   add_rms_norm   h = w * norm(x + residual), and x + residual      (torch: 7 ops, 3 passes)
//   rope           q, k rotated at each row's position              (torch: gather, cat, 3 ops per tensor)
//   store_kv       K/V rows into pool slots (an int8 pool: quantized as engine/kv_quant.py does)
//   silu_mul       SiLU(gate) * up of the fused gate_up projection  (torch: chunk, silu, mul)
//
// Used by the CPU backend's eager forward (engine/model/ops.py CPU_OPS) and by the compiled decode step
// (cpu_kernels.cpp), so the two run the same kernels and agree bit for bit.
//
// Rounding follows the torch reference (engine/model/ops.py torch_*): a value is rounded to the element
// type (bf16) wherever the reference's op writes a bf16 tensor, computed in float32 in between. The file is
// built without -ffast-math and with -ffp-contract=off (no FMA contraction), so RoPE, the residual add and
// the int8 quantization equal the reference bit for bit; the RMS sum of squares (16 lanes, fixed order:
// the same result on every ISA) and exp (exp_f below, <= 2 ulp) differ from torch's by rounding only.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// float32 and bfloat16 only: the dtypes the CPU forward runs in.
#define PD_DISPATCH_FLOAT_BF16(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace pdserve_fused {

using at::Tensor;

inline float load(float v) { return v; }
inline float load(c10::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T> inline T store(float f);
template <> inline float store<float>(float f) { return f; }
template <> inline c10::BFloat16 store<c10::BFloat16>(float f) {  // round to nearest even, as c10 does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t bits = f != f ? uint16_t(0x7FC0) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

// f rounded to T and back: where the reference writes a tensor of T.
template <typename T> inline float round_to(float f) { return load(store<T>(f)); }

// exp(x) in float32, vectorisable without -ffast-math: 2^n * p(r), r = x - n ln2 (Cephes' expf polynomial).
inline float exp_f(float x) {
  x = std::min(std::max(x, -87.f), 88.f);  // 2^n stays a normal float
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest (|x log2 e| < 2^22)
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

constexpr int64_t LANES = 16;

// One row: res_out = x + res (rounded to T; no res: x itself), out = w * round_T(res_out * rsqrt(mean sq + eps)).
template <typename T>
void add_rms_norm_row(const T* x, const T* res, const T* w, T* out, T* res_out, int64_t dim, float eps) {
  float acc[LANES] = {0.f};
  int64_t i = 0;
  for (; i + LANES <= dim; i += LANES) {
    for (int64_t j = 0; j < LANES; ++j) {
      float v = load(x[i + j]);
      if (res != nullptr) {
        v = round_to<T>(v + load(res[i + j]));
        res_out[i + j] = store<T>(v);
      }
      acc[j] += v * v;
    }
  }
  for (; i < dim; ++i) {
    float v = load(x[i]);
    if (res != nullptr) {
      v = round_to<T>(v + load(res[i]));
      res_out[i] = store<T>(v);
    }
    acc[i % LANES] += v * v;
  }
  for (int64_t width = LANES / 2; width > 0; width /= 2)
    for (int64_t j = 0; j < width; ++j) acc[j] += acc[j + width];
  const float r = 1.f / std::sqrt(acc[0] / static_cast<float>(dim) + eps);
  const T* s = res != nullptr ? res_out : x;
  for (int64_t k = 0; k < dim; ++k) out[k] = store<T>(load(w[k]) * round_to<T>(load(s[k]) * r));
}

// x [..., dim] (rows contiguous); residual like x or undefined. -> (w * norm(x + residual), x + residual)
inline std::tuple<Tensor, Tensor> add_rms_norm(const Tensor& x_in, const c10::optional<Tensor>& residual,
                                               const Tensor& weight, double eps) {
  const Tensor x = x_in.contiguous();
  const int64_t dim = x.size(-1), rows = x.numel() / std::max<int64_t>(dim, 1);
  TORCH_CHECK(weight.numel() == dim && weight.scalar_type() == x.scalar_type(), "weight [dim] in x's dtype");
  const bool has_res = residual.has_value() && residual->defined();
  const Tensor res = has_res ? residual->contiguous() : Tensor();
  TORCH_CHECK(!has_res || (res.sizes() == x.sizes() && res.scalar_type() == x.scalar_type()), "residual like x");
  Tensor out = at::empty_like(x), res_out = has_res ? at::empty_like(x) : x;
  const Tensor w = weight.contiguous();
  const float e = static_cast<float>(eps);
  PD_DISPATCH_FLOAT_BF16(x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = has_res ? res.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* ro = res_out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(dim, 1)), [&](int64_t b, int64_t e_) {
      for (int64_t r = b; r < e_; ++r)
        add_rms_norm_row<scalar_t>(xp + r * dim, rp ? rp + r * dim : nullptr, w.data_ptr<scalar_t>(), op + r * dim,
                                   ro + r * dim, dim, e);
    });
  });
  return {out, res_out};
}

// One head row of D: out = x * cos + rotate_half(x) * sin, each product and the sum rounded to T.
template <typename T>
inline void rope_row(const T* x, const T* cos, const T* sin, T* out, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; ++i) {
    const float rot = i < half ? -load(x[i + half]) : load(x[i - half]);
    out[i] = store<T>(round_to<T>(load(x[i]) * load(cos[i])) + round_to<T>(rot * load(sin[i])));
  }
}

// x: [T, heads, D] with any row stride (a view of the qkv projection); cos/sin [P, D]; pos [T] int64.
template <typename T>
void rope_rows(const T* x, int64_t row_stride, int64_t heads, int64_t D, const T* cos, const T* sin,
               const int64_t* pos, int64_t rows, T* out) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(heads * D, 1)), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int64_t h = 0; h < heads; ++h)
        rope_row(x + t * row_stride + h * D, cos + pos[t] * D, sin + pos[t] * D, out + (t * heads + h) * D, D);
  });
}

inline Tensor rope_one(const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& pos) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "x [T, heads, D], heads contiguous");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && cos.is_contiguous() && sin.is_contiguous(), "cos/sin [P, D]");
  Tensor out = at::empty(x.sizes(), x.options());
  PD_DISPATCH_FLOAT_BF16(x.scalar_type(), "rope", [&] {
    rope_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.size(1), x.size(2), cos.data_ptr<scalar_t>(),
                        sin.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(), x.size(0), out.data_ptr<scalar_t>());
  });
  return out;
}

// q [T, H, D], k [T, KVH, D] (views allowed); cos/sin [P, D]; positions [T]. -> rotated copies.
inline std::tuple<Tensor, Tensor> rope(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                       const Tensor& positions) {
  const Tensor pos = positions.to(at::kLong).contiguous();
  return {rope_one(q, cos, sin, pos), rope_one(k, cos, sin, pos)};
}

// One row of D values of T into int8 with one float32 scale (engine/kv_quant.quantize_kv, bit for bit).
template <typename T>
inline void quantize_row(const T* x, int64_t D, int8_t* q, float* scale) {
  constexpr float INV_QMAX = 1.f / 127.f, SCALE_FLOOR = static_cast<float>(1e-12);
  float amax = 0.f;
  for (int64_t i = 0; i < D; ++i) {
    const float a = std::fabs(load(x[i]));
    amax = (a > amax || a != a) ? a : amax;  // NaN propagates, as torch's amax does
  }
  const float s = (amax < SCALE_FLOOR ? SCALE_FLOOR : amax) * INV_QMAX;
  for (int64_t i = 0; i < D; ++i) {
    const float v = std::floor(load(x[i]) / s + 0.5f);
    q[i] = static_cast<int8_t>(std::min(std::max(v, -127.f), 127.f));
  }
  *scale = s;
}

// Rows [T, KVH, D] (row stride `stride`) into a pool layer [NB * BS, KVH, D] at slots (< 0: skipped); an int8
// pool (`scales` [NB * BS, KVH]) stores them quantized.
template <typename T>
void store_rows(const T* src, int64_t stride, int64_t KVH, int64_t D, const int64_t* slots, int64_t rows,
                void* cache, float* scales) {
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    for (int64_t h = 0; h < KVH; ++h) {
      const T* x = src + t * stride + h * D;
      if (scales != nullptr) {
        quantize_row(x, D, static_cast<int8_t*>(cache) + (slot * KVH + h) * D, scales + slot * KVH + h);
      } else {
        std::memcpy(static_cast<T*>(cache) + (slot * KVH + h) * D, x, D * sizeof(T));
      }
    }
  }
}

// gate_up [T, 2I] -> SiLU(gate) * up [T, I], SiLU rounded to T first (as torch's F.silu(gate) * up).
template <typename T>
void silu_mul_rows(const T* gu, int64_t rows, int64_t inter, T* out) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(inter, 1)), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const T* g = gu + t * 2 * inter;
      const T* u = g + inter;
      T* o = out + t * inter;
      for (int64_t i = 0; i < inter; ++i) {
        const float x = load(g[i]);
        o[i] = store<T>(round_to<T>(x / (1.f + exp_f(-x))) * load(u[i]));
      }
    }
  });
}

inline Tensor silu_mul(const Tensor& gate_up_in) {
  const Tensor gate_up = gate_up_in.contiguous();
  const int64_t two_i = gate_up.size(-1);
  TORCH_CHECK(two_i % 2 == 0, "gate_up's last dimension must be even");
  auto sizes = gate_up.sizes().vec();
  sizes.back() = two_i / 2;
  Tensor out = at::empty(sizes, gate_up.options());
  PD_DISPATCH_FLOAT_BF16(gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(), gate_up.numel() / two_i, two_i / 2, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace pdserve_fused
