// ood_fast._C: the torch-free CPU backend. One bind_* function per hot path, each in its own
// file; this file only assembles the module and reports what the processor offers.
#include <pybind11/pybind11.h>

#include "simd.h"

namespace py = pybind11;

void bind_mahalanobis(py::module_& m);
void bind_knn(py::module_& m);
void bind_hadamard(py::module_& m);
void bind_int8_linear(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "ood_fast C++ CPU kernels (pybind11 + OpenMP; runtime instruction-set dispatch)";
  m.def("cpu_features", [] {
    py::dict d;
    d["avx2"] = ood_fast::cpu_has_avx2();
    d["avx512f"] = ood_fast::cpu_has_avx512f();
    d["avx512bf16"] = ood_fast::cpu_has_avx512bf16();
    d["avx512vnni"] = ood_fast::cpu_has_avx512vnni();
    d["amx_bf16"] = ood_fast::cpu_has_amx_bf16();
    return d;
  }, "Instruction-set extensions the kernels can use on this processor.");
  bind_mahalanobis(m);
  bind_knn(m);
  bind_hadamard(m);
  bind_int8_linear(m);
}
