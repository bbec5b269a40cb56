// The CPU backend's native kernels, one module: the paged decode attention (paged_attention_cpu.h), the fused
// elementwise ops (fused_ops_cpu.h) and the decode step of a Llama-family model in C++, no Python between
// its ops (DecodeStep below).
//
// The CPU's counterpart of the CUDA graphs (engine/cuda_graphs.py), driven by engine/compiled_step.py.
// A step of B rows (one new token per sequence) is one call:
//
//   x = embed[tokens]                                                    [B, hidden]
//   per layer:  h, res = add_rms_norm(x, res)                            fused (fused_ops_cpu.h)
//               qkv = h @ Wqkv (+ bias)                                  oneDNN, weight prepacked once
//               q, k = rope(q, k); K/V -> pool at each row's slot       fused (int8 pool: quantized)
//               a = paged attention over each row's blocks               paged_attention_cpu.h
//                   (the layer's scale, sliding window and logit softcap; its own RoPE table)
//               h, res = add_rms_norm(a @ Wo, res)
//               x = silu_mul(h @ Wgate_up) @ Wdown
//   logits = (add_rms_norm(x, res) @ Wlm).float()                        [B, vocab]
//
// The ops are the eager CPU forward's (engine/model/ops.py CPU_OPS, the CPU backend's attention), in the
// same order with the same roundings, so a step equals the eager one: bit for bit with float32 weights
// (at::linear, eager's own GEMM), and with bf16 weights up to the prepacked GEMM (oneDNN's
// mkldnn::_linear_pointwise, the op inductor's freezing emits) against eager's at::linear, which agree bit
// for bit on the CPUs we measured. Shapes are free: a step runs its B rows, no bucket, no padding.
// Slots and context lengths come from positions and block tables here (slot = table[p / BS] * BS + p % BS,
// length p + 1), so the caller passes only the decode state's rows.
#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <array>
#include <chrono>
#include <ctime>
#include <vector>

#include "fused_ops_cpu.h"
#include "paged_attention_cpu.h"

namespace {

using at::Tensor;
using pdserve_fused::add_rms_norm;

// y = x W^T + b: oneDNN on a weight packed once (torch.ops.mkldnn._reorder_linear_weight), else at::linear.
struct Linear {
  Tensor weight;
  c10::optional<Tensor> bias;
  bool packed = false;

  Tensor operator()(const Tensor& x) const {
    if (!packed) return at::linear(x, weight, bias);
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                         .typed<Tensor(const Tensor&, const Tensor&, const c10::optional<Tensor>&, c10::string_view,
                                       c10::List<c10::optional<at::Scalar>>, c10::optional<c10::string_view>)>();
    return op.call(x, weight, bias, "none", c10::List<c10::optional<at::Scalar>>(), c10::nullopt);
  }
};

// What a layer's attention does beyond the model's shapes (engine/attention/base.py AttentionSpec).
struct AttentionSpec {
  double scale;       // the softmax scale (1/sqrt(D), or the arch's query scale)
  int64_t window;     // sliding window (0: every position)
  double softcap;     // logit softcap (0: none)
  Tensor cos, sin;    // the layer's RoPE table [max_pos, D]
};

// Per-op time of profiled steps (DecodeStep.set_profiling): wall and calling-thread CPU seconds, summed. At one
// torch thread all of an op runs on the calling thread, so its CPU time is the op's work, whatever else runs.
enum Op { kEmbed, kNorm, kQkv, kRopeStore, kAttention, kOProj, kGateUp, kSiluMul, kDown, kLmHead, kNumOps };
constexpr const char* kOpNames[kNumOps] = {"embed", "rms_norm", "qkv_proj", "rope_store_kv", "attention", "o_proj",
                                           "gate_up_proj", "silu_mul", "down_proj", "lm_head"};

struct OpTimes {
  std::array<double, kNumOps> wall{}, cpu{};
  int64_t steps = 0;
};

inline double thread_cpu_s() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Adds the scope's time to `times` (nothing when it is null: profiling off costs a branch).
class OpScope {
 public:
  OpScope(OpTimes* times, Op op) : times_(times), op_(op) {
    if (times_ == nullptr) return;
    wall0_ = std::chrono::steady_clock::now();
    cpu0_ = thread_cpu_s();
  }
  ~OpScope() {
    if (times_ == nullptr) return;
    times_->wall[op_] += std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0_).count();
    times_->cpu[op_] += thread_cpu_s() - cpu0_;
  }

 private:
  OpTimes* times_;
  Op op_;
  std::chrono::steady_clock::time_point wall0_;
  double cpu0_ = 0;
};

struct Layer {
  Tensor input_norm, post_norm;
  c10::optional<Tensor> q_norm, k_norm;  // Qwen3: RMSNorm per head of q and k before RoPE
  Linear qkv, o, gate_up, down;
  AttentionSpec attn;
};

class DecodeStep {
 public:
  DecodeStep(Tensor embed, Tensor final_norm, Tensor lm_head, bool lm_head_packed, int64_t num_heads,
             int64_t num_kv_heads, int64_t head_dim, double eps)
      : embed_(std::move(embed)), final_norm_(std::move(final_norm)), lm_head_{std::move(lm_head), c10::nullopt,
        lm_head_packed}, H_(num_heads), KVH_(num_kv_heads), D_(head_dim), eps_(eps) {}

  void add_layer(Tensor input_norm, Tensor post_norm, c10::optional<Tensor> q_norm, c10::optional<Tensor> k_norm,
                 Tensor qkv, c10::optional<Tensor> qkv_bias, Tensor o, Tensor gate_up, Tensor down, bool packed,
                 double scale, int64_t window, double softcap, const Tensor& rope_cos, const Tensor& rope_sin) {
    TORCH_CHECK(rope_cos.size(-1) == D_, "the compiled step rotates whole heads (no partial rotary)");
    layers_.push_back(Layer{std::move(input_norm), std::move(post_norm), std::move(q_norm), std::move(k_norm),
                            Linear{std::move(qkv), std::move(qkv_bias), packed}, Linear{std::move(o), c10::nullopt, packed},
                            Linear{std::move(gate_up), c10::nullopt, packed}, Linear{std::move(down), c10::nullopt, packed},
                            AttentionSpec{scale, window, softcap, rope_cos.contiguous(), rope_sin.contiguous()}});
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // tokens, positions [B] int64; block_tables [B, W] (int32 or int64); pool [L, 2, NB, BS, KVH, D];
  // scales [L, 2, NB, BS, KVH] float32 for an int8 pool. -> logits [B, vocab] float32.
  Tensor forward(const Tensor& tokens, const Tensor& positions, const Tensor& block_tables, const Tensor& pool,
                 const c10::optional<Tensor>& scales) const {
    c10::InferenceMode guard;
    const int64_t B = tokens.size(0);
    TORCH_CHECK(positions.size(0) == B && block_tables.size(0) == B, "one position and block table per row");
    TORCH_CHECK(pool.dim() == 6 && pool.size(0) >= num_layers() && pool.size(4) == KVH_ && pool.size(5) == D_,
                "pool [L, 2, NB, BS, KVH, D] of this model");
    const bool int8_kv = pool.scalar_type() == at::kChar;
    TORCH_CHECK(!int8_kv || (scales.has_value() && scales->is_contiguous()), "an int8 pool needs its scales");
    const Tensor pos = positions.to(at::kLong).contiguous(), tables = block_tables.to(at::kLong).contiguous();
    const auto [slots, lens] = slots_and_lens(pos, tables, pool.size(3));
    OpTimes* times = profiling_ ? &times_ : nullptr;
    Tensor x, res, h, out;
    timed(times, kEmbed, [&] { x = at::embedding(embed_, tokens); });
    for (int64_t l = 0; l < num_layers(); ++l) {
      const Layer& L = layers_[l];
      timed(times, kNorm, [&] { std::tie(h, res) = norm(x, res, L.input_norm); });
      timed(times, kQkv, [&] { out = L.qkv(h); });
      const Tensor attn = attention(l, L, out, pos, slots, tables, lens, pool, scales, times);
      timed(times, kOProj, [&] { out = L.o(attn.view({B, H_ * D_})); });
      timed(times, kNorm, [&] { std::tie(h, res) = norm(out, res, L.post_norm); });
      timed(times, kGateUp, [&] { out = L.gate_up(h); });
      timed(times, kSiluMul, [&] { out = pdserve_fused::silu_mul(out); });
      timed(times, kDown, [&] { x = L.down(out); });
    }
    timed(times, kNorm, [&] { h = std::get<0>(norm(x, res, final_norm_)); });
    timed(times, kLmHead, [&] { out = lm_head_(h).to(at::kFloat); });
    if (times != nullptr) ++times->steps;
    return out;
  }

  // Profiling on: op times are summed from the next step on (from zero); off: nothing is timed.
  void set_profiling(bool on) {
    profiling_ = on;
    times_ = OpTimes{};
  }

  // {op: (wall s, thread CPU s)} summed over the profiled steps, and "steps": their number.
  pybind11::dict op_times() const {
    pybind11::dict out;
    for (int op = 0; op < kNumOps; ++op) out[kOpNames[op]] = pybind11::make_tuple(times_.wall[op], times_.cpu[op]);
    out["steps"] = times_.steps;
    return out;
  }

 private:
  static std::tuple<Tensor, Tensor> slots_and_lens(const Tensor& pos, const Tensor& tables, int64_t BS) {
    const int64_t B = pos.size(0), W = tables.size(1);
    Tensor slots = at::empty({B}, pos.options()), lens = at::empty({B}, pos.options());
    const int64_t *p = pos.data_ptr<int64_t>(), *tab = tables.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(p[b] >= 0 && p[b] / BS < W, "position ", p[b], " lies outside its block table");
      slots.data_ptr<int64_t>()[b] = tab[b * W + p[b] / BS] * BS + p[b] % BS;
      lens.data_ptr<int64_t>()[b] = p[b] + 1;
    }
    return {slots, lens};
  }

  template <typename F>
  static void timed(OpTimes* times, Op op, F&& fn) {
    OpScope scope(times, op);
    fn();
  }

  std::tuple<Tensor, Tensor> norm(const Tensor& x, const Tensor& res, const Tensor& w) const {
    return add_rms_norm(x, res.defined() ? c10::optional<Tensor>(res) : c10::nullopt, w, eps_);
  }

  // qkv [B, (H + 2 KVH) D] -> attention output [B, H, D]; this row's K/V are stored first.
  Tensor attention(int64_t l, const Layer& L, const Tensor& qkv, const Tensor& pos, const Tensor& slots,
                   const Tensor& tables, const Tensor& lens, const Tensor& pool, const c10::optional<Tensor>& scales,
                   OpTimes* times) const {
    const int64_t B = qkv.size(0);
    Tensor q = qkv.narrow(1, 0, H_ * D_).view({B, H_, D_});
    Tensor k = qkv.narrow(1, H_ * D_, KVH_ * D_).view({B, KVH_, D_});
    const Tensor v = qkv.narrow(1, (H_ + KVH_) * D_, KVH_ * D_);
    if (L.q_norm.has_value()) {
      q = std::get<0>(add_rms_norm(q.reshape({-1, D_}), c10::nullopt, *L.q_norm, eps_)).view({B, H_, D_});
      k = std::get<0>(add_rms_norm(k.reshape({-1, D_}), c10::nullopt, *L.k_norm, eps_)).view({B, KVH_, D_});
    }
    const Tensor k_cache = pool.select(0, l).select(0, 0), v_cache = pool.select(0, l).select(0, 1);
    c10::optional<Tensor> k_scale, v_scale;
    if (scales.has_value()) {
      k_scale = scales->select(0, l).select(0, 0);
      v_scale = scales->select(0, l).select(0, 1);
    }
    Tensor q_rot, k_rot, out;
    timed(times, kRopeStore, [&] {
      std::tie(q_rot, k_rot) = pdserve_fused::rope(q, k, L.attn.cos, L.attn.sin, pos);
      store(k_rot, k.size(0), k_cache, k_scale, slots);
      store(v, B, v_cache, v_scale, slots);
    });
    timed(times, kAttention, [&] {
      out = pdserve_attention::paged_decode_attention(q_rot, k_cache, v_cache, tables, lens, L.attn.scale, k_scale,
                                                      v_scale, L.attn.window, L.attn.softcap);
    });
    return out;
  }

  void store(const Tensor& rows, int64_t B, const Tensor& cache, const c10::optional<Tensor>& scale,
             const Tensor& slots) const {
    PD_DISPATCH_FLOAT_BF16(rows.scalar_type(), "store_kv", [&] {
      pdserve_fused::store_rows<scalar_t>(rows.data_ptr<scalar_t>(), rows.stride(0), KVH_, D_, slots.data_ptr<int64_t>(),
                                          B, cache.data_ptr(), scale.has_value() ? scale->data_ptr<float>() : nullptr);
    });
  }

  Tensor embed_, final_norm_;
  Linear lm_head_;
  int64_t H_, KVH_, D_;
  double eps_;  // RMSNorm epsilon
  std::vector<Layer> layers_;
  bool profiling_ = false;
  mutable OpTimes times_;
};

// k, v [T, KVH, D] (views allowed) into one layer's caches [NB, BS, KVH, D] at flat slots (< 0: skipped);
// int8 caches take scales [NB, BS, KVH] and are written quantized (engine/kv_quant.quantize_kv).
void store_kv(const Tensor& k_cache, const Tensor& v_cache, const Tensor& slots_in, const Tensor& k, const Tensor& v,
              const c10::optional<Tensor>& k_scale, const c10::optional<Tensor>& v_scale) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k.dim() == 3 && k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 &&
              v.stride(1) == v.size(2), "k, v [T, KVH, D] with contiguous heads");
  const bool int8_kv = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK(int8_kv == k_scale.has_value() && int8_kv == v_scale.has_value(), "scales exactly for an int8 cache");
  TORCH_CHECK(int8_kv || k_cache.scalar_type() == k.scalar_type(), "a float cache holds k's dtype");
  const Tensor slots = slots_in.to(at::kLong).contiguous();
  const int64_t T = k.size(0), KVH = k.size(1), D = k.size(2);
  PD_DISPATCH_FLOAT_BF16(k.scalar_type(), "store_kv", [&] {
    pdserve_fused::store_rows<scalar_t>(k.data_ptr<scalar_t>(), k.stride(0), KVH, D, slots.data_ptr<int64_t>(), T,
                                        k_cache.data_ptr(), int8_kv ? k_scale->data_ptr<float>() : nullptr);
    pdserve_fused::store_rows<scalar_t>(v.data_ptr<scalar_t>(), v.stride(0), KVH, D, slots.data_ptr<int64_t>(), T,
                                        v_cache.data_ptr(), int8_kv ? v_scale->data_ptr<float>() : nullptr);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using release = py::call_guard<py::gil_scoped_release>;  // pure C++: other Python threads run meanwhile
  m.def("paged_decode_attention", &pdserve_attention::paged_decode_attention,
        "decode attention over a paged KV pool (CPU)", py::arg("q"), py::arg("k_pool"), py::arg("v_pool"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"), py::arg("k_scale") = py::none(),
        py::arg("v_scale") = py::none(), py::arg("window") = 0, py::arg("softcap") = 0.0, release());
  m.def("add_rms_norm", &pdserve_fused::add_rms_norm, py::arg("x"), py::arg("residual"), py::arg("weight"),
        py::arg("eps"), release());
  m.def("rope", &pdserve_fused::rope, py::arg("q"), py::arg("k"), py::arg("cos"), py::arg("sin"),
        py::arg("positions"), release());
  m.def("silu_mul", &pdserve_fused::silu_mul, py::arg("gate_up"), release());
  m.def("store_kv", &store_kv, py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"), py::arg("k"), py::arg("v"),
        py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none(), release());
  m.def("exp", [](const Tensor& x) {
    Tensor xf = x.to(at::kFloat).contiguous(), out = at::empty_like(xf);
    for (int64_t i = 0; i < xf.numel(); ++i) out.data_ptr<float>()[i] = pdserve_fused::exp_f(xf.data_ptr<float>()[i]);
    return out;
  }, "exp_f elementwise (tests)");
  py::class_<DecodeStep>(m, "DecodeStep")
      .def(py::init<Tensor, Tensor, Tensor, bool, int64_t, int64_t, int64_t, double>(),
           py::arg("embed"), py::arg("final_norm"), py::arg("lm_head"), py::arg("lm_head_packed"),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("eps"))
      .def("add_layer", &DecodeStep::add_layer, py::arg("input_norm"), py::arg("post_norm"), py::arg("q_norm"),
           py::arg("k_norm"), py::arg("qkv"), py::arg("qkv_bias"), py::arg("o"), py::arg("gate_up"), py::arg("down"),
           py::arg("packed"), py::arg("scale"), py::arg("window"), py::arg("softcap"), py::arg("rope_cos"),
           py::arg("rope_sin"))
      .def_property_readonly("num_layers", &DecodeStep::num_layers)
      .def("set_profiling", &DecodeStep::set_profiling, py::arg("on"))
      .def("op_times", &DecodeStep::op_times)
      .def("forward", &DecodeStep::forward, py::arg("tokens"), py::arg("positions"), py::arg("block_tables"),
           py::arg("pool"), py::arg("scales") = py::none(), release());
}
