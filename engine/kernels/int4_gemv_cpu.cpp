// int4 weight x int8 activation matmul for decode-shaped inputs (a few rows), on the CPU.
//
// y[m, n] = sum_k dequant(W)[n, k] * xq[m, k] * dx[m, k / 32], with
//   W:  int4 q in 0..15, w = q * scale + min per group of `gs` inputs (gs a multiple of 32);
//       scale and min are stored as float16 (GGUF's Q4_1 stores them so: exact for the default model);
//   x:  quantized here per block of 32 inputs, as llama.cpp's Q8_1: d = max|x| / 127, xq = round(x / d)
//       (round to nearest even, computed as x * (1 / d)), and the block's d * sum(xq).
// Per block of 32: the integer dot q . xq exactly in int32 (unsigned nibbles x signed int8: one
// AVX512-VNNI `vpdpbusd`, or AVX2 `vpmaddubsw` + `vpmaddwd`), then in float32
//   y += scale * d * dot + min * d * sum(xq).
//
// Packed layout (prepare_int4 in engine/quant/int4_kernel.py), for streaming: rows in tiles of 16; per
// tile, per group: 16 float16 scales, 16 float16 mins, then gs / 8 steps of [16 rows x 4 bytes], byte j
// of a row's 4 holding inputs k0 + j (low nibble) and k0 + 4 + j (high nibble). One 64-byte load is 8
// inputs of 16 rows; the integer dot lands per row in one int32 lane, no horizontal sums. A tile is
// read once for all activation rows (up to 4 at a time in registers, the tile stays in L1 for more).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstring>
#include <vector>
#include <cstdlib>
#include <sys/mman.h>

namespace {

constexpr int64_t TILE = 16;  // rows per tile
constexpr int64_t QB = 32;    // activation block

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define PD_ISA "avx512_vnni"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PD_ISA "avx2"
#else
#error "the int4 GEMV needs AVX512-VNNI or AVX2 + FMA + F16C; engine.quant.cpu keeps torch's op elsewhere"
#endif

// x [M, K] float32 -> xq int8 [M, K], d [M, K/32], and per group: d * sum(xq) summed over the group's blocks.
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t gs, int8_t* xq, float* d, float* gsum) {
  const int64_t nb = K / QB, per_group = gs / QB;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* src = x + m * K + b * QB;
      int8_t* dst = xq + m * K + b * QB;
      float amax = 0.f;
      bool finite = true;
      for (int i = 0; i < QB; ++i) {
        finite &= std::isfinite(src[i]);
        amax = std::fmax(amax, std::fabs(src[i]));
      }
      // A NaN or inf activation makes the block's scale NaN (and its codes 0), so every output it
      // reaches is NaN, as dequantize-then-matmul gives, instead of a finite number from casting NaN.
      const float db = finite ? amax / 127.f : std::numeric_limits<float>::quiet_NaN();
      const float id = finite && db != 0.f ? 1.f / db : 0.f;
      int sum = 0;
      for (int i = 0; i < QB; ++i) {
        const int q = finite ? static_cast<int>(std::nearbyint(src[i] * id)) : 0;  // ties to even, as torch.round
        dst[i] = static_cast<int8_t>(q);
        sum += q;
      }
      d[m * nb + b] = db;
      float& g = gsum[m * (nb / per_group) + b / per_group];
      if (b % per_group == 0) g = 0.f;
      g += db * static_cast<float>(sum);
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
using vecf = __m512;
using veci = __m512i;
inline veci dot_step(veci acc, const uint8_t* w, const int8_t* x) {
  const veci mask = _mm512_set1_epi8(0x0F);
  const veci v = _mm512_loadu_si512(w);
  int32_t xa, xb;
  std::memcpy(&xa, x, 4);
  std::memcpy(&xb, x + 4, 4);
  acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(v, mask), _mm512_set1_epi32(xa));
  return _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(v, 4), mask), _mm512_set1_epi32(xb));
}
inline vecf load_half16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
#endif

// One tile (16 output rows) for MB activation rows starting at m0.
template <int MB>
void tile_rows(const uint8_t* tile, const int8_t* xq, const float* d, const float* gsum, float* out,
               int64_t m0, int64_t K, int64_t gs, int64_t N, int64_t n0) {
  const int64_t G = K / gs, nb = K / QB, steps = gs / 8;
  const int64_t valid = std::min<int64_t>(TILE, N - n0);
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
  vecf y[MB];
  for (int m = 0; m < MB; ++m) y[m] = _mm512_setzero_ps();
  const uint8_t* p = tile;
  for (int64_t g = 0; g < G; ++g) {
    const vecf sw = load_half16(p), mw = load_half16(p + 32);
    p += 64;
    for (int64_t s0 = 0; s0 < steps; s0 += QB / 8) {  // one activation block: 4 steps of 8 inputs
      const int64_t k0 = g * gs + s0 * 8, b = k0 / QB;
      veci a0[MB], a1[MB];
      for (int m = 0; m < MB; ++m) a0[m] = a1[m] = _mm512_setzero_si512();
      for (int m = 0; m < MB; ++m) {
        const int8_t* xr = xq + (m0 + m) * K + k0;
        a0[m] = dot_step(a0[m], p, xr);
        a1[m] = dot_step(a1[m], p + 64, xr + 8);
        a0[m] = dot_step(a0[m], p + 128, xr + 16);
        a1[m] = dot_step(a1[m], p + 192, xr + 24);
      }
      p += 256;
      for (int m = 0; m < MB; ++m) {
        const vecf dot = _mm512_cvtepi32_ps(_mm512_add_epi32(a0[m], a1[m]));
        y[m] = _mm512_fmadd_ps(_mm512_mul_ps(dot, _mm512_set1_ps(d[(m0 + m) * nb + b])), sw, y[m]);
      }
    }
    for (int m = 0; m < MB; ++m) y[m] = _mm512_fmadd_ps(mw, _mm512_set1_ps(gsum[(m0 + m) * G + g]), y[m]);
  }
  const __mmask16 keep = valid == TILE ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
  for (int m = 0; m < MB; ++m) _mm512_mask_storeu_ps(out + (m0 + m) * N + n0, keep, y[m]);
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  // Two halves of 8 rows: each 64-byte step is [rows 0-7: 32 bytes][rows 8-15: 32 bytes].
  __m256 y[MB][2];
  for (int m = 0; m < MB; ++m) y[m][0] = y[m][1] = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const uint8_t* p = tile;
  for (int64_t g = 0; g < G; ++g) {
    const __m256 sw[2] = {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)),
                          _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 16)))};
    const __m256 mw[2] = {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 32))),
                          _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 48)))};
    p += 64;
    for (int64_t s0 = 0; s0 < steps; s0 += QB / 8) {
      const int64_t k0 = g * gs + s0 * 8, b = k0 / QB;
      __m256i acc[MB][2];
      for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
      for (int s = 0; s < 4; ++s) {
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_loadu_si256((const __m256i*)(p + s * 64 + h * 32));
          const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
          for (int m = 0; m < MB; ++m) {
            const int8_t* xr = xq + (m0 + m) * K + k0 + s * 8;
            int32_t xa, xb;
            std::memcpy(&xa, xr, 4);
            std::memcpy(&xb, xr + 4, 4);
            // u8 x s8 pairs: |15 * 127 * 2| fits int16, no saturation.
            const __m256i pl = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(xa));
            const __m256i ph = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xb));
            acc[m][h] = _mm256_add_epi32(acc[m][h], _mm256_madd_epi16(_mm256_add_epi16(pl, ph), ones));
          }
        }
      }
      p += 256;
      for (int m = 0; m < MB; ++m) {
        const __m256 dm = _mm256_set1_ps(d[(m0 + m) * nb + b]);
        for (int h = 0; h < 2; ++h)
          y[m][h] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[m][h]), dm), sw[h], y[m][h]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      const __m256 gm = _mm256_set1_ps(gsum[(m0 + m) * G + g]);
      for (int h = 0; h < 2; ++h) y[m][h] = _mm256_fmadd_ps(mw[h], gm, y[m][h]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    alignas(32) float buf[TILE];
    _mm256_store_ps(buf, y[m][0]);
    _mm256_store_ps(buf + 8, y[m][1]);
    std::memcpy(out + (m0 + m) * N + n0, buf, valid * sizeof(float));
  }
#endif
}

void check(const torch::Tensor& x, const torch::Tensor& packed, int64_t N, int64_t K, int64_t gs) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(),
              "int4 gemv: x must be a contiguous float32 [M, K] CPU tensor");
  TORCH_CHECK(x.size(1) == K, "int4 gemv: x has ", x.size(1), " inputs, the weight ", K);
  TORCH_CHECK(gs > 0 && gs % QB == 0 && K % gs == 0, "int4 gemv: the group size (", gs,
              ") must be a multiple of 32 that divides K (", K, ")");
  const int64_t tiles = (N + TILE - 1) / TILE;
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() &&
                  packed.numel() == tiles * (K / gs) * (64 + gs * 8),
              "int4 gemv: packed weight has ", packed.numel(), " bytes, expected ",
              tiles * (K / gs) * (64 + gs * 8), " for N=", N, " K=", K, " gs=", gs);
}

}  // namespace

// Activation quantization alone, as the matmul does it (for tests): (xq int8 [M, K], d float32 [M, K/32]).
std::vector<torch::Tensor> quantize_activations(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.size(1) % QB == 0,
              "quantize_activations: contiguous float32 [M, K] with K a multiple of 32");
  const int64_t M = x.size(0), K = x.size(1);
  auto xq = torch::empty({M, K}, torch::kInt8);
  auto d = torch::empty({M, K / QB}, torch::kFloat32);
  std::vector<float> gsum(M * (K / QB));
  quantize_rows(x.data_ptr<float>(), M, K, QB, xq.data_ptr<int8_t>(), d.data_ptr<float>(), gsum.data());
  return {xq, d};
}

// y [M, N] float32 = dequant(W) [N, K] times x [M, K] quantized per block of 32 to int8.
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor packed, int64_t N, int64_t K, int64_t gs) {
  check(x, packed, N, K, gs);
  const int64_t M = x.size(0), nb = K / QB, G = K / gs;
  auto out = torch::empty({M, N}, torch::kFloat32);
  std::vector<int8_t> xq(M * K);
  std::vector<float> d(M * nb), gsum(M * G);
  quantize_rows(x.data_ptr<float>(), M, K, gs, xq.data(), d.data(), gsum.data());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  float* y = out.data_ptr<float>();
  const int64_t tiles = (N + TILE - 1) / TILE, tile_bytes = G * (64 + gs * 8);
  at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* tile = w + t * tile_bytes;
      int64_t m0 = 0;
      for (; m0 + 4 <= M; m0 += 4) tile_rows<4>(tile, xq.data(), d.data(), gsum.data(), y, m0, K, gs, N, t * TILE);
      for (; m0 + 2 <= M; m0 += 2) tile_rows<2>(tile, xq.data(), d.data(), gsum.data(), y, m0, K, gs, N, t * TILE);
      for (; m0 < M; ++m0) tile_rows<1>(tile, xq.data(), d.data(), gsum.data(), y, m0, K, gs, N, t * TILE);
    }
  });
  return out;
}

// `bytes` of uninitialised memory, 2 MiB-aligned and advised for transparent huge pages before it is first
// touched: a decode step streams every weight once, and 4 KiB pages cost a TLB walk per 64 loads (15-25%
// of the GEMVs' time on the Zen 4 machine). engine/quant/int4_kernel.py packs many weights into one.
torch::Tensor hugepage_buffer(int64_t bytes) {
  TORCH_CHECK(bytes > 0, "hugepage_buffer: a positive size");
  constexpr size_t HUGE = size_t(2) << 20;
  const size_t size = (static_cast<size_t>(bytes) + HUGE - 1) / HUGE * HUGE;
  void* mem = std::aligned_alloc(HUGE, size);
  TORCH_CHECK(mem != nullptr, "hugepage_buffer: out of memory");
  madvise(mem, size, MADV_HUGEPAGE);  // advice only: without THP the buffer still serves
  return torch::from_blob(mem, {bytes}, [](void* p) { std::free(p); }, torch::kUInt8);
}

std::string isa() { return PD_ISA; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_gemv", &int4_gemv, "int4 weight x int8-quantized activations, decode-shaped (few rows)");
  m.def("quantize_activations", &quantize_activations, "the activation quantization int4_gemv applies");
  m.def("hugepage_buffer", &hugepage_buffer, "uninitialised bytes advised for transparent huge pages");
  m.def("isa", &isa, "the instruction set this build's inner loop uses");
}
