// int8 GEMM building blocks for int8_linear: C[32 x 32] int32 = A[32 x Kp] * B[Kp x 32] with
// exact int32 accumulation, one 32 x 32 block per micro-kernel call.
//
// Layouts (Kp = K rounded up to a multiple of 64, the padding zero in both operands):
//   * Packed A block (32 rows of activations): [Kp / 64 k-blocks][32 rows][64 bytes]: a k-block
//     is 2 KiB, row r's 64 consecutive k values at offset r * 64. Half a k-block (16 rows) is
//     exactly one AMX A tile (16 rows x 64 bytes, stride 64), and the same bytes serve the VNNI
//     kernel's 4-byte broadcasts and the portable kernel. Rows past the valid ones are zero.
//   * Packed B panel (32 output channels): [Kp / 64 k-blocks][2 halves][16 k-quads][16 columns]
//     [4 bytes]: byte b of (quad q, column j) of half h is qw[n0 + 16h + j, 64kb + 4q + b]. A
//     half is one AMX B tile (16 rows of 64 bytes: the "VNNI" layout AMX wants, four k per
//     column per 32-bit word), and a 64-byte row of it is one zmm of vpdpbusd's B operand.
//     Panels are contiguous, panel p at p * Kp * 32 bytes.
//   * C: [32][32] int32, row-major.
//
// Kernels (picked at run time, each function carrying its own target attribute):
//   * AMX-INT8: 2 x 2 tiles of 16 x 16 int32 (tdpbssd for int8 activations, tdpbusd for uint8),
//     two A tiles and two B tiles, the whole K in the tile registers; half the work when the
//     block has at most 16 valid rows.
//   * AVX512-VNNI: vpdpbusd is u8 x s8, so int8 activations are packed with their sign bit
//     flipped (x + 128 as u8) and the epilogue subtracts 128 * colsum[n] (colsum = sum_k qw[n, k],
//     computed when the weights are packed). 8 rows x 32 columns of zmm accumulators per pass.
//   * Portable: plain loops, the compiler vectorizes them for the baseline ISA.
// All three give the same int32 sums (integer arithmetic is exact, wrapping mod 2^32; the final
// value fits in int32 whenever K <= 65536, which the caller enforces).
//
// The AMX tile configuration (all eight tiles 16 rows x 64 bytes, the same as gemm.h's
// amx_configure) must be loaded on each thread that runs the AMX kernel; Linux must have granted
// the process the tile data state (arch_prctl, done by cpu_has_amx_int8()).
#pragma once

#include <cstdint>
#include <cstring>

#include "gemm.h"
#include "simd.h"

#define OOD_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512vnni")))
#define OOD_TARGET_AMX_INT8 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,amx-tile,amx-int8")))

namespace ood_fast {

// AMX-INT8 usable by this process: CPUID.(7,0):EDX bits 25 (amx-int8) and 24 (amx-tile), the OS
// enabling tile state in XCR0 (bits 17, 18), and Linux granting the tile data feature
// (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). The epilogue also needs AVX-512.
// Checked once; any failure: false. (Kept here, not in simd.h, beside its only user.)
inline bool cpu_has_amx_int8() {
#if defined(__linux__) && defined(__x86_64__) && !defined(OOD_FAST_PORTABLE_ONLY)
  static const bool ok = [] {
    if (!cpu_has_avx512f()) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 25) & 1u) || !((d >> 24) & 1u)) return false;
    unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
    if (!__get_cpuid(1, &a1, &b1, &c1, &d1) || !((c1 >> 27) & 1u)) return false;  // OSXSAVE
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if (((lo >> 17) & 3u) != 3u) return false;
    if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return false;  // ARCH_REQ_XCOMP_PERM, XTILEDATA
    return true;
  }();
  return ok;
#else
  return false;
#endif
}

namespace i8 {

constexpr int64_t KB = 64;                // k per k-block
constexpr int64_t MB = 32;                // rows per A block
constexpr int64_t NB = 32;                // columns per B panel
constexpr int64_t A_KBLOCK = MB * KB;     // bytes of one A k-block (2 KiB)
constexpr int64_t B_KBLOCK = NB * KB;     // bytes of one B k-block (2 KiB)
constexpr int64_t MAX_K = 65536;          // |sum_k (x - z) w| <= 255 * 128 * K fits in int32

enum class Isa { Generic, Vnni, Amx };

inline const char* isa_name(Isa i) {
  return i == Isa::Amx ? "amx" : i == Isa::Vnni ? "vnni" : "generic";
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ------------------------------------------------------------------------------------------
// Packing (portable: both are memory-bound copies)
// ------------------------------------------------------------------------------------------

// One B panel from rows qw[n0 .. n0 + 32) (rows past N zero) of a row-major [N, K] int8 matrix.
inline void pack_b_panel(const int8_t* qw, int64_t N, int64_t K, int64_t n0, int8_t* dst) {
  const int64_t nkb = round_up(K, KB) / KB;
  std::memset(dst, 0, static_cast<size_t>(nkb * B_KBLOCK));
  for (int64_t jj = 0; jj < NB && n0 + jj < N; ++jj) {
    const int8_t* row = qw + (n0 + jj) * K;
    const int64_t h = jj / 16, j = jj % 16;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t kb = k / KB, q = (k % KB) / 4, b = k % 4;
      dst[kb * B_KBLOCK + h * 1024 + q * 64 + j * 4 + b] = row[k];
    }
  }
}

// One A block from `rows` row-major rows of length K (stride ld bytes) into [nkb][32][64].
// flip: xor every byte with 0x80 (int8 -> int8 + 128 as uint8, for vpdpbusd); padding stays 0.
inline void pack_a_block(const uint8_t* x, int64_t ld, int64_t rows, int64_t K, bool flip, uint8_t* dst) {
  const int64_t nkb = round_up(K, KB) / KB;
  for (int64_t r = 0; r < MB; ++r) {
    const uint8_t* src = x + r * ld;
    for (int64_t kb = 0; kb < nkb; ++kb) {
      uint8_t* out = dst + kb * A_KBLOCK + r * KB;
      const int64_t n = r < rows ? std::min<int64_t>(KB, K - kb * KB) : 0;
      if (flip) {
        for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(src[kb * KB + i] ^ 0x80u);
      } else if (n > 0) {
        std::memcpy(out, src + kb * KB, static_cast<size_t>(n));
      }
      if (n < KB) std::memset(out + n, 0, static_cast<size_t>(KB - n));
    }
  }
}

// ------------------------------------------------------------------------------------------
// Micro-kernels: C[32 x 32] = A block (nkb k-blocks) * B panel; rows: valid rows (1..32)
// ------------------------------------------------------------------------------------------

// acc: add to C (a later k-range of the same output block) instead of overwriting it.
using MicroKernel = void (*)(int64_t nkb, const uint8_t* A, const int8_t* B, int32_t* C, int rows, bool acc);

// Portable: each k-block of B is first spread to bt[k][j] (int16, columns contiguous), so the
// inner loop is a contiguous multiply-add over the 32 columns that compilers vectorize.
template <bool U8>
void ukr_generic(int64_t nkb, const uint8_t* A, const int8_t* B, int32_t* C, int rows, bool accum) {
  int16_t bt[KB][NB];
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < NB; ++j)
      if (!accum) C[r * NB + j] = 0;
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int8_t* b = B + kb * B_KBLOCK;
    for (int h = 0; h < 2; ++h)
      for (int q = 0; q < 16; ++q)
        for (int j = 0; j < 16; ++j)
          for (int t = 0; t < 4; ++t) bt[4 * q + t][16 * h + j] = b[h * 1024 + q * 64 + 4 * j + t];
    for (int r = 0; r < rows; ++r) {
      const uint8_t* a = A + kb * A_KBLOCK + r * KB;
      int32_t acc[NB];
      for (int j = 0; j < NB; ++j) acc[j] = C[r * NB + j];
      for (int k = 0; k < KB; ++k) {
        const int32_t av = U8 ? static_cast<int32_t>(a[k]) : static_cast<int32_t>(static_cast<int8_t>(a[k]));
        for (int j = 0; j < NB; ++j) acc[j] += av * bt[k][j];
      }
      for (int j = 0; j < NB; ++j) C[r * NB + j] = acc[j];
    }
  }
}

#ifdef OOD_FAST_X86

// 8 rows (r0..r0+7 of the block) x 32 columns; A bytes are u8 (int8 activations flipped).
OOD_TARGET_VNNI inline void vnni_pass8(int64_t nkb, const uint8_t* A, const int8_t* B, int32_t* C, int r0,
                                        bool acc) {
  __m512i c0[8], c1[8];
#pragma GCC unroll 8
  for (int r = 0; r < 8; ++r) {
    c0[r] = acc ? _mm512_load_si512(C + (r0 + r) * NB) : _mm512_setzero_si512();
    c1[r] = acc ? _mm512_load_si512(C + (r0 + r) * NB + 16) : _mm512_setzero_si512();
  }
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const uint8_t* a = A + kb * A_KBLOCK + r0 * KB;
    const int8_t* b = B + kb * B_KBLOCK;
#pragma GCC unroll 4
    for (int q = 0; q < 16; ++q) {
      const __m512i b0 = _mm512_load_si512(b + q * 64);
      const __m512i b1 = _mm512_load_si512(b + 1024 + q * 64);
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) {
        int32_t w;
        std::memcpy(&w, a + r * KB + 4 * q, 4);
        const __m512i av = _mm512_set1_epi32(w);
        c0[r] = _mm512_dpbusd_epi32(c0[r], av, b0);
        c1[r] = _mm512_dpbusd_epi32(c1[r], av, b1);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < 8; ++r) {
    _mm512_store_si512(C + (r0 + r) * NB, c0[r]);
    _mm512_store_si512(C + (r0 + r) * NB + 16, c1[r]);
  }
}

OOD_TARGET_VNNI inline void ukr_vnni(int64_t nkb, const uint8_t* A, const int8_t* B, int32_t* C, int rows,
                                      bool acc) {
  for (int r0 = 0; r0 < rows; r0 += 8) vnni_pass8(nkb, A, B, C, r0, acc);
}

// AMX: tiles 0-3 C (0: rows 0-15 x cols 0-15, 1: rows 0-15 x cols 16-31, 2, 3: rows 16-31),
// 4-5 A (rows 0-15, 16-31), 6-7 B (cols 0-15, 16-31).
template <bool U8>
OOD_TARGET_AMX_INT8 inline void ukr_amx(int64_t nkb, const uint8_t* A, const int8_t* B, int32_t* C, int rows,
                                        bool acc) {
  constexpr int ldc = NB * 4;
  if (acc) {
    _tile_loadd(0, C, ldc);
    _tile_loadd(1, C + 16, ldc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
  }
  if (rows > 16) {
    if (acc) {
      _tile_loadd(2, C + 16 * NB, ldc);
      _tile_loadd(3, C + 16 * NB + 16, ldc);
    } else {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t kb = 0; kb < nkb; ++kb) {
      _tile_loadd(4, A, 64);
      _tile_loadd(6, B, 64);
      _tile_loadd(7, B + 1024, 64);
      _tile_loadd(5, A + 1024, 64);
      if (U8) {
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
      } else {
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
      }
      A += A_KBLOCK;
      B += B_KBLOCK;
    }
    _tile_stored(2, C + 16 * NB, ldc);
    _tile_stored(3, C + 16 * NB + 16, ldc);
  } else {
    for (int64_t kb = 0; kb < nkb; ++kb) {
      _tile_loadd(4, A, 64);
      _tile_loadd(6, B, 64);
      _tile_loadd(7, B + 1024, 64);
      if (U8) {
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
      } else {
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
      }
      A += A_KBLOCK;
      B += B_KBLOCK;
    }
  }
  _tile_stored(0, C, ldc);
  _tile_stored(1, C + 16, ldc);
}

#endif  // OOD_FAST_X86

// ------------------------------------------------------------------------------------------
// Epilogue: out[m0 + r, n0 + j] = (C[r][j] - z[r] * colsum[j]) * sx[r] * sw[j] + bias[j]
// for r < rows, j < cols (pointers already offset to the block; colsum padded to 32).
// ------------------------------------------------------------------------------------------

struct Epilogue {
  const float* sx;      // [rows]
  const int32_t* z;     // [rows] zero-point correction per row, or null (none)
  int32_t zconst;       // added to every row's correction (128 for flipped int8 activations)
  const int32_t* colsum;
  const float* sw;
  const float* bias;    // or null
  void* out;
  int64_t ldo;          // elements per output row
  bool bf16;
};

inline void epilogue_generic(const Epilogue& e, const int32_t* C, int rows, int cols) {
  for (int r = 0; r < rows; ++r) {
    const uint32_t z = static_cast<uint32_t>((e.z ? e.z[r] : 0) + e.zconst);
    const float s = e.sx[r];
    for (int j = 0; j < cols; ++j) {
      // Wrapping int32 arithmetic: exact whenever the true sum fits (K <= MAX_K).
      const int32_t v = static_cast<int32_t>(static_cast<uint32_t>(C[r * NB + j]) - z * static_cast<uint32_t>(e.colsum[j]));
      float o = static_cast<float>(v) * (s * e.sw[j]);
      if (e.bias) o += e.bias[j];
      if (e.bf16) static_cast<uint16_t*>(e.out)[r * e.ldo + j] = gemm::f32_to_bf16(o);
      else static_cast<float*>(e.out)[r * e.ldo + j] = o;
    }
  }
}

#ifdef OOD_FAST_X86
OOD_TARGET_AVX512 inline void epilogue_avx512(const Epilogue& e, const int32_t* C, int rows, int cols) {
  const __mmask16 m0 = static_cast<__mmask16>(cols >= 16 ? 0xffffu : (1u << cols) - 1u);
  const __mmask16 m1 = static_cast<__mmask16>(cols >= 32 ? 0xffffu : cols <= 16 ? 0u : (1u << (cols - 16)) - 1u);
  const __m512i cs0 = _mm512_loadu_si512(e.colsum), cs1 = _mm512_loadu_si512(e.colsum + 16);
  const __m512 sw0 = _mm512_maskz_loadu_ps(m0, e.sw), sw1 = _mm512_maskz_loadu_ps(m1, e.sw + 16);
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  if (e.bias) {
    b0 = _mm512_maskz_loadu_ps(m0, e.bias);
    b1 = _mm512_maskz_loadu_ps(m1, e.bias + 16);
  }
  for (int r = 0; r < rows; ++r) {
    const __m512i z = _mm512_set1_epi32((e.z ? e.z[r] : 0) + e.zconst);
    const __m512 s = _mm512_set1_ps(e.sx[r]);
    const __m512i v0 = _mm512_sub_epi32(_mm512_load_si512(C + r * NB), _mm512_mullo_epi32(z, cs0));
    const __m512i v1 = _mm512_sub_epi32(_mm512_load_si512(C + r * NB + 16), _mm512_mullo_epi32(z, cs1));
    const __m512 o0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v0), _mm512_mul_ps(s, sw0), b0);
    const __m512 o1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v1), _mm512_mul_ps(s, sw1), b1);
    if (e.bf16) {
      uint16_t* o = static_cast<uint16_t*>(e.out) + r * e.ldo;
      _mm256_mask_storeu_epi16(o, m0, gemm::f32_to_bf16_avx512(o0));
      _mm256_mask_storeu_epi16(o + 16, m1, gemm::f32_to_bf16_avx512(o1));
    } else {
      float* o = static_cast<float*>(e.out) + r * e.ldo;
      _mm512_mask_storeu_ps(o, m0, o0);
      _mm512_mask_storeu_ps(o + 16, m1, o1);
    }
  }
}
#endif  // OOD_FAST_X86

}  // namespace i8
}  // namespace ood_fast
