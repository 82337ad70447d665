// Placeholder while the hadamard CUDA kernels are written (issue 4): binds nothing yet.
#include <pybind11/pybind11.h>
namespace py = pybind11;
void bind_hadamard(py::module_&) {}
