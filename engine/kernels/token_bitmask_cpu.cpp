// Grammar token bitmask applied to float32 logits in place, on the CPU.
//
//   logits   [B, V] float32, row-major
//   bitmask  [n, W] int32, W = ceil(V / 32): bit t % 32 of word t / 32 set = token t allowed
//   rows     [n] int64: the logits row bitmask row i masks
//
// Forbidden tokens become -inf. A word with all bits set (a run of 32 allowed tokens, most of a mask
// inside a JSON string) is skipped; a word with none set writes 32 -inf in a row. The torch path
// (unpack to a [n, V] bool mask, masked_fill) reads and writes every logit: 12.6 ms CPU at 64 x 49,152
// here, this 0.3 ms.
#include <torch/extension.h>
#include <cstdint>
#include <limits>

namespace {

void mask_row(float* row, const int32_t* words, int64_t V) {
  constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
  const int64_t W = (V + 31) / 32;
  for (int64_t w = 0; w < W; ++w) {
    const uint32_t bits = static_cast<uint32_t>(words[w]);
    if (bits == 0xFFFFFFFFu) continue;
    const int64_t base = w * 32;
    const int64_t n = V - base < 32 ? V - base : 32;
    if (bits == 0u) {
      for (int64_t b = 0; b < n; ++b) row[base + b] = NEG_INF;
      continue;
    }
    for (int64_t b = 0; b < n; ++b) {
      if (!((bits >> b) & 1u)) row[base + b] = NEG_INF;
    }
  }
}

}  // namespace

void apply_token_bitmask(torch::Tensor logits, torch::Tensor bitmask, torch::Tensor rows) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == torch::kFloat32 && logits.dim() == 2 &&
              logits.is_contiguous(), "logits must be a contiguous [B, V] float32 CPU tensor");
  TORCH_CHECK(bitmask.device().is_cpu() && bitmask.scalar_type() == torch::kInt32 && bitmask.dim() == 2 &&
              bitmask.is_contiguous(), "bitmask must be a contiguous [n, W] int32 CPU tensor");
  TORCH_CHECK(rows.scalar_type() == torch::kInt64 && rows.dim() == 1 && rows.size(0) == bitmask.size(0),
              "rows must be [n] int64");
  const int64_t B = logits.size(0), V = logits.size(1), n = bitmask.size(0), W = bitmask.size(1);
  TORCH_CHECK(W == (V + 31) / 32, "bitmask has ", W, " words per row; ", V, " tokens need ", (V + 31) / 32);
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(r[i] >= 0 && r[i] < B, "row ", r[i], " out of range");
  float* lp = logits.data_ptr<float>();
  const int32_t* bp = bitmask.data_ptr<int32_t>();
  // One thread: ~0.3 ms for 64 rows of 49,152, less than waking a thread team costs on a busy host.
  for (int64_t i = 0; i < n; ++i) mask_row(lp + r[i] * V, bp + i * W, V);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("apply_token_bitmask", &apply_token_bitmask, "logits[rows[i]] = -inf where bitmask[i] has a 0 bit");
}
