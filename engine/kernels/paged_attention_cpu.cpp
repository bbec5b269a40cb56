// The paged decode attention kernel (paged_attention_cpu.h) as its own module: the CPU backend's decode.
#include "paged_attention_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &pdserve_attention::paged_decode_attention, "decode attention over a paged KV pool (CPU)",
        pybind11::arg("q"), pybind11::arg("k_pool"), pybind11::arg("v_pool"), pybind11::arg("block_tables"),
        pybind11::arg("context_lens"), pybind11::arg("scale"), pybind11::arg("k_scale") = pybind11::none(),
        pybind11::arg("v_scale") = pybind11::none(),
        pybind11::call_guard<pybind11::gil_scoped_release>());  // pure C++: let other Python threads run
}
