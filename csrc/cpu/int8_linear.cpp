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
//   1. packs qx into 32-row blocks (in parallel; for the VNNI kernel int8 activations get their
//      sign bit flipped, x + 128 as uint8, and the epilogue subtracts 128 * colsum);
//   2. splits the output into jobs of (a chunk of weight panels, ~1 MiB so it stays in L2) x
//      (a range of row blocks); each job walks its row blocks, and for each block every panel
//      of its chunk: one micro-kernel call over the whole K (32 x 32 int32 in registers / tiles),
//      then the epilogue straight from that 4 KiB block to the output.
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

#ifdef _OPENMP
#include <omp.h>
#endif

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

// Blocking, tuned on this machine (2 MiB L2, 48 KiB L1 per core) at M = 2048, K = N = 4096:
// a chunk of weight panels of ~1 MiB stays in L2 while every row block passes (0.5 and 1.5 MiB
// were slower), and k-ranges of 8 k-blocks (512 k; a 16 KiB A slice in L1) beat 256 and 768.
constexpr int64_t kChunkBytes = int64_t(1) << 20;
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
    // The packed activations live in a buffer kept per calling thread and only ever grown: a
    // fresh multi-MiB allocation per call would page-fault on every first touch.
    static thread_local std::unique_ptr<AlignedBytes> abuf;
    static thread_local size_t abuf_size = 0;
    const size_t a_bytes = static_cast<size_t>(nmb * nkb * i8::A_KBLOCK);
    if (abuf_size < a_bytes) {
      abuf.reset();
      abuf = std::make_unique<AlignedBytes>(a_bytes);
      abuf_size = a_bytes;
    }
    uint8_t* A = abuf->get();

    i8::MicroKernel ukr = qx_is_u8 ? &i8::ukr_generic<true> : &i8::ukr_generic<false>;
#ifdef OOD_FAST_X86
    if (isa_ == Isa::Amx) ukr = qx_is_u8 ? &i8::ukr_amx<true> : &i8::ukr_amx<false>;
    if (isa_ == Isa::Vnni) ukr = &i8::ukr_vnni;
    const bool avx512 = isa_ != Isa::Generic;
#endif

    // Jobs: chunks of pc panels (pc * Kp * 32 bytes ~ chunk_bytes, reused from L2 by every row
    // block) x gm groups of row blocks (more than one only when there are fewer chunks than
    // threads). Within a job, per row block: k-ranges of kcb k-blocks (the A slice, 32 x 64 kcb
    // bytes, stays in L1 while every panel of the chunk passes), the 32 x 32 int32 sums of the
    // chunk's panels accumulating in a per-thread buffer; then the epilogue of each panel.
    const int64_t nt_req = std::max(1, num_threads);
    int64_t pc = std::max<int64_t>(1, kChunkBytes / (Kp_ * i8::NB));
    pc = std::min(pc, npanels_);
    int64_t nchunks = (npanels_ + pc - 1) / pc;
    if (nchunks < nt_req) {
      pc = (npanels_ + nt_req - 1) / nt_req;
      nchunks = (npanels_ + pc - 1) / pc;
    }
    const int64_t gm = nchunks < nt_req ? std::min(nmb, (nt_req + nchunks - 1) / nchunks) : 1;
    const int64_t mb_per_group = (nmb + gm - 1) / gm;
    const int64_t njobs = nchunks * gm;
    const int nt = static_cast<int>(std::min<int64_t>(nt_req, std::max(njobs, nmb)));
    const int64_t kcb = std::min<int64_t>(nkb, kKcBlocks);

    std::vector<AlignedBytes> cbufs;
    cbufs.reserve(nt);
    for (int t = 0; t < nt; ++t) cbufs.emplace_back(static_cast<size_t>(pc * i8::MB * i8::NB * 4));

    const int8_t* B = reinterpret_cast<const int8_t*>(B_->get());
    const int64_t N = N_, K = K_, Kp = Kp_, npanels = npanels_;
    const int32_t* colsum = colsum_.data();
#ifdef OOD_FAST_X86
    const bool amx = isa_ == Isa::Amx;
#endif

#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(dynamic, 4)
      for (int64_t b = 0; b < nmb; ++b) {
        const int64_t rows = std::min(i8::MB, M - b * i8::MB);
        i8::pack_a_block(qx + b * i8::MB * K, K, rows, K, flip, A + b * nkb * i8::A_KBLOCK);
      }
      // (implicit barrier: every block is packed before any is used)
#ifdef _OPENMP
      int32_t* Cb = reinterpret_cast<int32_t*>(cbufs[omp_get_thread_num()].get());
#else
      int32_t* Cb = reinterpret_cast<int32_t*>(cbufs[0].get());
#endif
#ifdef OOD_FAST_X86
      if (amx) gemm::amx_configure();
#endif
      // Dynamic: on a shared machine a descheduled thread must not hold a fixed half of the work.
      // (Each output element is computed by one job in a fixed order: results never depend on it.)
#pragma omp for schedule(dynamic, 1)
      for (int64_t job = 0; job < njobs; ++job) {
        const int64_t chunk = job / gm, g = job % gm;
        const int64_t p0 = chunk * pc, p1 = std::min(npanels, p0 + pc);
        const int64_t b0 = g * mb_per_group, b1 = std::min(nmb, b0 + mb_per_group);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t m0 = b * i8::MB;
          const int rows = static_cast<int>(std::min(i8::MB, M - m0));
          const uint8_t* Ab = A + b * nkb * i8::A_KBLOCK;
          for (int64_t k0 = 0; k0 < nkb; k0 += kcb) {
            const int64_t kn = std::min(kcb, nkb - k0);
            // The next A slice (this block's next k-range, or the next block's first: blocks are
            // contiguous) comes from L3 once per chunk: fetch it into L2 a share per panel call,
            // while the current slice is reused from L1.
            const char* pf = reinterpret_cast<const char*>(Ab + (k0 + kn) * i8::A_KBLOCK);
            const int64_t next_kn = k0 + kn < nkb ? std::min(kcb, nkb - k0 - kn) : b + 1 < nmb ? kcb : 0;
            const int64_t pf_lines = next_kn * i8::A_KBLOCK / 64;
            const int64_t per_call = (pf_lines + (p1 - p0) - 1) / (p1 - p0);
            for (int64_t p = p0; p < p1; ++p) {
              for (int64_t l = (p - p0) * per_call, e = std::min(pf_lines, l + per_call); l < e; ++l)
                __builtin_prefetch(pf + l * 64, 0, 2);
              ukr(kn, Ab + k0 * i8::A_KBLOCK, B + p * Kp * i8::NB + k0 * i8::B_KBLOCK,
                  Cb + (p - p0) * i8::MB * i8::NB, rows, k0 > 0);
            }
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
