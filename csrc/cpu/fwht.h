// Fast Walsh-Hadamard transform core for rows of n = K * L, L = 2^p (see docs/QUANT_CONTRACT.md).
//
// Convention (row vectors): y = x @ kron(H_K, S_L), S_L the Sylvester matrix in natural order
// (S[i, j] = (-1)^popcount(i & j), symmetric). With the row viewed as X [K, L] (element a*L + b),
// y[c, :] = sum_a H_K[a, c] * fwht(X[a, :]): an unnormalised FWHT along each sub-row of L, then
// the K sub-rows mixed with H_K transposed (H_K need not be symmetric). Scale and signs are the
// caller's (folded into the per-column multiplier that the load applies).
//
// Portable path: plain butterflies and a plain mix (generic_*). AVX-512 path (avx512_transform):
//   1. load pass: blocks of 16 R floats (R = 2^(min(p, 8) - 4) zmm registers) are loaded
//      (converted to fp32, times the multiplier), and all butterflies with stride < 16 R are done
//      in registers: strides 1, 2, 4, 8 inside a register (permute + FMA by a +-1 lane vector),
//      16 .. 8R across registers;
//   2. the remaining p - 8 stages in radix-2^t passes (t <= 4, stages balanced over the passes)
//      over the row's fp32 buffer while it sits in L1/L2;
//   3. for K > 1 the mix. H_K all +-1 (always, from ops): the sign-set mix, output c = 2 P - S or
//      S - 2 M with S the sum of the K sub-rows and P / M the sum over the smaller of the +1 / -1
//      sets of column c (K / 2 + 2 adds per output vector, ~1.2x the K = 20/28 transform; fp32
//      results differ from the plain sum in the last bits); any other H: K FMAs per output
//      vector with broadcast H_K[a, c].
// The last of these writes to the caller's sink (conversion + store, or statistics for the
// quantizer); earlier ones to the fp32 work buffer. Needs L >= 16; smaller L use the portable path.
#pragma once

#include <algorithm>
#include <cstdint>

#include "gemm.h"  // OOD_FAST_X86, OOD_TARGET_AVX512, intrinsics, scalar conversions

// Every helper below is forced inline: the butterflies pass registers as __m512 arrays, which
// a call would spill to the stack (GCC otherwise declines to inline cross<16> into large callers).
#define OOD_FWHT_INLINE inline __attribute__((always_inline))

namespace ood_fast {
namespace fwht {

// ------------------------------------------------------------------------------------------
// Portable
// ------------------------------------------------------------------------------------------

// In place: unnormalised FWHT of each of the n / L consecutive sub-rows of length L of y.
inline void generic_fwht(float* y, int64_t n, int64_t L) {
  for (int64_t h = 1; h < L; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float a = y[j], b = y[j + h];
        y[j] = a + b;
        y[j + h] = a - b;
      }
}

// z[c*L + j] = sum_a H[a*K + c] * y[a*L + j] (z != y), summed in order a = 0..K-1.
inline void generic_mix(const float* y, float* z, const float* H, int64_t K, int64_t L) {
  for (int64_t c = 0; c < K; ++c)
    for (int64_t j = 0; j < L; ++j) {
      float s = 0.0f;
      for (int64_t a = 0; a < K; ++a) s += H[a * K + c] * y[a * L + j];
      z[c * L + j] = s;
    }
}

// ------------------------------------------------------------------------------------------
// Pass plan (shared by both paths; only the AVX-512 path uses the pass split)
// ------------------------------------------------------------------------------------------

struct Plan {
  int64_t n = 0, L = 0, K = 1;
  int p = 0;
  int first_log = 0;  // log2 of the load pass's block (stages done in registers while loading)
  int npass = 0;      // further radix passes
  int pass_t[32] = {};
  int64_t pass_s[32] = {};  // stride (elements) of each pass's first stage
  // Sign-set mix (set_mix: H all +-1, K <= kMixMax): output c = 2 P - S or S - 2 M, S the sum of
  // all K sub-rows and P / M the sum over the smaller of {a: H[a, c] = +1} / {a: H[a, c] = -1}
  // (mix_idx[mix_off[c] .. mix_off[c + 1]), mix_neg[c] true for M): about K / 2 + 2 adds per
  // output vector instead of K FMAs.
  static constexpr int kMixMax = 32;
  bool mix_pm1 = false;
  int mix_off[kMixMax + 1] = {};
  int16_t mix_idx[kMixMax * kMixMax] = {};
  bool mix_neg[kMixMax] = {};

  static Plan make(int64_t n, int64_t K) {
    Plan pl;
    pl.n = n;
    pl.K = K;
    pl.L = n / K;
    while ((int64_t(1) << pl.p) < pl.L) ++pl.p;
    pl.first_log = std::min(pl.p, 8);
    const int rest = pl.p - pl.first_log;
    pl.npass = (rest + 3) / 4;
    int64_t s = int64_t(1) << pl.first_log;
    for (int k = 0; k < pl.npass; ++k) {
      pl.pass_t[k] = rest / pl.npass + (k < rest % pl.npass ? 1 : 0);
      pl.pass_s[k] = s;
      s <<= pl.pass_t[k];
    }
    return pl;
  }

  // Vector steps (16 values each) of one row's transform on the AVX-512 path: the load pass, the
  // radix passes and the mix each step through n / 16 vectors (the Prefetch rate's denominator).
  int64_t work_vectors() const { return (1 + npass + (K > 1 ? 1 : 0)) * (n / 16); }

  // Enables the sign-set mix when H [K, K] is all +-1 (else the mix stays K FMAs per output).
  void set_mix(const float* H) {
    mix_pm1 = false;
    if (K <= 1 || K > kMixMax || !H) return;
    for (int64_t i = 0; i < K * K; ++i)
      if (H[i] != 1.0f && H[i] != -1.0f) return;
    int at = 0;
    for (int64_t c = 0; c < K; ++c) {
      int plus = 0;
      for (int64_t a = 0; a < K; ++a) plus += H[a * K + c] > 0.0f;
      mix_neg[c] = 2 * plus > K;  // the minus set is the smaller one
      mix_off[c] = at;
      for (int64_t a = 0; a < K; ++a)
        if ((H[a * K + c] > 0.0f) != mix_neg[c]) mix_idx[at++] = static_cast<int16_t>(a);
    }
    mix_off[K] = at;
    mix_pm1 = true;
  }
};

// Prefetches a later row's input into L2 while the current row is computed from L1/L2, so that
// memory traffic overlaps the in-cache passes instead of adding to them (the hardware prefetcher
// only runs a short way ahead of demand loads, and the later passes make none). The row's lines
// are spread evenly over the row's work: each pass step reports the vectors it processed, and
// lines_per / work_per lines go out per vector. A burst of a whole row's prefetches at once fills
// the core's miss buffers and stalls the pipeline on the prefetch instructions themselves
// (measured: ~1.2x slower rotate_quantize at n = 4096 than the spread version).
struct Prefetch {
  const char* p = nullptr;
  const char* end = nullptr;
  int lines_per = 0, work_per = 1, acc = 0;
  inline void step(int vectors) {
    acc += vectors * lines_per;
    for (; acc >= work_per && p < end; acc -= work_per, p += 64) __builtin_prefetch(p, 0, 2);
  }
};

#ifdef OOD_FAST_X86

// Strides 1, 2, 4, 8 inside one register: v[i] <- v[i ^ s] + (bit s of i ? -v[i] : v[i]), i.e.
// (a, b) -> (a + b, a - b) for every pair, each as one permute and one FMA by +-1 (exact).
OOD_TARGET_AVX512 OOD_FWHT_INLINE __m512 fwht16(__m512 v) {
  const __m512 s1 = _mm512_setr_ps(1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1);
  const __m512 s2 = _mm512_setr_ps(1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1);
  const __m512 s4 = _mm512_setr_ps(1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1);
  const __m512 s8 = _mm512_setr_ps(1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1);
  v = _mm512_fmadd_ps(v, s1, _mm512_permute_ps(v, 0xB1));          // swap neighbours
  v = _mm512_fmadd_ps(v, s2, _mm512_permute_ps(v, 0x4E));          // swap pairs
  v = _mm512_fmadd_ps(v, s4, _mm512_shuffle_f32x4(v, v, 0xB1));    // swap 128-bit lanes
  return _mm512_fmadd_ps(v, s8, _mm512_shuffle_f32x4(v, v, 0x4E));  // swap 256-bit halves
}

// Butterflies across R registers (element strides 16 R_k for the vector index strides 1..R/2).
template <int R>
OOD_TARGET_AVX512 OOD_FWHT_INLINE void cross(__m512* v) {
#pragma GCC unroll 16
  for (int h = 1; h < R; h *= 2)
#pragma GCC unroll 16
    for (int i = 0; i < R; i += 2 * h)
#pragma GCC unroll 16
      for (int j = i; j < i + h; ++j) {
        const __m512 a = v[j], b = v[j + h];
        v[j] = _mm512_add_ps(a, b);
        v[j + h] = _mm512_sub_ps(a, b);
      }
}

// Sinks: put(i, v) stores 16 values at element i; observe<R>(v) sees each group of R vectors just
// stored (the quantizer's statistics sink reduces them as a tree, not as one serial chain).
struct BufSink {
  float* y;
  OOD_TARGET_AVX512 OOD_FWHT_INLINE void put(int64_t i, __m512 v) { _mm512_store_ps(y + i, v); }
  template <int R>
  OOD_TARGET_AVX512 OOD_FWHT_INLINE void observe(const __m512*) {}
};

// Load pass: src.load(i) gives 16 fp32 values of the (multiplied) input at element i.
template <int R, class Src, class Snk>
OOD_TARGET_AVX512 OOD_FWHT_INLINE void load_pass(const Src& src, Snk& snk, int64_t n, Prefetch& pf) {
  for (int64_t i = 0; i < n; i += 16 * R) {
    pf.step(R);
    __m512 v[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) v[r] = fwht16(src.load(i + 16 * r));
    cross<R>(v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) snk.put(i + 16 * r, v[r]);
    snk.template observe<R>(v);
  }
}

// One radix-2^T pass over y (stages with element strides S, 2S, .., 2^(T-1) S; S % 16 == 0).
template <int T, class Snk>
OOD_TARGET_AVX512 OOD_FWHT_INLINE void radix_pass(const float* y, Snk& snk, int64_t n, int64_t S, Prefetch& pf) {
  constexpr int R = 1 << T;
  for (int64_t base = 0; base < n; base += R * S)
    for (int64_t j = base; j < base + S; j += 16) {
      __m512 v[R];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) v[r] = _mm512_load_ps(y + j + r * S);
      cross<R>(v);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) snk.put(j + r * S, v[r]);
      snk.template observe<R>(v);
      pf.step(R);
    }
}

// Mix of CB outputs c0..c0+CB-1 at columns j.. j + 16 JV: K loads and K*CB*JV FMAs.
template <int CB, int JV, class Snk>
OOD_TARGET_AVX512 OOD_FWHT_INLINE void mix_block(const float* y, const float* H, int64_t K, int64_t L, int64_t j,
                                        int64_t c0, Snk& snk) {
  __m512 acc[CB][JV];
#pragma GCC unroll 8
  for (int c = 0; c < CB; ++c)
#pragma GCC unroll 2
    for (int u = 0; u < JV; ++u) acc[c][u] = _mm512_setzero_ps();
  for (int64_t a = 0; a < K; ++a) {
    __m512 ya[JV];
#pragma GCC unroll 2
    for (int u = 0; u < JV; ++u) ya[u] = _mm512_load_ps(y + a * L + j + 16 * u);
    const float* h = H + a * K + c0;
#pragma GCC unroll 8
    for (int c = 0; c < CB; ++c) {
      const __m512 hb = _mm512_set1_ps(h[c]);
#pragma GCC unroll 2
      for (int u = 0; u < JV; ++u) acc[c][u] = _mm512_fmadd_ps(ya[u], hb, acc[c][u]);
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < CB; ++c)
#pragma GCC unroll 2
    for (int u = 0; u < JV; ++u) snk.put((c0 + c) * L + j + 16 * u, acc[c][u]);
  snk.template observe<CB * JV>(&acc[0][0]);
}

template <int JV, class Snk>
OOD_TARGET_AVX512 OOD_FWHT_INLINE void mix_cols(const float* y, const float* H, int64_t K, int64_t L, int64_t j, Snk& snk) {
  int64_t c0 = 0;
  for (; c0 + 8 <= K; c0 += 8) mix_block<8, JV>(y, H, K, L, j, c0, snk);
  switch (K - c0) {
    case 7: mix_block<7, JV>(y, H, K, L, j, c0, snk); break;
    case 6: mix_block<6, JV>(y, H, K, L, j, c0, snk); break;
    case 5: mix_block<5, JV>(y, H, K, L, j, c0, snk); break;
    case 4: mix_block<4, JV>(y, H, K, L, j, c0, snk); break;
    case 3: mix_block<3, JV>(y, H, K, L, j, c0, snk); break;
    case 2: mix_block<2, JV>(y, H, K, L, j, c0, snk); break;
    case 1: mix_block<1, JV>(y, H, K, L, j, c0, snk); break;
    default: break;
  }
}

template <class Snk>
OOD_TARGET_AVX512 OOD_FWHT_INLINE void mix_pass(const float* y, const float* H, int64_t K, int64_t L, Snk& snk, Prefetch& pf) {
  int64_t j = 0;
  for (; j + 32 <= L; j += 32) {
    mix_cols<2>(y, H, K, L, j, snk);
    pf.step(static_cast<int>(2 * K));
  }
  if (j < L) mix_cols<1>(y, H, K, L, j, snk);
}

// Sign-set mix (Plan::set_mix) of columns j .. j + 16 JV: S first (two chains), then per output
// the sum over its index set in two chains (add latency, not throughput, would bound one chain).
template <int JV, class Snk>
OOD_TARGET_AVX512 OOD_FWHT_INLINE void mix_pm1_cols(const float* y, const Plan& pl, int64_t j, Snk& snk) {
  const int64_t K = pl.K, L = pl.L;
  const float* yj = y + j;
  __m512 S[JV], t0[JV], t1[JV];
#pragma GCC unroll 4
  for (int u = 0; u < JV; ++u) {
    t0[u] = _mm512_load_ps(yj + 16 * u);
    t1[u] = _mm512_setzero_ps();
  }
  int64_t a = 1;
  for (; a + 1 < K; a += 2)
#pragma GCC unroll 4
    for (int u = 0; u < JV; ++u) {
      t0[u] = _mm512_add_ps(t0[u], _mm512_load_ps(yj + a * L + 16 * u));
      t1[u] = _mm512_add_ps(t1[u], _mm512_load_ps(yj + (a + 1) * L + 16 * u));
    }
  if (a < K)
#pragma GCC unroll 4
    for (int u = 0; u < JV; ++u) t0[u] = _mm512_add_ps(t0[u], _mm512_load_ps(yj + a * L + 16 * u));
#pragma GCC unroll 4
  for (int u = 0; u < JV; ++u) S[u] = _mm512_add_ps(t0[u], t1[u]);
  const __m512 two = _mm512_set1_ps(2.0f);
  for (int64_t c = 0; c < K; ++c) {
    const int16_t* ix = pl.mix_idx + pl.mix_off[c];
    const int m = pl.mix_off[c + 1] - pl.mix_off[c];
#pragma GCC unroll 4
    for (int u = 0; u < JV; ++u) t0[u] = t1[u] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 1 < m; k += 2) {
      const float* ya = yj + ix[k] * L;
      const float* yb = yj + ix[k + 1] * L;
#pragma GCC unroll 4
      for (int u = 0; u < JV; ++u) {
        t0[u] = _mm512_add_ps(t0[u], _mm512_load_ps(ya + 16 * u));
        t1[u] = _mm512_add_ps(t1[u], _mm512_load_ps(yb + 16 * u));
      }
    }
    if (k < m)
#pragma GCC unroll 4
      for (int u = 0; u < JV; ++u) t0[u] = _mm512_add_ps(t0[u], _mm512_load_ps(yj + ix[k] * L + 16 * u));
    __m512 o[JV];
#pragma GCC unroll 4
    for (int u = 0; u < JV; ++u) {
      const __m512 p = _mm512_add_ps(t0[u], t1[u]);
      o[u] = pl.mix_neg[c] ? _mm512_fnmadd_ps(p, two, S[u]) : _mm512_fmsub_ps(p, two, S[u]);
      snk.put(c * L + j + 16 * u, o[u]);
    }
    snk.template observe<JV>(o);
  }
}

template <class Snk>
OOD_TARGET_AVX512 OOD_FWHT_INLINE void mix_pm1_pass(const float* y, const Plan& pl, Snk& snk, Prefetch& pf) {
  int64_t j = 0;
  for (; j + 64 <= pl.L; j += 64) {
    mix_pm1_cols<4>(y, pl, j, snk);
    pf.step(static_cast<int>(4 * pl.K));
  }
  for (; j < pl.L; j += 16) {
    mix_pm1_cols<1>(y, pl, j, snk);
    pf.step(static_cast<int>(pl.K));
  }
}

template <class Src, class Snk>
OOD_TARGET_AVX512 OOD_FWHT_INLINE void dispatch_load(const Plan& pl, const Src& src, Snk& snk, Prefetch& pf) {
  switch (pl.first_log) {
    case 4: load_pass<1>(src, snk, pl.n, pf); break;
    case 5: load_pass<2>(src, snk, pl.n, pf); break;
    case 6: load_pass<4>(src, snk, pl.n, pf); break;
    case 7: load_pass<8>(src, snk, pl.n, pf); break;
    default: load_pass<16>(src, snk, pl.n, pf); break;
  }
}

template <class Snk>
OOD_TARGET_AVX512 OOD_FWHT_INLINE void dispatch_radix(int t, const float* y, Snk& snk, int64_t n, int64_t S, Prefetch& pf) {
  switch (t) {
    case 1: radix_pass<1>(y, snk, n, S, pf); break;
    case 2: radix_pass<2>(y, snk, n, S, pf); break;
    case 3: radix_pass<3>(y, snk, n, S, pf); break;
    default: radix_pass<4>(y, snk, n, S, pf); break;
  }
}

// The whole transform of one row (pl.L >= 16): src -> ... -> snk. y: fp32 work buffer of n
// floats (64-byte aligned); H: fp32 [K, K] (unused when K == 1). The sink may write into y only
// when K == 1 (the mix reads all of y). pf: a later row's input, prefetched at the rate set by
// the caller (Plan::work_vectors; what is left goes out in the caller's own pass).
template <class Src, class Snk>
OOD_TARGET_AVX512 OOD_FWHT_INLINE void avx512_transform(const Plan& pl, const Src& src, float* y, const float* H, Snk& snk,
                                               Prefetch& pf) {
  BufSink buf{y};
  if (pl.K == 1 && pl.npass == 0) {
    dispatch_load(pl, src, snk, pf);
    return;
  }
  dispatch_load(pl, src, buf, pf);
  for (int k = 0; k < pl.npass; ++k) {
    if (pl.K == 1 && k == pl.npass - 1)
      dispatch_radix(pl.pass_t[k], y, snk, pl.n, pl.pass_s[k], pf);
    else
      dispatch_radix(pl.pass_t[k], y, buf, pl.n, pl.pass_s[k], pf);
  }
  if (pl.K > 1) {
    if (pl.mix_pm1)
      mix_pm1_pass(y, pl, snk, pf);
    else
      mix_pass(y, H, pl.K, pl.L, snk, pf);
  }
}

#endif  // OOD_FAST_X86

}  // namespace fwht
}  // namespace ood_fast
