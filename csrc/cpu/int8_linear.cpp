// int8_linear, CPU backend: W8A8 GEMM with the dequantization fused in the epilogue.
//
//   out[m, n] = sx[m] * sw[n] * sum_k (qx[m, k] - zx[m]) * qw[n, k] + bias[n]
//
// qx int8 (zx absent: zero point 0) or uint8 (zx int32 [M]); qw int8 [N, K]; the sum is exact
// in int32 (K <= 65536), the rest in fp32; out fp32 or bf16 [M, N].
//
// Int8Weight packs qw once (int8_gemm.h layout, 32-channel panels, K padded with zeros to a
// multiple of 64) together with colsum[n] = sum_k qw[n, k], which turns a zero point into an
// epilogue term: sum_k (x - z) w = sum_k x w - z * colsum. forward():
// splits the output into jobs of (a group of 32-row blocks, ~1 MiB of packed rows) x (a range
// of weight chunks, ~256 KiB each), scheduled dynamically over the threads with no barrier. A job
// packs its rows (for the VNNI kernel int8 activations get their sign bit flipped, x + 128 as
// uint8, and the epilogue subtracts 128 * colsum), then for each chunk and each row block runs
// k-ranges of 512 over the chunk's panels (32 x 32 int32 sums per micro-kernel call, AMX tiles
// or zmm registers, accumulated in a per-thread buffer) and the epilogue of the block.
// The kernel is AMX-INT8 where the CPU and Linux allow it, else AVX512-VNNI, else portable;
// isa= (or the environment variable OOD_FAST_INT8_ISA when isa is "auto") forces one.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "int8_gemm.h"
#include "threads.h"

namespace py = pybind11;

namespace ood_fast {
namespace {

using i8::Isa;

// Uninitialized 64-byte-aligned bytes (every byte is written by a pack before it is read).
struct AlignedBytes {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> p;
  explicit AlignedBytes(size_t n) {
    const size_t bytes = std::max<size_t>(64, (n + 63) / 64 * 64);
    p.reset(static_cast<uint8_t*>(std::aligned_alloc(64, bytes)));
    if (!p) throw std::bad_alloc();
  }
  uint8_t* get() const { return p.get(); }
};

// Blocking, tuned on this machine (2 MiB L2, 48 KiB L1 per core) at M = 2048, K = N = 4096,
// one thread: a job's packed rows (~1 MiB) stay in L2 while its weight chunks (~256 KiB each)
// pass them (groups of 0.5 / 1.5 MiB and chunks of 128 / 512 KiB / 1 MiB were slower), and
// k-ranges of 8 k-blocks (512 k; a 16 KiB A slice in L1) beat 256 and 768.
constexpr int64_t kGroupBytes = int64_t(1) << 20;
constexpr int64_t kChunkBytes = int64_t(1) << 18;
constexpr int64_t kKcBlocks = 8;

bool isa_available(Isa isa) {
  switch (isa) {
    case Isa::Amx:
      return cpu_has_amx_int8();
    case Isa::Vnni:
#ifdef OOD_FAST_X86
      return cpu_has_avx512vnni();
#else
      return false;
#endif
    default:
      return true;
  }
}

Isa pick_isa(std::string name) {
  if (name == "auto") {
    const char* env = std::getenv("OOD_FAST_INT8_ISA");
    if (env && *env) name = env;
  }
  if (name == "auto") {
    if (isa_available(Isa::Amx)) return Isa::Amx;
    if (isa_available(Isa::Vnni)) return Isa::Vnni;
    return Isa::Generic;
  }
  Isa isa;
  if (name == "amx") isa = Isa::Amx;
  else if (name == "vnni") isa = Isa::Vnni;
  else if (name == "generic") isa = Isa::Generic;
  else
    throw std::invalid_argument("Int8Weight: isa must be auto, amx, vnni or generic (also via OOD_FAST_INT8_ISA), got '" +
                                name + "'");
  if (!isa_available(isa))
    throw std::invalid_argument(std::string("Int8Weight: isa '") + name +
                                "' is not available on this processor (amx needs AMX-INT8 with the Linux tile "
                                "permission, vnni needs AVX512-VNNI)");
  return isa;
}

class Int8Weight {
 public:
  Int8Weight(uintptr_t qw_ptr, int64_t N, int64_t K, const std::string& isa)
      : N_(N), K_(K), isa_(pick_isa(isa)) {
    if (N < 1 || K < 1) throw std::invalid_argument("Int8Weight: need N >= 1 and K >= 1");
    if (K > i8::MAX_K)
      throw std::invalid_argument("Int8Weight: K = " + std::to_string(K) + " > 65536 could overflow the exact int32 sum");
    if (!qw_ptr) throw std::invalid_argument("Int8Weight: null weight pointer");
    const int8_t* qw = reinterpret_cast<const int8_t*>(qw_ptr);
    Kp_ = i8::round_up(K, i8::KB);
    npanels_ = (N + i8::NB - 1) / i8::NB;
    B_ = std::make_unique<AlignedBytes>(static_cast<size_t>(npanels_ * Kp_ * i8::NB));
    colsum_.assign(static_cast<size_t>(npanels_ * i8::NB), 0);
    int8_t* B = reinterpret_cast<int8_t*>(B_->get());
    for (int64_t p = 0; p < npanels_; ++p) i8::pack_b_panel(qw, N, K, p * i8::NB, B + p * Kp_ * i8::NB);
    for (int64_t n = 0; n < N; ++n) {
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += qw[n * K + k];
      colsum_[n] = s;
    }
  }

  void forward(uintptr_t qx_ptr, bool qx_is_u8, int64_t M, uintptr_t sx_ptr, uintptr_t zx_ptr, uintptr_t sw_ptr,
               uintptr_t bias_ptr, uintptr_t out_ptr, bool out_is_bf16, int num_threads) const {
    if (M < 0) throw std::invalid_argument("Int8Weight.forward: M < 0");
    if (M == 0) return;
    if (!qx_ptr || !sx_ptr || !sw_ptr || !out_ptr)
      throw std::invalid_argument("Int8Weight.forward: null qx, sx, sw or out pointer");
    const uint8_t* qx = reinterpret_cast<const uint8_t*>(qx_ptr);
    const float* sx = reinterpret_cast<const float*>(sx_ptr);
    const int32_t* zx = reinterpret_cast<const int32_t*>(zx_ptr);
    const float* sw = reinterpret_cast<const float*>(sw_ptr);
    const float* bias = reinterpret_cast<const float*>(bias_ptr);

    const int64_t nkb = Kp_ / i8::KB, nmb = (M + i8::MB - 1) / i8::MB;
    const bool flip = isa_ == Isa::Vnni && !qx_is_u8;  // vpdpbusd wants unsigned activations

    i8::MicroKernel ukr = qx_is_u8 ? &i8::ukr_generic<true> : &i8::ukr_generic<false>;
#ifdef OOD_FAST_X86
    if (isa_ == Isa::Amx) ukr = qx_is_u8 ? &i8::ukr_amx<true> : &i8::ukr_amx<false>;
    if (isa_ == Isa::Vnni) ukr = &i8::ukr_vnni;
    const bool avx512 = isa_ != Isa::Generic;
    const bool amx = isa_ == Isa::Amx;
#endif

    // Work split (no barrier anywhere: on a shared machine a thread waiting for a descheduled
    // one loses whole time slices). A job = (a group of gb row blocks, ~1 MiB packed, a range of
    // weight chunks): it packs its own rows, then for each chunk of pc panels (pc * Kp * 32
    // bytes ~ 256 KiB) and each block of the group, k-ranges of
    // kcb k-blocks (a 16 KiB A slice in L1 while the chunk's panels pass, the 32 x 32 int32
    // sums accumulating in a per-thread buffer), then the epilogue of the block's panels. The
    // weight chunks are split over jobs only when there are few row groups (small M: the
    // repeated packing of those rows is cheap next to the GEMM).
    const int64_t nt_req = std::max(1, num_threads);
    // Threads the work justifies: ~2^26 multiply-adds (tens of microseconds) each at least.
    const double macs = static_cast<double>(M) * static_cast<double>(N_) * static_cast<double>(Kp_);
    const int64_t nt_work = std::max<int64_t>(1, static_cast<int64_t>(macs / double(int64_t(1) << 26)));
    const int64_t ntw = std::min(nt_req, nt_work);
    const int64_t pc = std::min(npanels_, std::max<int64_t>(1, kChunkBytes / (Kp_ * i8::NB)));
    const int64_t nchunks = (npanels_ + pc - 1) / pc;
    int64_t gb = std::max<int64_t>(1, kGroupBytes / (nkb * i8::A_KBLOCK));
    gb = std::min(gb, (nmb + ntw - 1) / ntw);
    const int64_t ngroups = (nmb + gb - 1) / gb;
    // At least ~4 jobs per thread where the weights allow it, so that a thread running late
    // leaves its share to the others.
    const int64_t nranges = ngroups >= 4 * ntw ? 1 : std::min(nchunks, (4 * ntw + ngroups - 1) / ngroups);
    const int64_t chunks_per_range = (nchunks + nranges - 1) / nranges;
    const int64_t njobs = ngroups * nranges;
    const int nt = static_cast<int>(std::min(ntw, njobs));
    const int64_t kcb = std::min<int64_t>(nkb, kKcBlocks);

    // Per-thread packed rows and int32 sums, kept per calling thread and only ever grown: fresh
    // MiB-sized allocations would page-fault on every first touch, every call.
    struct Work {
      std::unique_ptr<AlignedBytes> a, c;
      size_t a_size = 0, c_size = 0;
    };
    static thread_local std::vector<Work> works;
    if (works.size() < static_cast<size_t>(nt)) works.resize(nt);
    const size_t a_bytes = static_cast<size_t>(gb * nkb * i8::A_KBLOCK), c_bytes = static_cast<size_t>(pc * 4096);
    for (int t = 0; t < nt; ++t) {
      Work& w = works[t];
      if (w.a_size < a_bytes) w.a.reset(), w.a = std::make_unique<AlignedBytes>(a_bytes), w.a_size = a_bytes;
      if (w.c_size < c_bytes) w.c.reset(), w.c = std::make_unique<AlignedBytes>(c_bytes), w.c_size = c_bytes;
    }
    Work* work = works.data();

    const int8_t* B = reinterpret_cast<const int8_t*>(B_->get());
    const int64_t N = N_, K = K_, Kp = Kp_, npanels = npanels_;
    const int32_t* colsum = colsum_.data();

#pragma omp parallel num_threads(nt)
    {
      const int tid = thread_index();
      uint8_t* A = work[tid].a->get();
      int32_t* Cb = reinterpret_cast<int32_t*>(work[tid].c->get());
#ifdef OOD_FAST_X86
      if (amx) gemm::amx_configure();
#endif
      // Dynamic: a descheduled thread must not hold a fixed share of the work. (Each output
      // element is computed by one job in a fixed order: results never depend on the split.)
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t job = 0; job < njobs; ++job) {
        const int64_t g = job / nranges, r = job % nranges;
        const int64_t b0 = g * gb, b1 = std::min(nmb, b0 + gb);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t rows = std::min(i8::MB, M - b * i8::MB);
          i8::pack_a_block(qx + b * i8::MB * K, K, rows, K, flip, A + (b - b0) * nkb * i8::A_KBLOCK);
        }
        const int64_t c0 = r * chunks_per_range, c1 = std::min(nchunks, c0 + chunks_per_range);
        for (int64_t chunk = c0; chunk < c1; ++chunk) {
          const int64_t p0 = chunk * pc, p1 = std::min(npanels, p0 + pc);
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t m0 = b * i8::MB;
            const int rows = static_cast<int>(std::min(i8::MB, M - m0));
            const uint8_t* Ab = A + (b - b0) * nkb * i8::A_KBLOCK;
            for (int64_t k0 = 0; k0 < nkb; k0 += kcb) {
              const int64_t kn = std::min(kcb, nkb - k0);
              for (int64_t p = p0; p < p1; ++p)
                ukr(kn, Ab + k0 * i8::A_KBLOCK, B + p * Kp * i8::NB + k0 * i8::B_KBLOCK,
                    Cb + (p - p0) * i8::MB * i8::NB, rows, k0 > 0);
            }
            for (int64_t p = p0; p < p1; ++p) {
              const int64_t n0 = p * i8::NB;
              const int cols = static_cast<int>(std::min(i8::NB, N - n0));
              const int32_t* C = Cb + (p - p0) * i8::MB * i8::NB;
              i8::Epilogue e;
              e.sx = sx + m0;
              e.z = zx ? zx + m0 : nullptr;
              e.zconst = flip ? 128 : 0;
              e.colsum = colsum + n0;
              e.sw = sw + n0;
              e.bias = bias ? bias + n0 : nullptr;
              e.ldo = N;
              e.bf16 = out_is_bf16;
              e.out = out_is_bf16 ? static_cast<void*>(reinterpret_cast<uint16_t*>(out_ptr) + m0 * N + n0)
                                  : static_cast<void*>(reinterpret_cast<float*>(out_ptr) + m0 * N + n0);
#ifdef OOD_FAST_X86
              if (avx512) i8::epilogue_avx512(e, C, rows, cols);
              else i8::epilogue_generic(e, C, rows, cols);
#else
              i8::epilogue_generic(e, C, rows, cols);
#endif
            }
          }
        }
      }
#ifdef OOD_FAST_X86
      if (amx) gemm::amx_release();
#endif
    }
  }

  std::string isa() const { return i8::isa_name(isa_); }
  int64_t N() const { return N_; }
  int64_t K() const { return K_; }

 private:
  int64_t N_, K_;
  Isa isa_;
  int64_t Kp_ = 0, npanels_ = 0;
  std::unique_ptr<AlignedBytes> B_;
  std::vector<int32_t> colsum_;
};

}  // namespace
}  // namespace ood_fast

void bind_int8_linear(py::module_& m) {
  using ood_fast::Int8Weight;
  py::class_<Int8Weight>(m, "Int8Weight", "int8 weights packed once for int8_linear (see csrc/cpu/int8_linear.cpp).")
      .def(py::init<uintptr_t, int64_t, int64_t, const std::string&>(), py::arg("qw_ptr"), py::arg("N"), py::arg("K"),
           py::arg("isa") = "auto",
           "Copy and pack qw int8 [N, K] (contiguous; 1 <= K <= 65536). isa: 'auto' (AMX-INT8, else "
           "AVX512-VNNI, else portable; the environment variable OOD_FAST_INT8_ISA overrides 'auto'), or "
           "force 'amx', 'vnni' or 'generic' (ValueError where the processor lacks it).")
      .def("forward", &Int8Weight::forward, py::arg("qx_ptr"), py::arg("qx_is_u8"), py::arg("M"), py::arg("sx_ptr"),
           py::arg("zx_ptr"), py::arg("sw_ptr"), py::arg("bias_ptr"), py::arg("out_ptr"), py::arg("out_is_bf16"),
           py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
           "out [M, N] (fp32, or bf16 bits when out_is_bf16) = sx[m] * sw[n] * sum_k (qx[m, k] - zx[m]) * "
           "qw[n, k] + bias[n]. qx [M, K] int8 (qx_is_u8 False) or uint8, contiguous; sx fp32 [M]; zx int32 [M] "
           "or 0 (zero points 0); sw fp32 [N]; bias fp32 [N] or 0.")
      .def_property_readonly("isa", &Int8Weight::isa, "Kernel in use: amx, vnni or generic.")
      .def_property_readonly("N", &Int8Weight::N)
      .def_property_readonly("K", &Int8Weight::K);
  m.def(
      "int8_linear_isas",
      [] {
        py::list l;
        for (auto isa : {ood_fast::i8::Isa::Amx, ood_fast::i8::Isa::Vnni, ood_fast::i8::Isa::Generic})
          if (ood_fast::isa_available(isa)) l.append(ood_fast::i8::isa_name(isa));
        return l;
      },
      "int8_linear kernels this processor can run, fastest first.");
}
