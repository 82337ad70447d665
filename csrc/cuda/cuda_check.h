// Error checking and small RAII helpers shared by the CUDA kernels of ood_fast._cuda.
//
// Every CUDA runtime call goes through OOD_CUDA_CHECK, and every launch is followed by
// OOD_CUDA_CHECK_LAUNCH: a failure throws std::runtime_error (Python: RuntimeError) carrying the
// CUDA error name and string. Argument errors throw std::invalid_argument (Python: ValueError).
//
// The module links the *static* CUDA runtime, which keeps its own per-thread state (current
// device, last error) apart from the runtime that torch loads; both share the driver's primary
// context, so device pointers and streams created by torch are valid here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

namespace ood_fast::cuda {

[[noreturn]] inline void throw_cuda(cudaError_t err, const char* what, const char* file, int line) {
  std::string msg = "ood_fast._cuda: ";
  msg += what;
  msg += " failed: ";
  msg += cudaGetErrorName(err);
  msg += " (";
  msg += cudaGetErrorString(err);
  msg += ") at ";
  msg += file;
  msg += ":";
  msg += std::to_string(line);
  throw std::runtime_error(msg);
}

// OOD_FAST_CUDA_SYNC=1: synchronize the stream after every launch so that an asynchronous fault
// (illegal address, ...) is reported by the launch that caused it. A debugging aid: it costs a
// host round trip per kernel.
inline bool sync_after_launch() {
  const char* v = std::getenv("OOD_FAST_CUDA_SYNC");
  return v != nullptr && v[0] == '1';
}

}  // namespace ood_fast::cuda

#define OOD_CUDA_CHECK(call)                                                   \
  do {                                                                         \
    cudaError_t ood_err_ = (call);                                             \
    if (ood_err_ != cudaSuccess) {                                             \
      (void)cudaGetLastError(); /* clear a non-sticky error */                 \
      ::ood_fast::cuda::throw_cuda(ood_err_, #call, __FILE__, __LINE__);       \
    }                                                                          \
  } while (0)

// After a <<<...>>> launch: configuration errors come from cudaGetLastError; with
// OOD_FAST_CUDA_SYNC=1 execution errors are caught here too.
#define OOD_CUDA_CHECK_LAUNCH(name, stream)                                    \
  do {                                                                         \
    cudaError_t ood_err_ = cudaGetLastError();                                 \
    if (ood_err_ != cudaSuccess)                                               \
      ::ood_fast::cuda::throw_cuda(ood_err_, "launch of " name, __FILE__, __LINE__); \
    if (::ood_fast::cuda::sync_after_launch()) {                               \
      ood_err_ = cudaStreamSynchronize(stream);                                \
      if (ood_err_ != cudaSuccess)                                             \
        ::ood_fast::cuda::throw_cuda(ood_err_, "execution of " name, __FILE__, __LINE__); \
    }                                                                          \
  } while (0)

namespace ood_fast::cuda {

struct DeviceGuard {  // make `dev` current in this runtime for the call, restore afterwards
  int prev = -1;
  explicit DeviceGuard(int dev) {
    OOD_CUDA_CHECK(cudaGetDevice(&prev));
    if (prev != dev) OOD_CUDA_CHECK(cudaSetDevice(dev));
    else prev = -1;
  }
  ~DeviceGuard() {
    if (prev >= 0) cudaSetDevice(prev);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
};

struct Workspace {  // stream-ordered device scratch memory
  void* ptr = nullptr;
  cudaStream_t stream = nullptr;
  bool pooled = true;
  Workspace(size_t bytes, cudaStream_t st, bool use_pool) : stream(st), pooled(use_pool) {
    if (bytes == 0) return;
    if (pooled) OOD_CUDA_CHECK(cudaMallocAsync(&ptr, bytes, stream));
    else OOD_CUDA_CHECK(cudaMalloc(&ptr, bytes));
  }
  ~Workspace() {
    if (ptr == nullptr) return;
    if (pooled) {
      cudaFreeAsync(ptr, stream);
    } else {
      cudaStreamSynchronize(stream);  // the kernels using ptr must finish first
      cudaFree(ptr);
    }
    (void)cudaGetLastError();  // errors here are already reported (or unreportable)
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
};

}  // namespace ood_fast::cuda

namespace ood_fast::cuda {

// Input element types: raw storage type and the exact conversion to float.
struct InF32 {
  using raw = float;
  static __device__ __forceinline__ float f(raw v) { return v; }
};
struct InF16 {
  using raw = unsigned short;
  static __device__ __forceinline__ float f(raw v) { return __half2float(__ushort_as_half(v)); }
};
struct InBF16 {
  using raw = unsigned short;
  static __device__ __forceinline__ float f(raw v) {
    return __uint_as_float(static_cast<unsigned>(v) << 16);  // bf16 is the top half of an f32
  }
};

}  // namespace ood_fast::cuda
