// Placeholder while the int8_linear kernels are written (issue 4): binds nothing yet.
#include <pybind11/pybind11.h>
namespace py = pybind11;
void bind_int8_linear(py::module_&) {}
