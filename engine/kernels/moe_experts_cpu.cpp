// Mixture-of-experts grouped GEMV for decode on the CPU: bfloat16 weights and activations, float32 sums.
//
// y[r, n] = sum_k W[e, n, k] * x[r, k]   for the rows r of expert e, offsets[e] <= r < offsets[e + 1]
//
// x [R, K] holds the (token, expert) rows sorted by expert (engine/model/moe.py); W [E, N, K] is the stacked
// experts' projection as stored (w13 or w2). A decode step routes a few rows to each expert, so the cost
// is reading every active expert's weight once: torch's grouped_mm runs a oneDNN matmul per expert (a
// parallel region and a weight pass each, ~100 us for a 512x512 bf16 expert at 4 rows on the Zen 4
// machine). Here one parallel region covers all (expert, 16-output tile) tasks; a tile's rows of W are
// read once from memory and stay in L1 while up to 4 activation rows at a time multiply them with
// AVX512-BF16 `vdpbf16ps` (pairs of bf16 products summed into float32 lanes); each output's 16 lanes are
// summed at the end and rounded to bfloat16 to nearest even, as torch rounds a bf16 matmul's output.
// Only the float32 summation order differs from torch's.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int64_t TILE = 16;  // outputs per task
constexpr int64_t KB = 32;    // bf16 inputs per 512-bit load

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define PD_MOE_ISA "avx512_bf16"

// Rows r0..r0+MB of x against outputs n0..n0+valid of one expert's W; results as float32 into buf[MB][TILE].
template <int MB>
inline void tile_rows(const uint16_t* w, const uint16_t* x, int64_t K, int64_t r0, int64_t n0, int64_t valid,
                      float (*buf)[TILE]) {
  const int64_t full = K / KB * KB;
  const __mmask32 tail = K == full ? 0 : static_cast<__mmask32>((1ull << (K - full)) - 1);
  for (int64_t j = 0; j < valid; ++j) {
    const uint16_t* wr = w + (n0 + j) * K;
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < full; k += KB) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + k);
      for (int m = 0; m < MB; ++m)
        acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(x + (r0 + m) * K + k), wv);
    }
    if (tail) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + full);
      for (int m = 0; m < MB; ++m)
        acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_maskz_loadu_epi16(tail, x + (r0 + m) * K + full), wv);
    }
    for (int m = 0; m < MB; ++m) buf[m][j] = _mm512_reduce_add_ps(acc[m]);
  }
}

// buf rows -> bf16 outputs y[r0 + m, n0 .. n0 + valid), rounded to nearest even.
template <int MB>
inline void store_rows(float (*buf)[TILE], uint16_t* y, int64_t N, int64_t r0, int64_t n0, int64_t valid) {
  for (int m = 0; m < MB; ++m) {
    alignas(32) uint16_t out[TILE];
    _mm256_store_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(buf[m])));
    std::memcpy(y + (r0 + m) * N + n0, out, valid * sizeof(uint16_t));
  }
}

template <int MB>
inline void rows_block(const uint16_t* w, const uint16_t* x, uint16_t* y, int64_t N, int64_t K, int64_t r0,
                       int64_t n0, int64_t valid) {
  float buf[MB][TILE] = {};
  tile_rows<MB>(w, x, K, r0, n0, valid, buf);
  store_rows<MB>(buf, y, N, r0, n0, valid);
}

void expert_tile(const uint16_t* w, const uint16_t* x, uint16_t* y, int64_t N, int64_t K, int64_t begin,
                 int64_t end, int64_t n0) {
  const int64_t valid = std::min(TILE, N - n0);
  int64_t r = begin;
  for (; r + 4 <= end; r += 4) rows_block<4>(w, x, y, N, K, r, n0, valid);
  for (; r + 2 <= end; r += 2) rows_block<2>(w, x, y, N, K, r, n0, valid);
  for (; r < end; ++r) rows_block<1>(w, x, y, N, K, r, n0, valid);
}
#else
#define PD_MOE_ISA "none"
#endif

}  // namespace

// x [R, K] bf16 rows sorted by expert, w [E, N, K] bf16, offsets [E + 1] int64 -> y [R, N] bf16.
torch::Tensor grouped_gemv_bf16(torch::Tensor x, torch::Tensor w, torch::Tensor offsets) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous() && x.device().is_cpu(),
              "moe grouped gemv: x must be a contiguous bfloat16 [R, K] CPU tensor");
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous(),
              "moe grouped gemv: w must be a contiguous bfloat16 [E, N, K] tensor");
  TORCH_CHECK(w.size(2) == x.size(1), "moe grouped gemv: x has ", x.size(1), " inputs, the experts ", w.size(2));
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == w.size(0) + 1 && offsets.scalar_type() == torch::kInt64,
              "moe grouped gemv: offsets must be int64 [E + 1]");
  const int64_t E = w.size(0), N = w.size(1), K = w.size(2), R = x.size(0);
  const auto off = offsets.contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0 && o[E] == R, "moe grouped gemv: offsets must run from 0 to the ", R, " rows");
  auto y = torch::empty({R, N}, x.options());
#if defined(PD_MOE_ISA) && defined(__AVX512BF16__)
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (expert, first output) of every active expert's tiles
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(o[e + 1] >= o[e], "moe grouped gemv: offsets must not decrease");
    if (o[e + 1] > o[e])
      for (int64_t n0 = 0; n0 < N; n0 += TILE) tasks.emplace_back(e, n0);
  }
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  {
    pybind11::gil_scoped_release no_gil;  // pure C++ from here: let other Python threads run
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 8, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const auto [e, n0] = tasks[t];
        expert_tile(wp + e * N * K, xp, yp, N, K, o[e], o[e + 1], n0);
      }
    });
  }
#else
  TORCH_CHECK(false, "moe grouped gemv: built without AVX512-BF16");
#endif
  return y;
}

std::string isa() { return PD_MOE_ISA; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("grouped_gemv_bf16", &grouped_gemv_bf16, "experts' rows grouped by expert times their bf16 weights");
  m.def("isa", &isa, "the instruction set this build's inner loop uses ('none': not this CPU)");
}
