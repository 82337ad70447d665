// ood_fast._cuda: the torch-free CUDA backend. One bind_* function per hot path, each in its own
// file; this file only assembles the module. Functions take raw device pointers (Python ints) and
// a cudaStream_t (as an int); Python allocates every output with torch.
//
// The module is linked against the static CUDA runtime, so it imports on machines without a GPU
// or driver; only calls that touch the device fail there, with a RuntimeError.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

namespace py = pybind11;

void bind_mahalanobis(py::module_& m);
void bind_knn(py::module_& m);
void bind_hadamard(py::module_& m);

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "ood_fast CUDA kernels (pybind11, static CUDA runtime; raw device pointers + stream)";
  m.def("runtime_version", [] {
    int v = 0;
    cudaRuntimeGetVersion(&v);  // needs no driver
    return v;
  }, "CUDA runtime version the module was built with (e.g. 13000).");
  m.def("device_count", [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return n;
  }, "Number of CUDA devices this module's runtime sees (0 without a GPU or driver).");
  bind_mahalanobis(m);
  bind_knn(m);
  bind_hadamard(m);
}
