// The OpenMP thread index of the caller (0 in a build without OpenMP): kernels keep per-thread
// work buffers in a vector indexed by it.
#pragma once

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ood_fast {

inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace ood_fast
