// Packed GEMM building block: C[M x 32] = A[M x K] * B[K x 32] for one column panel at a time.
//
// Layouts (every element slot is a 4-byte word, in fp32 and in bf16 alike):
//   * A k-step is one k (fp32) or a pair of consecutive k (bf16, two RNE-rounded halves packed
//     into one 32-bit word, low half = even k): what one broadcast feeds.
//   * Packed A: micro-panels of MR rows, each [ksteps][MR] words, micro-panel i at
//     i * a_ksteps * MR. Rows past the valid ones must be zero (the caller's pack does it).
//   * Packed B: column panels of NR = 32 columns, each [ksteps][32] words (bf16: word j of a
//     step holds B[2s][j] | B[2s+1][j] << 16). Each panel has its own K extent, so a triangular
//     factor stores (and multiplies) only the non-zero upper part: panel [j0, j0+32) needs k <
//     j0 + 32 only.
//   * C: [M][32] floats, row-major, one panel wide.
//
// Kernels: AVX-512F fp32 (14 x 32 register block, FMA with broadcast A), AVX512-BF16 (14 x 32,
// vdpbf16ps on k pairs, fp32 accumulation), AMX-BF16 (32 x 32 block of four 16 x 16 fp32 tiles,
// tdpbf16ps; its own A layout, see pack_a_panel_amx, and k-steps padded to 16; B is the same
// bf16-pair panel, i.e. the VNNI layout AMX wants), and a portable fallback (4 x 32, plain loops
// the compiler vectorizes for the baseline ISA). Picked at run time (simd.h); each ISA-specific
// function carries its own target attribute, so the file builds without -march flags. The AMX
// kernel needs the tile configuration loaded on each thread that runs it (AmxScope); bf16
// precision picks it wherever the CPU has AMX-BF16 and Linux grants the tile state.
// vdpbf16ps is used only where a one-off timing shows it outrunning fp32 FMA (on some
// AVX512-BF16 parts it issues at a quarter of the FMA rate); elsewhere bf16 precision runs the
// fp32 kernel on bf16-rounded operands, which gives the same products and the same fp32 sums.
//
// Blocking (see panel_gemm): for each B panel, for each K block of kc steps (B block in L1),
// for each MR-row micro-panel of the A tile (in L2): one micro-kernel call. The next B block
// is prefetched into L2 while the current one is in use.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

// OOD_FAST_PORTABLE_ONLY (a compile-time macro, for testing) builds only the portable kernels.
#if (defined(__x86_64__) || defined(__i386__)) && !defined(OOD_FAST_PORTABLE_ONLY)
// GCC 12 reports its own _mm512_undefined_* placeholders as maybe-uninitialized (GCC PR 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define OOD_FAST_X86 1
#endif

#include "simd.h"

#define OOD_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define OOD_TARGET_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")))
#define OOD_TARGET_AMX \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16,amx-tile,amx-bf16")))

namespace ood_fast {
namespace gemm {

constexpr int NR = 32;  // columns per B panel (two zmm)

// ------------------------------------------------------------------------------------------
// Scalar conversions (portable; bit-exact with torch's round-to-nearest-even bfloat16)
// ------------------------------------------------------------------------------------------

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }
inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: value = man * 2^-24, exactly representable in fp32
      float v = static_cast<float>(man) * (1.0f / 16777216.0f);
      u = sign | f32_bits(v);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  }
  return bits_f32(u);
}

// ------------------------------------------------------------------------------------------
// Aligned buffer of 4-byte words
// ------------------------------------------------------------------------------------------

template <class T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t n) { resize(n); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  ~Buffer() { std::free(p_); }
  void resize(size_t n) {  // contents are not kept; new memory is zeroed
    std::free(p_);
    p_ = nullptr;
    n_ = n;
    if (n == 0) return;
    size_t bytes = ((n * sizeof(T) + 63) / 64) * 64;
    p_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (!p_) throw std::bad_alloc();
    std::memset(p_, 0, bytes);
  }
  T* data() { return p_; }
  const T* data() const { return p_; }
  size_t size() const { return n_; }
  T& operator[](size_t i) { return p_[i]; }
  const T& operator[](size_t i) const { return p_[i]; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// ------------------------------------------------------------------------------------------
// Micro-kernels: C[MR x 32] (+)= A_panel[kc steps] * B_panel[kc steps]
// ------------------------------------------------------------------------------------------

using MicroKernel = void (*)(int64_t kc, const uint32_t* A, const uint32_t* B, float* C, bool accum);

template <int MR>
void ukr_generic(int64_t kc, const uint32_t* Aw, const uint32_t* Bw, float* C, bool accum) {
  const float* A = reinterpret_cast<const float*>(Aw);
  const float* B = reinterpret_cast<const float*>(Bw);
  float acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = accum ? C[r * NR + j] : 0.0f;
  for (int64_t k = 0; k < kc; ++k) {
    const float* b = B + k * NR;
    for (int r = 0; r < MR; ++r) {
      const float a = A[k * MR + r];
      for (int j = 0; j < NR; ++j) acc[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) C[r * NR + j] = acc[r][j];
}

#ifdef OOD_FAST_X86

template <int MR>
OOD_TARGET_AVX512 void ukr_f32_avx512(int64_t kc, const uint32_t* Aw, const uint32_t* Bw, float* C,
                                      bool accum) {
  const float* A = reinterpret_cast<const float*>(Aw);
  const float* B = reinterpret_cast<const float*>(Bw);
  __m512 c0[MR], c1[MR];
  if (accum) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      c0[r] = _mm512_loadu_ps(C + r * NR);
      c1[r] = _mm512_loadu_ps(C + r * NR + 16);
    }
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  }
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(B);
    const __m512 b1 = _mm512_load_ps(B + 16);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r]);
      c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
    }
    A += MR;
    B += NR;
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(C + r * NR, c0[r]);
    _mm512_storeu_ps(C + r * NR + 16, c1[r]);
  }
}

template <int MR>
OOD_TARGET_AVX512BF16 void ukr_bf16_avx512(int64_t kc, const uint32_t* A, const uint32_t* B, float* C,
                                           bool accum) {
  __m512 c0[MR], c1[MR];
  if (accum) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      c0[r] = _mm512_loadu_ps(C + r * NR);
      c1[r] = _mm512_loadu_ps(C + r * NR + 16);
    }
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  }
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(B);
    const __m512bh b1 = (__m512bh)_mm512_load_si512(B + 16);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(A[r]));
      c0[r] = _mm512_dpbf16_ps(c0[r], a, b0);
      c1[r] = _mm512_dpbf16_ps(c1[r], a, b1);
    }
    A += MR;
    B += NR;
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(C + r * NR, c0[r]);
    _mm512_storeu_ps(C + r * NR + 16, c1[r]);
  }
}

// AMX-BF16: C[32 x 32] (+)= A[32 x 2kc] * B[2kc x 32] with 4 C tiles (16 x 16 fp32), 2 A tiles
// (16 rows x 32 bf16) and 2 B tiles (16 k-pairs x 16 columns, the VNNI pair layout). Products of
// bf16 operands are exact in fp32 and accumulate in fp32 (in a different order than vdpbf16ps).
//   A (AMX layout, see pack_a_panel_amx): [kc / 16 blocks][32 rows][16 words], one A tile = one
//     contiguous 1 KiB half block; kc must be a multiple of 16.
//   B: the ordinary bf16-pair panel [kc][32] words; a B tile is 16 of its rows, 64 of the 128
//     bytes of each (columns 0-15 or 16-31), loaded with a 128-byte stride.
// The tile configuration (amx_configure) must be loaded on the calling thread first.
struct AmxTileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(AmxTileConfig) == 64, "AMX tile configuration is 64 bytes");

OOD_TARGET_AMX inline void amx_configure() {
  alignas(64) AmxTileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // Inline asm with the whole struct as an input: GCC 12's _tile_loadconfig does not tell the
  // compiler it reads the struct, and the colsb / rows stores above were dropped as dead.
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg) : "memory");
}

OOD_TARGET_AMX inline void amx_release() { _tile_release(); }

// The 32 x 32 fp32 C block lives in tiles 0-3 (rows 0-15 / 16-31 x columns 0-15 / 16-31); C is
// [32][32] floats, row-major.
OOD_TARGET_AMX inline void amx_begin_c(const float* C, bool accum) {
  constexpr int ldc = NR * 4;  // bytes per C row
  if (accum) {
    _tile_loadd(0, C, ldc);
    _tile_loadd(1, C + 16, ldc);
    _tile_loadd(2, C + 16 * NR, ldc);
    _tile_loadd(3, C + 16 * NR + 16, ldc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
}

OOD_TARGET_AMX inline void amx_store_c(float* C) {
  constexpr int ldc = NR * 4;
  _tile_stored(0, C, ldc);
  _tile_stored(1, C + 16, ldc);
  _tile_stored(2, C + 16 * NR, ldc);
  _tile_stored(3, C + 16 * NR + 16, ldc);
}

OOD_TARGET_AMX inline void ukr_bf16_amx(int64_t kc, const uint32_t* A, const uint32_t* B, float* C, bool accum) {
  amx_begin_c(C, accum);
  for (int64_t s = 0; s < kc; s += 16) {
    _tile_loadd(4, A, 64);
    _tile_loadd(5, A + 16 * 16, 64);
    _tile_loadd(6, B, NR * 4);
    _tile_loadd(7, B + 16, NR * 4);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
    A += 32 * 16;
    B += 16 * NR;
  }
  amx_store_c(C);
}

// AMX-BF16 with a split A operand: C[32 x 32] (+)= (A_hi + A_lo)[32 x 2kc] * B[2kc x 32], where an
// fp32 matrix is carried as two bf16 matrices, hi = bf16(a) and lo = bf16(a - hi) (16 of fp32's 24
// significand bits; |a - hi - lo| <= 2^-16 |a|). Both products are exact in fp32 and share each B
// tile load. A layout (pack_a_panel_amx_split): [kc / 16 blocks][hi, lo][32 rows][16 words].
// Used where B is exactly bf16 (a bf16 bank) and A is fp32 (queries): twice the tile products of
// ukr_bf16_amx for an fp32-like result, still several times the fp32 FMA rate.
OOD_TARGET_AMX inline void ukr_bf16x2_amx(int64_t kc, const uint32_t* A, const uint32_t* B, float* C, bool accum) {
  amx_begin_c(C, accum);
  for (int64_t s = 0; s < kc; s += 16) {
    _tile_loadd(6, B, NR * 4);
    _tile_loadd(7, B + 16, NR * 4);
    _tile_loadd(4, A, 64);
    _tile_loadd(5, A + 16 * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(4, A + 32 * 16, 64);
    _tile_loadd(5, A + 48 * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
    A += 64 * 16;
    B += 16 * NR;
  }
  amx_store_c(C);
}

#endif  // OOD_FAST_X86

// ------------------------------------------------------------------------------------------
// Kernel selection
// ------------------------------------------------------------------------------------------

enum class Isa { Generic, Avx512, Avx512Bf16, Amx };

struct Kernel {
  Isa isa = Isa::Generic;
  int mr = 4;               // rows per micro-panel
  bool bf16_words = false;  // operands packed as bf16 pairs (else fp32 words)
  int64_t kc = 256;         // k-steps per cache block (the B block kc x 32 words stays in L1)
  MicroKernel ukr = &ukr_generic<4>;
};

inline Kernel generic_kernel() { return Kernel(); }

#ifdef OOD_FAST_X86
inline Kernel avx512_kernel() {
  Kernel k;
  k.isa = Isa::Avx512;
  k.mr = 14;
  k.kc = 256;
  k.ukr = &ukr_f32_avx512<14>;
  return k;
}

inline Kernel avx512bf16_kernel() {
  Kernel k;
  k.isa = Isa::Avx512Bf16;
  k.mr = 14;
  k.bf16_words = true;
  k.kc = 192;
  k.ukr = &ukr_bf16_avx512<14>;
  return k;
}

// AMX-BF16 (32 x 32 blocks; k-steps padded to multiples of 16). Only where cpu_has_amx_bf16().
// Callers hold an AmxScope on every thread that runs its micro-kernel.
inline Kernel amx_kernel() {
  Kernel k;
  k.isa = Isa::Amx;
  k.mr = 32;
  k.bf16_words = true;
  k.kc = 128;
  k.ukr = &ukr_bf16_amx;
  return k;
}

// Multiply-adds per second of a micro-kernel on L1-resident operands (best of a few short runs).
inline double ukr_rate(const Kernel& kr) {
  const int64_t kc = 128;
  Buffer<uint32_t> A(static_cast<size_t>(kc * kr.mr)), B(static_cast<size_t>(kc * NR));
  Buffer<float> C(static_cast<size_t>(kr.mr * NR));
  const uint32_t one = kr.bf16_words ? 0x3f803f80u : f32_bits(1.0f);
  for (size_t i = 0; i < A.size(); ++i) A[i] = one;
  for (size_t i = 0; i < B.size(); ++i) B[i] = kr.bf16_words ? 0u : f32_bits(0.0f);
  const int calls = 200;
  double best = 0.0;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int c = 0; c < calls; ++c) kr.ukr(kc, A.data(), B.data(), C.data(), c > 0);
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double macs = double(calls) * kc * kr.mr * NR * (kr.bf16_words ? 2 : 1);
    best = std::max(best, macs / std::max(sec, 1e-9));
  }
  return best;
}

// Whether vdpbf16ps (two bf16 products per lane) outruns fp32 FMA on this processor. It does
// not everywhere: on some AVX512-BF16 parts it issues at a quarter of the FMA rate, which makes
// it half as fast per product. Measured once per process, interleaved to resist noise.
inline bool bf16_dot_pays() {
  static const bool pays = [] {
    const Kernel f = avx512_kernel(), b = avx512bf16_kernel();
    double rf = 0.0, rb = 0.0;
    for (int i = 0; i < 3; ++i) {
      rf = std::max(rf, ukr_rate(f));
      rb = std::max(rb, ukr_rate(b));
    }
    return rb > 1.15 * rf;
  }();
  return pays;
}
#endif  // OOD_FAST_X86

// Best kernel for this processor. bf16: the caller wants bf16-rounded operands. They are packed
// as pairs for vdpbf16ps where that instruction outruns fp32 FMA; elsewhere they are rounded and
// kept as fp32 words (the same products, exact in fp32, and the same fp32 sums).
inline Kernel select_kernel(bool bf16) {
#ifdef OOD_FAST_X86
  if (bf16 && cpu_has_amx_bf16()) return amx_kernel();
  if (bf16 && cpu_has_avx512bf16() && bf16_dot_pays()) return avx512bf16_kernel();
  if (cpu_has_avx512f()) return avx512_kernel();
#endif
  (void)bf16;
  return generic_kernel();
}

inline int64_t ksteps(const Kernel& kr, int64_t K) {
  if (kr.isa == Isa::Amx) return ((K + 1) / 2 + 15) / 16 * 16;  // whole 16-step tiles, zero-padded
  return kr.bf16_words ? (K + 1) / 2 : K;
}

// Loads and releases the AMX tile configuration on the current thread (no-op for other kernels).
struct AmxScope {
  bool on;
  explicit AmxScope(const Kernel& kr) : on(kr.isa == Isa::Amx) {
#ifdef OOD_FAST_X86
    if (on) amx_configure();
#endif
  }
  ~AmxScope() {
#ifdef OOD_FAST_X86
    if (on) amx_release();
#endif
  }
  AmxScope(const AmxScope&) = delete;
  AmxScope& operator=(const AmxScope&) = delete;
};

// ------------------------------------------------------------------------------------------
// Packing
// ------------------------------------------------------------------------------------------

// Packed B: a list of 32-column panels, each with its own k extent.
struct PackedB {
  struct Panel {
    int64_t offset;  // in words
    int64_t steps;   // k-steps stored (and multiplied)
  };
  std::vector<Panel> panels;
  Buffer<uint32_t> data;
};

// Packs panels given (k extent in elements, getter(k, j) for j in [0, 32)). Two passes: sizes
// first, then values. get(k, j) must return 0 for columns past the matrix.
struct PackedBBuilder {
  const Kernel& kr;
  bool round;  // round values to bf16 (when the words are fp32)
  std::vector<int64_t> kext;
  explicit PackedBBuilder(const Kernel& k, bool round_bf16) : kr(k), round(round_bf16) {}
  size_t add(int64_t k_extent) {
    kext.push_back(k_extent);
    return kext.size() - 1;
  }
  void allocate(PackedB& pb) const {
    pb.panels.clear();
    int64_t off = 0;
    for (int64_t ke : kext) {
      int64_t s = ksteps(kr, ke);
      pb.panels.push_back({off, s});
      off += s * NR;
    }
    pb.data.resize(static_cast<size_t>(std::max<int64_t>(off, 1)));
  }
  template <class Get>
  void fill(PackedB& pb, size_t panel, Get get) const {
    const int64_t ke = kext[panel];
    uint32_t* dst = pb.data.data() + pb.panels[panel].offset;
    const int64_t steps = pb.panels[panel].steps;
    for (int64_t s = 0; s < steps; ++s) {
      for (int j = 0; j < NR; ++j) {
        if (kr.bf16_words) {
          const int64_t k0 = 2 * s, k1 = 2 * s + 1;
          uint32_t lo = k0 < ke ? f32_to_bf16(get(k0, j)) : 0u;
          uint32_t hi = k1 < ke ? f32_to_bf16(get(k1, j)) : 0u;
          dst[s * NR + j] = lo | (hi << 16);
        } else {
          float v = get(s, j);
          if (round) v = round_bf16(v);
          dst[s * NR + j] = f32_bits(v);
        }
      }
    }
  }
};

// Writes row r of an A tile (K fp32 values) into packed micro-panels with a_steps k-steps each.
// Steps past K are zero-filled. round: round to bf16 (fp32 words only; bf16 words always round).
inline void pack_a_row(const Kernel& kr, uint32_t* Ap, int64_t a_steps, int64_t r, const float* row,
                       int64_t K, bool round) {
  const int mr = kr.mr;
  uint32_t* dst = Ap + (r / mr) * a_steps * mr + (r % mr);
  if (kr.bf16_words) {
    const int64_t full = K / 2;
    for (int64_t s = 0; s < full; ++s) {
      uint32_t lo = f32_to_bf16(row[2 * s]), hi = f32_to_bf16(row[2 * s + 1]);
      dst[s * mr] = lo | (hi << 16);
    }
    int64_t s = full;
    if (K & 1) {
      dst[s * mr] = f32_to_bf16(row[K - 1]);
      ++s;
    }
    for (; s < a_steps; ++s) dst[s * mr] = 0u;
  } else {
    if (round) {
      for (int64_t k = 0; k < K; ++k) dst[k * mr] = f32_bits(round_bf16(row[k]));
    } else {
      for (int64_t k = 0; k < K; ++k) dst[k * mr] = f32_bits(row[k]);
    }
    for (int64_t k = K; k < a_steps; ++k) dst[k * mr] = 0u;
  }
}

// Zeroes row r of a packed A tile (padding rows of the last micro-panel).
inline void zero_a_row(const Kernel& kr, uint32_t* Ap, int64_t a_steps, int64_t r) {
  const int mr = kr.mr;
  uint32_t* dst = Ap + (r / mr) * a_steps * mr + (r % mr);
  for (int64_t s = 0; s < a_steps; ++s) dst[s * mr] = 0u;
}

#ifdef OOD_FAST_X86
// In-register 16 x 16 transpose of fp32: c[j][i] = r[i][j] (unpack 32/64-bit, then two 128-bit
// lane shuffles).
OOD_TARGET_AVX512 inline void transpose16x16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4q + o], lane L = rows 4q..4q+3 at column 4L + o
  for (int q = 0; q < 4; ++q) {
    const __m512d a = _mm512_castps_pd(t[4 * q]), b = _mm512_castps_pd(t[4 * q + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * q + 2]), d = _mm512_castps_pd(t[4 * q + 3]);
    u[4 * q + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int o = 0; o < 4; ++o) {  // 4 x 4 transpose of 128-bit lanes over q
    const __m512 v0 = _mm512_shuffle_f32x4(u[o], u[4 + o], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(u[o], u[4 + o], 0xEE);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + o], u[12 + o], 0x44);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + o], u[12 + o], 0xEE);
    r[o] = _mm512_shuffle_f32x4(v0, v2, 0x88);       // column o      (lane 0)
    r[4 + o] = _mm512_shuffle_f32x4(v0, v2, 0xDD);   // column 4 + o  (lane 1)
    r[8 + o] = _mm512_shuffle_f32x4(v1, v3, 0x88);   // column 8 + o  (lane 2)
    r[12 + o] = _mm512_shuffle_f32x4(v1, v3, 0xDD);  // column 12 + o (lane 3)
  }
}

// Round fp32 lanes to the nearest bf16 value (ties to even), kept as fp32; NaN stays NaN.
OOD_TARGET_AVX512 inline __m512 round_bf16_avx512(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_mov_ps(_mm512_castsi512_ps(r), nan, v);
}

// Packs one micro-panel (fp32 words, MR <= 16) from rows[r][0..K) (r < m_rows; rows past m_rows
// are zero). a_steps == K for fp32 words.
OOD_TARGET_AVX512 inline void pack_a_panel_f32_avx512(int mr, uint32_t* dst, const float* rows, int64_t ld,
                                                      int64_t m_rows, int64_t K, bool round) {
  const __mmask16 smask = static_cast<__mmask16>((1u << mr) - 1u);
  float* out = reinterpret_cast<float*>(dst);
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const int kv = static_cast<int>(std::min<int64_t>(16, K - k0));
    const __mmask16 lmask = static_cast<__mmask16>((1u << kv) - 1u);
    __m512 v[16];
    for (int r = 0; r < 16; ++r) {
      if (r < m_rows && r < mr) {
        v[r] = _mm512_maskz_loadu_ps(lmask, rows + r * ld + k0);
        if (round) v[r] = round_bf16_avx512(v[r]);
      } else {
        v[r] = _mm512_setzero_ps();
      }
    }
    transpose16x16(v);
    for (int j = 0; j < kv; ++j) _mm512_mask_storeu_ps(out + (k0 + j) * mr, smask, v[j]);
  }
}
// fp32 lanes -> bf16 bits (round to nearest even, quiet NaN), bit-exact with f32_to_bf16.
OOD_TARGET_AVX512 inline __m256i f32_to_bf16_avx512(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

// Packs one 32-row micro-panel in the AMX A layout: [a_steps / 16 blocks][32 rows][16 words],
// word s of a row = bf16(row[2s]) | bf16(row[2s + 1]) << 16 (i.e. the row's bf16 values in
// order). Values past K and rows past m_rows are zero.
OOD_TARGET_AVX512 inline void pack_a_panel_amx(uint32_t* dst, const float* rows, int64_t ld, int64_t m_rows,
                                               int64_t K, int64_t a_steps) {
  const int64_t nblk = a_steps / 16;
  for (int64_t r = 0; r < 32; ++r) {
    const float* row = rows + r * ld;
    for (int64_t b = 0; b < nblk; ++b) {
      uint32_t* out = dst + b * 512 + r * 16;
      if (r >= m_rows) {
        _mm512_store_si512(out, _mm512_setzero_si512());
        continue;
      }
      const int64_t k0 = b * 32;
      const int64_t n0 = std::max<int64_t>(0, std::min<int64_t>(16, K - k0));
      const int64_t n1 = std::max<int64_t>(0, std::min<int64_t>(16, K - k0 - 16));
      const __m512 lo = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n0) - 1u), row + k0);
      const __m512 hi = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n1) - 1u), row + k0 + 16);
      _mm256_store_si256(reinterpret_cast<__m256i*>(out), f32_to_bf16_avx512(lo));
      _mm256_store_si256(reinterpret_cast<__m256i*>(out + 8), f32_to_bf16_avx512(hi));
    }
  }
}

// The split A layout of ukr_bf16x2_amx for one 32-row micro-panel: per block of 16 k-steps (32
// values), 512 words of hi = bf16(row) then 512 words of lo = bf16(row - hi), each [32 rows][16
// words] as in pack_a_panel_amx. Values past K and rows past m_rows are zero.
OOD_TARGET_AVX512 inline void pack_a_panel_amx_split(uint32_t* dst, const float* rows, int64_t ld, int64_t m_rows,
                                                     int64_t K, int64_t a_steps) {
  const int64_t nblk = a_steps / 16;
  for (int64_t r = 0; r < 32; ++r) {
    const float* row = rows + r * ld;
    for (int64_t b = 0; b < nblk; ++b) {
      uint32_t* hi_out = dst + b * 1024 + r * 16;
      uint32_t* lo_out = hi_out + 512;
      if (r >= m_rows) {
        _mm512_store_si512(hi_out, _mm512_setzero_si512());
        _mm512_store_si512(lo_out, _mm512_setzero_si512());
        continue;
      }
      const int64_t k0 = b * 32;
      for (int h = 0; h < 2; ++h) {
        const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, K - k0 - 16 * h));
        const __m512 v = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), row + k0 + 16 * h);
        const __m512 hi = round_bf16_avx512(v);
        _mm256_store_si256(reinterpret_cast<__m256i*>(hi_out + 8 * h), f32_to_bf16_avx512(hi));
        _mm256_store_si256(reinterpret_cast<__m256i*>(lo_out + 8 * h), f32_to_bf16_avx512(_mm512_sub_ps(v, hi)));
      }
    }
  }
}

// One 32-column B panel in the bf16-pair (VNNI) layout straight from bf16 rows: word s of column j
// is the 32-bit word s of row j (elements 2s, 2s + 1), so packing is a transpose of 32-bit words.
// Rows past nv and values past K are zero; `steps` (a multiple of 16) words per column. nrm (if
// set) receives each row's squared norm of the upcast values, one fma chain in k order
// (bit-identical to the fp32 packers' chain).
OOD_TARGET_AVX512 inline void pack_b_panel_bf16_rows(const uint16_t* rows, int64_t ld, int64_t nv, int64_t K,
                                                     int64_t steps, uint32_t* dst, float* nrm) {
  for (int h = 0; h < 2; ++h) {
    const int64_t nr = std::max<int64_t>(0, std::min<int64_t>(16, nv - 16 * h));
    __m512 acc = _mm512_setzero_ps();
    for (int64_t s0 = 0; s0 < steps; s0 += 16) {
      const int64_t k0 = 2 * s0;
      const int64_t kv = std::max<int64_t>(0, std::min<int64_t>(32, K - k0));
      const __mmask32 m = kv >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << kv) - 1u);
      __m512 v[16];
      for (int r = 0; r < 16; ++r)
        v[r] = r < nr ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, rows + (16 * h + r) * ld + k0))
                      : _mm512_setzero_ps();
      transpose16x16(v);
      for (int j = 0; j < 16; ++j) {
        _mm512_store_ps(reinterpret_cast<float*>(dst + (s0 + j) * NR + 16 * h), v[j]);
        if (nrm) {
          const __m512i w = _mm512_castps_si512(v[j]);
          const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
          const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
          acc = _mm512_fmadd_ps(even, even, acc);
          acc = _mm512_fmadd_ps(odd, odd, acc);
        }
      }
    }
    if (nrm) _mm512_storeu_ps(nrm + 16 * h, acc);
  }
}
#endif  // OOD_FAST_X86

// Packs micro-panel i of an A tile from row-major fp32 rows (m_rows valid rows, the rest zero).
inline void pack_a_panel(const Kernel& kr, uint32_t* Ap, int64_t a_steps, int64_t i, const float* rows,
                         int64_t ld, int64_t m_rows, int64_t K, bool round) {
#ifdef OOD_FAST_X86
  if (kr.isa == Isa::Amx) {  // always bf16-rounded
    pack_a_panel_amx(Ap + i * a_steps * kr.mr, rows, ld, m_rows, K, a_steps);
    return;
  }
  if (!kr.bf16_words && kr.isa != Isa::Generic && kr.mr <= 16) {
    pack_a_panel_f32_avx512(kr.mr, Ap + i * a_steps * kr.mr, rows, ld, m_rows, K, round);
    return;
  }
#endif
  const int64_t r0 = i * kr.mr;
  for (int64_t r = 0; r < kr.mr; ++r) {
    if (r < m_rows) pack_a_row(kr, Ap, a_steps, r0 + r, rows + r * ld, K, round);
    else zero_a_row(kr, Ap, a_steps, r0 + r);
  }
}

// ------------------------------------------------------------------------------------------
// One panel: C[n_micro * MR x 32] = A[:, :steps] * B_panel, K-blocked so the B block stays in L1
// ------------------------------------------------------------------------------------------

// Spreads software prefetches of a memory range (e.g. the next tile's input rows) over many
// micro-kernel calls, a few lines each, so they overlap the arithmetic instead of stalling.
struct Prefetcher {
  const char* base = nullptr;
  size_t next = 0, lines = 0, per_call = 0;
  void set(const char* p, size_t bytes, size_t calls) {
    base = p;
    next = 0;
    lines = p ? (bytes + 63) / 64 : 0;
    per_call = calls ? (lines + calls - 1) / calls : lines;
  }
  void step() {
    for (size_t e = std::min(lines, next + per_call); next < e; ++next) __builtin_prefetch(base + next * 64, 0, 2);
  }
};

// Number of micro-kernel calls panel_gemm makes (for spreading prefetches).
inline int64_t panel_calls(const Kernel& kr, int64_t n_micro, int64_t steps) {
  return n_micro * std::max<int64_t>(1, (steps + kr.kc - 1) / kr.kc);
}

inline void panel_gemm(const Kernel& kr, const uint32_t* Ap, int64_t a_steps, int64_t n_micro,
                       const uint32_t* Bp, int64_t steps, float* C, Prefetcher* pf = nullptr) {
  const int mr = kr.mr;
  if (steps == 0) {
    std::memset(C, 0, sizeof(float) * n_micro * mr * NR);
    return;
  }
  for (int64_t s0 = 0; s0 < steps; s0 += kr.kc) {
    const int64_t kc = std::min<int64_t>(kr.kc, steps - s0);
    const uint32_t* B = Bp + s0 * NR;
    // While this B block is reused by every micro-panel, bring the next one (the rest of this
    // panel, or the start of the next: panels are contiguous) into L2, a slice per call.
    const char* nb = reinterpret_cast<const char*>(B + kc * NR);
    const int64_t nb_lines = kr.kc * NR * 4 / 64, per_call = (nb_lines + n_micro - 1) / n_micro;
    for (int64_t i = 0; i < n_micro; ++i) {
      if (pf) pf->step();
      for (int64_t l = i * per_call, e = std::min(nb_lines, l + per_call); l < e; ++l)
        __builtin_prefetch(nb + l * 64, 0, 2);
      kr.ukr(kc, Ap + i * a_steps * mr + s0 * mr, B, C + i * mr * NR, s0 > 0);
    }
  }
}

}  // namespace gemm
}  // namespace ood_fast
