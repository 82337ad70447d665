// hadamard and rotate_quantize, CPU backend (bindings: docs/QUANT_CONTRACT.md, "compiled bindings").
//
// hadamard:        out[r, :] = scale * (x[r, :] * signs) @ kron(H_K, S_L)        (fp32 arithmetic)
// rotate_quantize: y = hadamard(x / smooth, 1/sqrt(n), signs) (or y = x / smooth when K = 0), then
//   symmetric:  scale = absmax / qmax (or the static scale), codes = clamp(rint(y / scale), +-qmax)
//   asymmetric: lo = min(min y, 0), hi = max(max y, 0), scale = (hi - lo) / levels,
//               zero = clamp(rint(-lo / scale), 0, levels), codes = clamp(rint(y / scale) + zero,
//               0, levels) as uint8;  scale == 0 gives codes 0 (and zero 0)
// over each row (per token) or the whole tensor (per tensor). y / scale is a true IEEE division
// (the AVX-512 path multiplies by 1 / scale and divides only the lanes near a rounding tie, which
// gives the same codes; see QVec) and rint rounds half to even (vcvtps2dq / vrndscaleps with
// round-to-nearest-even, as the default MXCSR mode; std::nearbyint in the portable path), so the
// codes depend only on the fp32 values of y: with K = 0 they are bit-exact with the torch reference.
//
// The transform itself is in fwht.h. Signs, the scale and (rotate_quantize) 1 / smooth are folded
// into one per-column fp32 multiplier that the load applies (for K > 1 the mix then uses the raw
// +-1 H_K); with K = 0 the smoothing is a true division, as in the reference.
//
// Rows are split evenly over the threads, each row transformed whole by one thread in its own
// fp32 work buffer (L1/L2-resident up to n ~ 8K / 256K): the input is read once and the output
// (or the codes) written once. Per-token rotate_quantize keeps the transformed row in the work
// buffer and quantizes it from there. Per-tensor dynamic rotate_quantize needs the global
// extremes first: when a thread's transformed rows fit in kKeepBytes (1 MiB, half this machine's
// L2), they are kept in a per-thread buffer and quantized after a barrier (one read of the
// input); otherwise the rows are transformed twice, once for the extremes and once for the codes
// (two reads of the input; the price of not holding the fp32 tensor).
//
// Dispatch: the AVX-512 path where the processor has AVX-512F/BW/VL/DQ (simd.h) and L = n / K >=
// 16; the portable path otherwise (and when OOD_FAST_HADAMARD_ISA=generic, for tests). Both give
// the same fp32 operations up to summation order of the mix (identical for K = 1).
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "fwht.h"
#include "gemm.h"
#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace ood_fast {
namespace {

using fwht::Plan;

enum DType { kF32 = 0, kF16 = 1, kBF16 = 2 };

constexpr int64_t kKeepBytes = int64_t(1) << 20;

int parse_dtype(const std::string& s, const char* fn) {
  if (s == "f32") return kF32;
  if (s == "f16") return kF16;
  if (s == "bf16") return kBF16;
  throw std::invalid_argument(std::string(fn) + ": dtype must be f32, f16 or bf16, got '" + s + "'");
}

inline size_t dtype_size(int dt) { return dt == kF32 ? 4 : 2; }

// fp32 -> fp16 bits, round to nearest even (subnormals, overflow to inf, NaN kept quiet).
inline uint16_t f32_to_f16(float f) {
  const uint32_t u = gemm::f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u | ((a >> 13) & 0x3ffu) : 0u));
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                                                // below 2^-14: subnormal half
    const int shift = 126 - static_cast<int>(a >> 23);
    if (shift >= 25) return static_cast<uint16_t>(sign);
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  uint32_t r = a - (112u << 23);
  r += 0xfffu + ((r >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

inline float load_elem(const void* p, int dt, int64_t i) {
  if (dt == kF32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return dt == kF16 ? gemm::f16_to_f32(h) : gemm::bf16_to_f32(h);
}

inline void store_elem(void* p, int dt, int64_t i, float v) {
  if (dt == kF32)
    static_cast<float*>(p)[i] = v;
  else
    static_cast<uint16_t*>(p)[i] = dt == kF16 ? f32_to_f16(v) : gemm::f32_to_bf16(v);
}

bool use_avx512() {
#ifndef OOD_FAST_X86
  return false;  // built without the AVX-512 kernels (OOD_FAST_PORTABLE_ONLY or not x86)
#endif
  static const bool has = cpu_has_avx512f();
  const char* env = std::getenv("OOD_FAST_HADAMARD_ISA");
  if (env && std::string(env) == "generic") return false;
  return has;
}

// The sign-set mix for K > 1 (fwht.h, Plan::set_mix); OOD_FAST_HADAMARD_MIX=fma keeps the K-FMA mix
// (for measurements and tests).
bool want_sign_mix() {
  const char* env = std::getenv("OOD_FAST_HADAMARD_MIX");
  return !(env && std::string(env) == "fma");
}

// Non-temporal stores for outputs of at least 8 MiB (they would not stay in cache for a consumer
// anyway, and skip the read-for-ownership of each written line); OOD_FAST_HADAMARD_STREAM=0 / 1
// forces them off / on (for measurements).
bool want_stream(int64_t out_bytes) {
  if (const char* env = std::getenv("OOD_FAST_HADAMARD_STREAM")) return env[0] == '1';
  return out_bytes >= (int64_t(8) << 20);
}

// The input row to prefetch while row r is computed: r + d with d rows >= 8 KiB ahead (a short row
// is computed faster than one memory latency's worth of bandwidth would arrive), within the
// thread's rows [.., r1); its lines spread over `work` vector steps of row r (fwht::Prefetch).
inline fwht::Prefetch prefetch_row(const char* x, size_t row_bytes, int64_t r, int64_t r1, int64_t work) {
  const int64_t d = std::max<int64_t>(1, static_cast<int64_t>((size_t(8) << 10) / row_bytes));
  if (r + d >= r1) return {};
  const char* p = x + static_cast<size_t>(r + d) * row_bytes;
  const int64_t lines = static_cast<int64_t>((row_bytes + 63) / 64);
  return fwht::Prefetch{p, p + row_bytes, static_cast<int>(lines), static_cast<int>(std::max<int64_t>(1, work)), 0};
}

// Orders this thread's non-temporal stores before the parallel region's join.
inline void store_fence() {
#ifdef OOD_FAST_X86
  _mm_sfence();
#endif
}

int pick_threads(int num_threads, int64_t rows, int64_t n) {
  // ~64K elements per thread at least: below that the fork/join costs more than it saves.
  const int64_t by_work = std::max<int64_t>(1, rows * n / 65536);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({num_threads, rows, by_work})));
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
inline int thread_count() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// ------------------------------------------------------------------------------------------
// Quantization parameters and the portable row kernels
// ------------------------------------------------------------------------------------------

struct Stats {
  float absmax = 0.0f, lo = 0.0f, hi = 0.0f;  // lo <= 0 <= hi by definition (min(.., 0), max(.., 0))
  void merge(const Stats& o) {
    absmax = std::max(absmax, o.absmax);
    lo = std::min(lo, o.lo);
    hi = std::max(hi, o.hi);
  }
};

struct QParams {
  bool asym = false;
  float scale = 0.0f;
  float zero = 0.0f;         // asymmetric zero point (an integer value)
  float qmin = 0, qmax = 0;  // code range before the zero point is added: [-qmax, qmax] or [0, levels]
};

QParams make_params(const Stats& st, bool symmetric, float static_scale, int bits) {
  QParams q;
  q.asym = !symmetric;
  if (symmetric) {
    const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
    q.scale = static_scale > 0.0f ? static_scale : st.absmax / qmax;
    q.qmin = -qmax;
    q.qmax = qmax;
  } else {
    const float levels = static_cast<float>((1 << bits) - 1);
    q.scale = (st.hi - st.lo) / levels;
    q.zero = q.scale == 0.0f ? 0.0f : std::min(std::max(std::nearbyint(-st.lo / q.scale), 0.0f), levels);
    q.qmin = 0.0f;
    q.qmax = levels;
  }
  return q;
}

void generic_stats(const float* z, int64_t n, Stats& st) {
  for (int64_t i = 0; i < n; ++i) {
    st.absmax = std::max(st.absmax, std::fabs(z[i]));
    st.lo = std::min(st.lo, z[i]);
    st.hi = std::max(st.hi, z[i]);
  }
}

void generic_quantize(const float* z, int64_t n, const QParams& q, void* codes) {
  if (q.scale == 0.0f) {
    std::memset(codes, 0, static_cast<size_t>(n));
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    float c = std::nearbyint(z[i] / q.scale) + q.zero;
    c = std::min(std::max(c, q.qmin), q.qmax);
    const int v = static_cast<int>(c);
    if (q.asym)
      static_cast<uint8_t*>(codes)[i] = static_cast<uint8_t>(v);
    else
      static_cast<int8_t*>(codes)[i] = static_cast<int8_t>(v);
  }
}

// Transformed row of the portable path into z: x * m, FWHT (in z itself when K == 1, else in y),
// then for K > 1 the mix from y into z (z != y).
void generic_transform(const Plan& pl, const void* xrow, int dt, const float* m, const float* H, float* y,
                       float* z) {
  float* w = pl.K == 1 ? z : y;
  for (int64_t i = 0; i < pl.n; ++i) w[i] = load_elem(xrow, dt, i) * m[i];
  fwht::generic_fwht(w, pl.n, pl.L);
  if (pl.K > 1) fwht::generic_mix(y, z, H, pl.K, pl.L);
}

// K = 0 (no rotation): z = x / smooth, or x.
void generic_prepare(const void* xrow, int dt, const float* smooth, int64_t n, float* z) {
  for (int64_t i = 0; i < n; ++i) z[i] = smooth ? load_elem(xrow, dt, i) / smooth[i] : load_elem(xrow, dt, i);
}

// ------------------------------------------------------------------------------------------
// AVX-512 sources, sinks and quantizer
// ------------------------------------------------------------------------------------------

#ifdef OOD_FAST_X86

template <int DT>
OOD_TARGET_AVX512 OOD_FWHT_INLINE __m512 load16(const void* p, int64_t i) {
  if (DT == kF32) return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
  if (DT == kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

OOD_TARGET_AVX512 OOD_FWHT_INLINE __m512 load16_masked(const void* p, int dt, int64_t i, __mmask16 k) {
  if (dt == kF32) return _mm512_maskz_loadu_ps(k, static_cast<const float*>(p) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(p) + i);
  if (dt == kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Input row times the per-column multiplier (64-byte aligned).
template <int DT>
struct SrcMul {
  const void* x;
  const float* m;
  OOD_TARGET_AVX512 OOD_FWHT_INLINE __m512 load(int64_t i) const {
    return _mm512_mul_ps(load16<DT>(x, i), _mm512_load_ps(m + i));
  }
};

// Output row in the input's dtype (bf16: round to nearest even, bit-exact with torch). STREAM:
// non-temporal stores (the row is 64-byte aligned; fp32 only, where each store is a whole line).
template <int DT, bool STREAM>
struct OutSink {
  void* out;
  float first = 0.0f;  // output element 0 in fp32: the row's finiteness probe (see hadamard())
  OOD_TARGET_AVX512 OOD_FWHT_INLINE void put(int64_t i, __m512 v) {
    if (i == 0) first = _mm512_cvtss_f32(v);
    if (DT == kF32) {
      if (STREAM)
        _mm512_stream_ps(static_cast<float*>(out) + i, v);
      else
        _mm512_storeu_ps(static_cast<float*>(out) + i, v);
    } else {
      const __m256i h = DT == kF16 ? _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                                   : gemm::f32_to_bf16_avx512(v);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i), h);
    }
  }
  template <int R>
  OOD_TARGET_AVX512 OOD_FWHT_INLINE void observe(const __m512*) {}
};

// Transformed row into z (fp32, aligned) with its extremes (max |y|; min and max for asymmetric),
// each group of stored vectors reduced as a tree (a serial max chain would bound the pass by
// its 4-cycle latency).
template <bool ASYM>
struct StatSink {
  float* z;
  __m512 mx, mn;
  OOD_TARGET_AVX512 OOD_FWHT_INLINE void put(int64_t i, __m512 v) { _mm512_store_ps(z + i, v); }
  template <int R>
  OOD_TARGET_AVX512 OOD_FWHT_INLINE void observe(const __m512* v) {
    // Symmetric: max |v| as a tree of vrangeps (imm 0x0B: the operand of larger magnitude, sign
    // cleared), one op per vector instead of an abs and a max (~10% of the radix pass).
    __m512 a[R], b[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) a[r] = b[r] = v[r];
#pragma GCC unroll 16
    for (int h = 1; h < R; h *= 2)
#pragma GCC unroll 16
      for (int r = 0; r + h < R; r += 2 * h) {
        if (ASYM) {
          a[r] = _mm512_max_ps(a[r], a[r + h]);
          b[r] = _mm512_min_ps(b[r], b[r + h]);
        } else {
          a[r] = _mm512_range_ps(a[r], a[r + h], 0x0B);
        }
      }
    mx = ASYM ? _mm512_max_ps(mx, a[0]) : _mm512_range_ps(mx, a[0], 0x0B);
    if (ASYM) mn = _mm512_min_ps(mn, b[0]);
  }
};

// Quantizer constants. The quotient y / scale is formed as y * (1 / scale) (one multiply instead
// of a ~8-cycle vdivps per vector); it differs from the IEEE quotient by < 2^-22.9 relative, i.e.
// < 2^-12 for |q| <= 1024 (larger |q| saturate whatever their rounding). So rint can differ only
// where q lies within 2^-12 of a half-integer: those lanes (vreduceps gives q - rint(q)) are
// recomputed with a true division. Codes are thus exactly those of clamp(rint(y / scale)).
// When 1 / scale is not a normal finite float, every lane takes the division.
struct QVec {
  __m512 vs, vr, vz, vlo, vhi, thr;
  bool asym, recip_ok;
  OOD_TARGET_AVX512 explicit QVec(const QParams& q) {
    const float r = 1.0f / q.scale;
    recip_ok = std::isnormal(r) && std::isnormal(q.scale);
    vs = _mm512_set1_ps(q.scale);
    vr = _mm512_set1_ps(r);
    vz = _mm512_set1_ps(q.zero);
    vlo = _mm512_set1_ps(q.qmin);
    vhi = _mm512_set1_ps(q.qmax);
    thr = _mm512_set1_ps(0.5f - 1.0f / 4096.0f);
    asym = q.asym;
  }
};

// The rounded, clamped quotients of the fp32 lanes v, as int32 lanes.
template <bool ASYM>
OOD_TARGET_AVX512 OOD_FWHT_INLINE __m512i quant_i32(__m512 v, const QVec& c) {
  __m512 q;
  if (c.recip_ok) {
    q = _mm512_mul_ps(v, c.vr);
    const __m512 d = _mm512_reduce_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // q - rint(q)
    const __mmask16 near_tie = _mm512_cmp_ps_mask(_mm512_abs_ps(d), c.thr, _CMP_GT_OQ);
    if (near_tie) q = _mm512_mask_div_ps(q, near_tie, v, c.vs);
  } else {
    q = _mm512_div_ps(v, c.vs);
  }
  if (ASYM) q = _mm512_add_ps(_mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), c.vz);
  // Clamping before the (round-half-even) conversion gives clamp(rint(q)): the bounds are integers.
  q = _mm512_min_ps(_mm512_max_ps(q, c.vlo), c.vhi);
  return _mm512_cvt_roundps_epi32(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// 64 codes of z[0..64) as one 64-byte vector. The tie check is one compare and one branch for the
// four vectors.
// CLAMP false (symmetric, dynamic scale): |y| <= absmax = scale * qmax, so |y * (1/scale)| <=
// qmax (1 + 2^-22) rounds into [-qmax, qmax] and the clamps are skipped. Packing: two dword->word
// packs and one word->byte pack (in-range values: the saturation never acts) leave the bytes
// 4x4-dword transposed per lane; one vpermd restores the order (half the shuffle uops of four
// vpmovdb, and one store instead of four).
template <bool ASYM, bool CLAMP>
OOD_TARGET_AVX512 OOD_FWHT_INLINE __m512i quant64(const float* z, const QVec& c) {
  __m512 v[4], q[4], d[4];
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    v[k] = _mm512_loadu_ps(z + 16 * k);
    q[k] = _mm512_mul_ps(v[k], c.vr);
    d[k] = _mm512_reduce_ps(q[k], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // q - rint(q)
  }
  // One compare for the four vectors: the largest |d| (vrangeps imm 0x0B: the operand of larger
  // magnitude, sign cleared). Per-lane masks only on the rare branch.
  const __m512 dmax = _mm512_range_ps(_mm512_range_ps(d[0], d[1], 0x0B), _mm512_range_ps(d[2], d[3], 0x0B), 0x0B);
  if (_mm512_cmp_ps_mask(dmax, c.thr, _CMP_GT_OQ)) {
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k)
      q[k] = _mm512_mask_div_ps(q[k], _mm512_cmp_ps_mask(_mm512_abs_ps(d[k]), c.thr, _CMP_GT_OQ), v[k], c.vs);
  }
  __m512i i[4];
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    if (ASYM) q[k] = _mm512_add_ps(_mm512_roundscale_ps(q[k], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), c.vz);
    if (CLAMP) q[k] = _mm512_min_ps(_mm512_max_ps(q[k], c.vlo), c.vhi);
    i[k] = _mm512_cvt_roundps_epi32(q[k], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  const __m512i ab = _mm512_packs_epi32(i[0], i[1]), de = _mm512_packs_epi32(i[2], i[3]);
  const __m512i bytes = ASYM ? _mm512_packus_epi16(ab, de) : _mm512_packs_epi16(ab, de);
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_epi32(idx, bytes);
}

template <bool ASYM, bool STREAM, bool CLAMP>
OOD_TARGET_AVX512 void avx512_quantize_t(const float* z, int64_t n, const QVec& c, int8_t* codes, fwht::Prefetch& pf) {
  int64_t i = 0;
  if (c.recip_ok) {
    for (; i + 64 <= n; i += 64) {
      const __m512i v = quant64<ASYM, CLAMP>(z + i, c);
      if (STREAM)
        _mm512_stream_si512(reinterpret_cast<__m512i*>(codes + i), v);
      else
        _mm512_storeu_si512(codes + i, v);
      pf.step(4);
    }
  }
  for (; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm_mask_storeu_epi8(codes + i, k, _mm512_cvtepi32_epi8(quant_i32<ASYM>(_mm512_maskz_loadu_ps(k, z + i), c)));
  }
}

// codes: n int8/uint8; stream: non-temporal stores (codes 64-byte aligned, n % 64 == 0);
// dynamic: the scale came from these values' extremes (symmetric: no clamping needed).
OOD_TARGET_AVX512 void avx512_quantize(const float* z, int64_t n, const QParams& q, void* codes, bool stream,
                                       bool dynamic, fwht::Prefetch& pf) {
  if (q.scale == 0.0f) {
    std::memset(codes, 0, static_cast<size_t>(n));
    return;
  }
  const QVec c(q);
  int8_t* cp = static_cast<int8_t*>(codes);
  if (q.asym)
    stream ? avx512_quantize_t<true, true, true>(z, n, c, cp, pf) : avx512_quantize_t<true, false, true>(z, n, c, cp, pf);
  else if (dynamic)
    stream ? avx512_quantize_t<false, true, false>(z, n, c, cp, pf)
           : avx512_quantize_t<false, false, false>(z, n, c, cp, pf);
  else
    stream ? avx512_quantize_t<false, true, true>(z, n, c, cp, pf)
           : avx512_quantize_t<false, false, true>(z, n, c, cp, pf);
}

// Transformed row into z (z == y allowed when K == 1) and its extremes, merged into st.
template <int DT, bool ASYM>
OOD_TARGET_AVX512 void avx512_transform_stats(const Plan& pl, const void* xrow, const float* m, const float* H,
                                              float* y, float* z, Stats& st, fwht::Prefetch& pf) {
  StatSink<ASYM> snk{z, _mm512_setzero_ps(), _mm512_setzero_ps()};
  fwht::avx512_transform(pl, SrcMul<DT>{xrow, m}, y, H, snk, pf);
  if (ASYM) {
    st.hi = std::max(st.hi, _mm512_reduce_max_ps(snk.mx));
    st.lo = std::min(st.lo, _mm512_reduce_min_ps(snk.mn));
  } else {
    st.absmax = std::max(st.absmax, _mm512_reduce_max_ps(snk.mx));
  }
}

// K = 0: z = x / smooth (true division) or x, with its extremes. z has room for n rounded up to 16.
// Returns whether some z is NaN/Inf (no mixing here: every lane is checked, by vfpclassps).
OOD_TARGET_AVX512 bool avx512_prepare_stats(const void* xrow, int dt, const float* smooth, int64_t n, float* z,
                                            Stats& st) {
  __m512 mx = _mm512_setzero_ps(), mn = _mm512_setzero_ps(), am = _mm512_setzero_ps();
  const __m512 one = _mm512_set1_ps(1.0f);
  __mmask16 bad = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - i)) - 1u);
    __m512 v = load16_masked(xrow, dt, i, k);  // tail lanes 0: neutral for all three extremes
    if (smooth) v = _mm512_div_ps(v, _mm512_mask_loadu_ps(one, k, smooth + i));
    _mm512_store_ps(z + i, v);
    bad = _kor_mask16(bad, _mm512_fpclass_ps_mask(v, 0x99));  // QNaN | +Inf | -Inf | SNaN
    mx = _mm512_max_ps(mx, v);
    mn = _mm512_min_ps(mn, v);
    am = _mm512_max_ps(am, _mm512_abs_ps(v));
  }
  st.absmax = std::max(st.absmax, _mm512_reduce_max_ps(am));
  st.hi = std::max(st.hi, _mm512_reduce_max_ps(mx));
  st.lo = std::min(st.lo, _mm512_reduce_min_ps(mn));
  return bad != 0;
}

// Returns whether output element 0 (in fp32) is NaN/Inf: see hadamard() for why that suffices.
template <int DT, bool STREAM = false>
OOD_TARGET_AVX512 bool avx512_hadamard_row(const Plan& pl, const void* xrow, const float* m, const float* H,
                                           float* y, void* orow, fwht::Prefetch& pf) {
  OutSink<DT, STREAM> snk{orow};
  fwht::avx512_transform(pl, SrcMul<DT>{xrow, m}, y, H, snk, pf);
  return !std::isfinite(snk.first);
}

#endif  // OOD_FAST_X86

// ------------------------------------------------------------------------------------------
// Argument checks shared by both entry points
// ------------------------------------------------------------------------------------------

void check_shape(const char* fn, int64_t rows, int64_t n, int64_t K) {
  if (rows < 0 || n < 1) throw std::invalid_argument(std::string(fn) + ": need rows >= 0 and n >= 1");
  if (K < 1 || n % K != 0 || ((n / K) & (n / K - 1)) != 0)
    throw std::invalid_argument(std::string(fn) + ": n = " + std::to_string(n) + " is not K * 2^p for K = " +
                                std::to_string(K));
}

// Per-column multiplier (64-byte aligned, n rounded up to 16): scale * signs / smooth.
gemm::Buffer<float> make_multiplier(int64_t n, float scale, const float* signs, const float* smooth) {
  gemm::Buffer<float> m(static_cast<size_t>((n + 15) / 16 * 16));
  for (int64_t i = 0; i < n; ++i) {
    float v = signs ? scale * signs[i] : scale;
    if (smooth) v = v / smooth[i];
    m[i] = v;
  }
  return m;
}

// ------------------------------------------------------------------------------------------
// hadamard
// ------------------------------------------------------------------------------------------

// Returns true when some input value may be NaN/Inf, false when all are finite. The probe is one
// output element per row (element 0, in fp32 before any conversion): every output of the
// transform is a +-1-weighted sum over all n inputs times the multiplier (the FWHT butterflies and
// the H_K mix combine every input into every output), and a butterfly (a, b) -> (a + b, a - b)
// with a non-finite operand gives two non-finite results (Inf - Inf = NaN, NaN stays NaN; a zero
// multiplier gives Inf * 0 = NaN), so one non-finite input makes every output of its row
// non-finite. A finite row can still overflow to Inf (huge values or scale): true then too, hence
// "may"; the caller tells the two apart by scanning x (ops.hadamard does, only when this is true).
bool hadamard(uintptr_t x_ptr, const std::string& dtype, int64_t rows, int64_t n, int64_t K, uintptr_t hk_ptr,
              uintptr_t signs_ptr, double scale, uintptr_t out_ptr, int num_threads) {
  const int dt = parse_dtype(dtype, "hadamard");
  check_shape("hadamard", rows, n, K);
  if (!std::isfinite(scale)) throw std::invalid_argument("hadamard: scale must be finite");
  if (rows == 0) return false;
  if (!x_ptr || !out_ptr) throw std::invalid_argument("hadamard: null x or out pointer");
  if (K > 1 && !hk_ptr) throw std::invalid_argument("hadamard: K > 1 needs H_K (hk_ptr)");
  const float* hk = reinterpret_cast<const float*>(hk_ptr);
  const float* signs = reinterpret_cast<const float*>(signs_ptr);
  // K = 1: H_1 is [[h]] (normally 1); fold it into the scale.
  const float s = static_cast<float>(scale) * (K == 1 && hk ? hk[0] : 1.0f);
  Plan pl = Plan::make(n, K);
  if (want_sign_mix()) pl.set_mix(hk);
  const gemm::Buffer<float> m = make_multiplier(n, s, signs, nullptr);
  const bool vec = use_avx512() && pl.L >= 16;
  const int nt = pick_threads(num_threads, rows, n);
  const size_t es = dtype_size(dt);
  const char* x = reinterpret_cast<const char*>(x_ptr);
  char* out = reinterpret_cast<char*>(out_ptr);
  const size_t nbuf = static_cast<size_t>((n + 15) / 16 * 16);
  std::vector<gemm::Buffer<float>> ys(nt), zs(nt);
  for (int t = 0; t < nt; ++t) {
    ys[t].resize(nbuf);
    if (K > 1 && !vec) zs[t].resize(nbuf);
  }
  const bool stream = want_stream(rows * n * 4) && dt == kF32 && out_ptr % 64 == 0 && (n * 4) % 64 == 0;
  std::vector<char> bad_t(nt, 0);

#pragma omp parallel num_threads(nt)
  {
    const int t = thread_id(), T = thread_count();
    const int64_t r0 = rows * t / T, r1 = rows * (t + 1) / T;
    float* y = ys[t].data();
    bool bad = false;
    for (int64_t r = r0; r < r1; ++r) {
      const void* xr = x + static_cast<size_t>(r) * n * es;
      void* orow = out + static_cast<size_t>(r) * n * es;
#ifdef OOD_FAST_X86
      if (vec) {
        const size_t rb = static_cast<size_t>(n) * es;
        fwht::Prefetch pf;
        pf = prefetch_row(x, rb, r, r1, pl.work_vectors());
        bool b;
        switch (dt) {
          case kF32:
            if (stream)
              b = avx512_hadamard_row<kF32, true>(pl, xr, m.data(), hk, y, orow, pf);
            else
              b = avx512_hadamard_row<kF32>(pl, xr, m.data(), hk, y, orow, pf);
            break;
          case kF16: b = avx512_hadamard_row<kF16>(pl, xr, m.data(), hk, y, orow, pf); break;
          default: b = avx512_hadamard_row<kBF16>(pl, xr, m.data(), hk, y, orow, pf); break;
        }
        bad |= b;
        continue;
      }
#endif
      float* z = K > 1 ? zs[t].data() : y;
      generic_transform(pl, xr, dt, m.data(), hk, y, z);
      bad |= !std::isfinite(z[0]);
      for (int64_t i = 0; i < n; ++i) store_elem(orow, dt, i, z[i]);
    }
    bad_t[t] = bad;
    if (stream) store_fence();
  }
  for (char b : bad_t)
    if (b) return true;
  return false;
}

// ------------------------------------------------------------------------------------------
// rotate_quantize
// ------------------------------------------------------------------------------------------

struct RQ {
  Plan pl;
  int dt = kF32;
  int64_t n = 0;
  bool rotate = true, asym = false, vec = false, stream = false, dynamic = true;
  const char* x = nullptr;
  const float* m = nullptr;       // multiplier (rotate)
  const float* smooth = nullptr;  // K = 0 only
  const float* hk = nullptr;

  // Row r transformed into z (y: work buffer; z may be y on the AVX-512 path when K == 1), its
  // extremes merged into st; bad |= "the row may hold NaN/Inf" (rotated: z[0] non-finite, which
  // every non-finite input implies, see hadamard(); K = 0: any z non-finite). Returns z.
  const float* row(int64_t r, float* y, float* z, Stats& st, fwht::Prefetch* pf, bool& bad) const {
    const void* xr = x + static_cast<size_t>(r) * n * dtype_size(dt);
#ifdef OOD_FAST_X86
    if (vec) {
      if (!rotate) {
        bad |= avx512_prepare_stats(xr, dt, smooth, n, z, st);
        return z;
      }
      if (asym) {
        switch (dt) {
          case kF32: avx512_transform_stats<kF32, true>(pl, xr, m, hk, y, z, st, *pf); break;
          case kF16: avx512_transform_stats<kF16, true>(pl, xr, m, hk, y, z, st, *pf); break;
          default: avx512_transform_stats<kBF16, true>(pl, xr, m, hk, y, z, st, *pf); break;
        }
      } else {
        switch (dt) {
          case kF32: avx512_transform_stats<kF32, false>(pl, xr, m, hk, y, z, st, *pf); break;
          case kF16: avx512_transform_stats<kF16, false>(pl, xr, m, hk, y, z, st, *pf); break;
          default: avx512_transform_stats<kBF16, false>(pl, xr, m, hk, y, z, st, *pf); break;
        }
      }
      bad |= !std::isfinite(z[0]);
      return z;
    }
#endif
    if (!rotate) {
      generic_prepare(xr, dt, smooth, n, z);
      for (int64_t i = 0; i < n; ++i) bad |= !std::isfinite(z[i]);
    } else {
      generic_transform(pl, xr, dt, m, hk, y, z);
      bad |= !std::isfinite(z[0]);
    }
    generic_stats(z, n, st);
    return z;
  }

  // Spread over the transform and the quantization of row r (n / 16 vector steps each, the
  // latter stepping 4 per 64 codes).
  fwht::Prefetch next(int64_t r, int64_t r1) const {
    const int64_t work = (rotate && vec ? pl.work_vectors() : 0) + n / 16;
    return prefetch_row(x, static_cast<size_t>(n) * dtype_size(dt), r, r1, work);
  }

  void quantize(const float* zr, const QParams& q, void* codes, fwht::Prefetch* pf) const {
#ifdef OOD_FAST_X86
    if (vec) return avx512_quantize(zr, n, q, codes, stream, dynamic, *pf);
#endif
    generic_quantize(zr, n, q, codes);
  }
};

// Returns true when some input value may be NaN/Inf (exact for K = 0; with a rotation, as for
// hadamard(): also true when a finite row overflows), false when all are finite.
bool rotate_quantize(uintptr_t x_ptr, const std::string& dtype, int64_t rows, int64_t n, int64_t K, uintptr_t hk_ptr,
                     uintptr_t signs_ptr, uintptr_t smooth_ptr, bool per_token, bool symmetric, double static_scale,
                     int bits, uintptr_t codes_ptr, uintptr_t scales_ptr, uintptr_t zeros_ptr, int num_threads) {
  const char* fn = "rotate_quantize";
  const int dt = parse_dtype(dtype, fn);
  if (K == 0) {
    if (rows < 0 || n < 1) throw std::invalid_argument("rotate_quantize: need rows >= 0 and n >= 1");
    if (signs_ptr) throw std::invalid_argument("rotate_quantize: signs need a rotation (K >= 1)");
  } else {
    check_shape(fn, rows, n, K);
  }
  if (bits < 2 || bits > 8) throw std::invalid_argument("rotate_quantize: bits must be in 2..8");
  if (!std::isfinite(static_scale)) throw std::invalid_argument("rotate_quantize: static_scale must be finite");
  const bool is_static = static_scale > 0.0;
  if (is_static && !symmetric) throw std::invalid_argument("rotate_quantize: a static scale needs symmetric");
  if (K > 1 && !hk_ptr) throw std::invalid_argument("rotate_quantize: K > 1 needs H_K (hk_ptr)");
  if (!symmetric && !zeros_ptr) throw std::invalid_argument("rotate_quantize: asymmetric needs zeros_ptr");
  if (rows == 0 && per_token) return false;
  if ((rows > 0 && (!x_ptr || !codes_ptr)) || !scales_ptr)
    throw std::invalid_argument("rotate_quantize: null x, codes or scales pointer");

  RQ rq;
  rq.dt = dt;
  rq.n = n;
  rq.rotate = K >= 1;
  rq.asym = !symmetric;
  rq.x = reinterpret_cast<const char*>(x_ptr);
  rq.smooth = reinterpret_cast<const float*>(smooth_ptr);
  const float* hk = reinterpret_cast<const float*>(hk_ptr);
  rq.hk = hk;
  gemm::Buffer<float> m;
  if (rq.rotate) {
    rq.pl = Plan::make(n, K);
    if (want_sign_mix()) rq.pl.set_mix(hk);
    const float s = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n))) * (K == 1 && hk ? hk[0] : 1.0f);
    m = make_multiplier(n, s, reinterpret_cast<const float*>(signs_ptr), rq.smooth);
    rq.m = m.data();
    rq.vec = use_avx512() && rq.pl.L >= 16;
  } else {
    rq.vec = use_avx512();
  }
  const float sstat = static_cast<float>(static_scale);
  int8_t* codes = reinterpret_cast<int8_t*>(codes_ptr);
  float* scales = reinterpret_cast<float*>(scales_ptr);
  int32_t* zeros = reinterpret_cast<int32_t*>(zeros_ptr);
  // The transformed row may live in the work buffer itself only for K == 1 on the AVX-512 path.
  const bool z_is_y = rq.vec && rq.rotate && K == 1;
  const size_t nbuf = static_cast<size_t>((n + 15) / 16 * 16);
  const int nt = pick_threads(num_threads, std::max<int64_t>(rows, 1), n);
  rq.dynamic = !is_static;
  rq.stream = rq.vec && want_stream(rows * n) && codes_ptr % 64 == 0 && n % 64 == 0;
  std::vector<char> bad_t(nt, 0);
  const auto any_bad = [&bad_t] {
    for (char b : bad_t)
      if (b) return true;
    return false;
  };

  if (per_token || is_static) {
    // Short rows (<= 8 KiB of fp32) are software-pipelined by one row: row r is transformed (into
    // the buffer pair r % 2) before row r - 1 is quantized, so that the quantizer's wait for row
    // r's scale (the end of its transform, a horizontal reduction, two divisions) overlaps
    // independent work instead of stalling every short row. Long rows amortize that wait and
    // would lose L1 to the second buffer (at n = 4096 two 16 KiB buffers plus the incoming row
    // fill the 48 KiB L1; measured ~5% slower pipelined): quantized at once, from one buffer.
    const bool pipe = nbuf * 4 <= 8192;
    std::vector<gemm::Buffer<float>> ys(nt), zs(2 * nt);
    for (int t = 0; t < nt; ++t) {
      ys[t].resize(nbuf);
      zs[2 * t].resize(nbuf);
      if (pipe) zs[2 * t + 1].resize(nbuf);
    }
    if (!per_token) scales[0] = sstat;
#pragma omp parallel num_threads(nt)
    {
      const int t = thread_id(), T = thread_count();
      const int64_t r0 = rows * t / T, r1 = rows * (t + 1) / T;
      const float* prev = nullptr;
      QParams qprev;
      fwht::Prefetch pf;
      bool bad = false;
      for (int64_t r = r0; r <= r1; ++r) {
        const float* zr = nullptr;
        QParams q;
        if (r < r1) {
          float* z = zs[2 * t + (pipe ? (r & 1) : 0)].data();
          float* y = z_is_y ? z : ys[t].data();
          Stats st;
          pf = rq.next(r, r1);
          zr = rq.row(r, y, z, st, &pf, bad);
          q = make_params(st, symmetric, sstat, bits);
          if (per_token) {
            scales[r] = q.scale;
            if (zeros) zeros[r] = static_cast<int32_t>(q.zero);
          }
        }
        if (!pipe) {
          if (zr) rq.quantize(zr, q, codes + r * n, &pf);
          continue;
        }
        if (prev) rq.quantize(prev, qprev, codes + (r - 1) * n, &pf);
        prev = zr;
        qprev = q;
      }
      bad_t[t] = bad;
      if (rq.stream) store_fence();
    }
    return any_bad();
  }

  // Per tensor, dynamic: the global extremes first.
  const int64_t rows_t = (rows + nt - 1) / nt;
  const bool keep = rows_t * static_cast<int64_t>(nbuf) * 4 <= kKeepBytes;
  std::vector<gemm::Buffer<float>> ys(nt), zs(nt);
  for (int t = 0; t < nt; ++t) {
    ys[t].resize(nbuf);
    zs[t].resize(keep ? static_cast<size_t>(rows_t) * nbuf : (z_is_y ? 0 : nbuf));
  }
  std::vector<Stats> part(nt);
  QParams q;
#pragma omp parallel num_threads(nt)
  {
    const int t = thread_id(), T = thread_count();
    const int64_t r0 = rows * t / T, r1 = rows * (t + 1) / T;
    float* y = ys[t].data();
    Stats st;
    std::vector<const float*> where;
    bool bad = false;
    for (int64_t r = r0; r < r1; ++r) {
      float* z = keep ? zs[t].data() + (r - r0) * nbuf : (z_is_y ? y : zs[t].data());
      fwht::Prefetch pf = rq.next(r, r1);
      const float* zr = rq.row(r, y, z, st, &pf, bad);
      if (keep) where.push_back(zr);
    }
    part[t] = st;
    bad_t[t] = bad;
#pragma omp barrier
#pragma omp single
    {
      Stats g;
      for (const Stats& p : part) g.merge(p);
      q = make_params(g, symmetric, 0.0f, bits);
      scales[0] = q.scale;
      if (zeros) zeros[0] = static_cast<int32_t>(q.zero);
    }  // implicit barrier: every thread sees q
    for (int64_t r = r0; r < r1; ++r) {
      const float* zr;
      fwht::Prefetch pf = keep ? fwht::Prefetch{} : rq.next(r, r1);
      if (keep) {
        zr = where[r - r0];
      } else {  // second read of the input: the rows did not fit
        Stats unused;
        bool unused_bad = false;
        zr = rq.row(r, y, z_is_y ? y : zs[t].data(), unused, &pf, unused_bad);
      }
      rq.quantize(zr, q, codes + r * n, &pf);
    }
    if (rq.stream) store_fence();
  }
  return any_bad();
}

}  // namespace
}  // namespace ood_fast

void bind_hadamard(py::module_& m) {
  m.def("hadamard", &ood_fast::hadamard, py::arg("x_ptr"), py::arg("dtype"), py::arg("rows"), py::arg("n"),
        py::arg("K"), py::arg("hk_ptr"), py::arg("signs_ptr"), py::arg("scale"), py::arg("out_ptr"),
        py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
        "out[r] = scale * (x[r] * signs) @ kron(H_K, S_{n/K}) for rows of x [rows, n] (f32|f16|bf16, "
        "contiguous; fp32 arithmetic). hk_ptr: fp32 [K, K] (+-1); signs_ptr: fp32 [n] or 0; out has x's "
        "dtype and may be x (in place). Returns True when some x value may be NaN/Inf (always when one is; also "
        "when a finite row overflows), False when all are finite. See csrc/cpu/hadamard.cpp.");
  m.def("rotate_quantize", &ood_fast::rotate_quantize, py::arg("x_ptr"), py::arg("dtype"), py::arg("rows"),
        py::arg("n"), py::arg("K"), py::arg("hk_ptr"), py::arg("signs_ptr"), py::arg("smooth_ptr"),
        py::arg("per_token"), py::arg("symmetric"), py::arg("static_scale"), py::arg("bits"), py::arg("codes_ptr"),
        py::arg("scales_ptr"), py::arg("zeros_ptr"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
        "Fused (x / smooth) -> Hadamard (1/sqrt(n), signs; K = 0: none) -> int quantization of x [rows, n]. "
        "codes [rows, n] int8 (symmetric) or uint8; scales fp32 [rows] (per token) or [1]; zeros int32 like "
        "scales or 0 when symmetric; static_scale <= 0: dynamic; bits 2..8. Returns True when some x value may be "
        "NaN/Inf (K = 0: exactly when one is), False when all are finite. See csrc/cpu/hadamard.cpp.");
}
