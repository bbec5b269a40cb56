// 16 float32 lanes as a GCC/Clang vector type: explicit SIMD without intrinsics.
//
// The compiler lowers each op to whatever the ISA has (one AVX-512 instruction, two AVX2 ones, four SSE
// ones); every op is elementwise IEEE float32 (no -ffast-math, -ffp-contract=off), so a kernel written
// with these gives the same bits on every x86 CPU. `hsum` adds lanes in a fixed tree, the same order
// as the scalar lane sums in fused_ops_cpu.h.
#pragma once
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace pdserve_vec {

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x2 __attribute__((vector_size(8)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef int8_t i8x16 __attribute__((vector_size(16)));

constexpr int64_t W = 16;

// v in every lane (a broadcast: `f32x16{} + v` would be an add, 0 + v, before it without -ffast-math).
inline f32x16 splat(float v) { return f32x16{v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v}; }

inline f32x16 lane_index() { return f32x16{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }

inline f32x16 loadu(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void storeu(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

// 16 values of a row as float32: bf16 widened exactly, int8 times its scale (rounded once, as x * s).
inline f32x16 widen(const float* p, float /*scale*/) { return loadu(p); }

inline f32x16 widen(const c10::BFloat16* p, float /*scale*/) {
#if defined(__AVX512F__)  // one zero-extending load (GCC splits the generic one into two 8-lane halves)
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (f32x16)_mm512_slli_epi32(wide, 16);
#endif
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  return (f32x16)(__builtin_convertvector(h, u32x16) << 16);
}

inline f32x16 widen(const int8_t* p, float scale) {
  i8x16 b;
  std::memcpy(&b, p, sizeof b);
  return __builtin_convertvector(b, f32x16) * scale;
}

// a * b + c rounded once where the CPU has FMA (every AVX2 and AVX-512 CPU), else twice: the same bits on
// every CPU of a kind, so the attention module and the decode step (built alike) agree.
inline f32x16 fmadd(f32x16 a, f32x16 b, f32x16 c) {
#if defined(__AVX512F__)
  return (f32x16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  const __m256 lo = _mm256_fmadd_ps((__m256)__builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7),
                                    (__m256)__builtin_shufflevector(b, b, 0, 1, 2, 3, 4, 5, 6, 7),
                                    (__m256)__builtin_shufflevector(c, c, 0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 hi = _mm256_fmadd_ps((__m256)__builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15),
                                    (__m256)__builtin_shufflevector(b, b, 8, 9, 10, 11, 12, 13, 14, 15),
                                    (__m256)__builtin_shufflevector(c, c, 8, 9, 10, 11, 12, 13, 14, 15));
  return __builtin_shufflevector((f32x8)lo, (f32x8)hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  return a * b + c;
#endif
}

inline float hmax(f32x16 v) {  // max is exact: any order gives the same value
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const f32x8 b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x8 c = a < b ? b : a;
  float m = c[0];
  for (int i = 1; i < 8; ++i) m = m < c[i] ? c[i] : m;
  return m;
}

inline float widen_one(float x, float /*scale*/) { return x; }
inline float widen_one(c10::BFloat16 x, float /*scale*/) { return static_cast<float>(x); }
inline float widen_one(int8_t x, float scale) { return static_cast<float>(x) * scale; }

inline float hsum(f32x16 v) {  // lanes j + (j + 8), then + (j + 4), + (j + 2), + (j + 1)
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const f32x2 c = __builtin_shufflevector(b, b, 0, 1) + __builtin_shufflevector(b, b, 2, 3);
  return c[0] + c[1];
}

// Sums of 16 vectors at once: lane i of the result is hsum(v[i]), added in hsum's tree (lanes j + (j + 8), then
// + (j + 4), + (j + 2), + (j + 1): the same bits), but transposed: each level adds two vectors' halves
// side by side, 15 adds and 30 two-source shuffles instead of 16 horizontal sums and scalar stores.
inline f32x16 hsum16(const f32x16* v) {
  f32x16 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // [x8 | y8]: x_j + x_{j+8}
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)  // [x4 | y4 | z4 | w4]: + (j + 4)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // eight tokens, 2 lanes each: + (j + 2)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// exp, lane by lane: the same operations as pdserve_fused::exp_f, so the same bits.
inline f32x16 exp16(f32x16 x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;
  x = splat(88.f) < x ? splat(88.f) : x;
  const f32x16 n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  f32x16 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  f32x16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const i32x16 bits = (__builtin_convertvector(n, i32x16) + 127) << 23;
  return p * (f32x16)bits;
}

}  // namespace pdserve_vec
