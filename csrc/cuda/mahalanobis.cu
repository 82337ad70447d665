// Fused batched Mahalanobis distances on CUDA (ood_fast._cuda.mahalanobis_fused).
//
// Math (reference: ood_fast/reference/mahalanobis.py, `fused`):
//
//   x̃ = x − center                                   x [N, E] (f32/f16/bf16, converted on load)
//   q[n, g]  = ‖x̃_n W_g‖²                             W [G, E, E] row-major (G = 0: no q term)
//   d²[n, c] = max(0, (const[c] − 2 x̃_n·proj[:, c]) + q[n, group[c]])
//   reduce: none → d² [N, C]; min → (min_c d², first argmin_c) [N]; logsumexp →
//           logsumexp_c(bias[c] − d²[n, c] / 2) [N]
//
// Kernels (all launched on the caller's stream, in stream order):
//   quad_kernel   q (or per-split partials of q) for a row tile × one group × a set of column
//                 tiles of W: a tiled GEMM x̃ W_g whose epilogue squares z and sums each row.
//                 triangular=True: W_g upper triangular, so column tile [j0, j0+BN) needs only
//                 k < j0+BN; the K loop stops there (tiles with every i > j are skipped).
//   sum_splits    q[n, g] = Σ_s qpart[s, n, g] in a fixed order (only when a split was needed).
//   dist_kernel   a row tile × a set of class tiles of x̃ @ proj with the fused epilogue: d² is
//                 stored (none) or reduced into a running per-row min/argmin or (max, Σexp)
//                 held in registers across the class tiles the CTA owns.
//   combine       per-row combination of the per-split partials of min / logsumexp, in order
//                 (only when a row tile's class tiles were split over several CTAs).
// The splits only exist to fill the GPU when there are few row tiles; with enough rows every
// CTA owns all column / class tiles of its row tile and no partials exist. All sums are in a
// fixed order: results are deterministic run to run (no atomics).
//
// GEMM tiles: BM = 64 rows × BN = 64 columns.
//   fp32  (bf16=False): SIMT FFMA, BK = 16, 256 threads, 4×4 outputs per thread, register
//         prefetch of the next K tile while the current one is computed. No TF32.
//   bf16  (bf16=True):  x̃, W and proj rounded to bf16 (round to nearest even) when staged into
//         shared memory; WMMA m16n16k16 bf16 → fp32 on tensor cores, BK = 32, 128 threads
//         (4 warps, 2×2, each 32×32). z and all epilogue math stay fp32. Needs sm_80+.
// Each tile's accumulator goes to a padded shared-memory tile, from which the epilogue reads.
//
// Workspace: q [rows, G] fp32, plus split partials when needed, allocated per call with
// cudaMallocAsync on the caller's stream and released with cudaFreeAsync on the same stream
// (cudaMalloc/cudaFree + a stream sync where the device has no memory pools). Rows are processed
// in chunks so that q never exceeds the workspace budget (64 MiB by default): for per-class
// covariances (G = C) q has the size of the distance matrix, which is never materialized whole.
#include <pybind11/pybind11.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda_check.h"

namespace py = pybind11;

namespace ood_fast::cuda::maha {

constexpr int BM = 64;        // rows of x per tile
constexpr int BN = 64;        // columns of W / classes per tile
constexpr int LDC = BN + 4;   // accumulator tile pitch (floats): 16-byte rows, fewer bank conflicts

// ---------------------------------------------------------------------------------------------
// Input element types: raw storage type and the exact conversion to float.
// ---------------------------------------------------------------------------------------------

// InF32 / InF16 / InBF16 live in cuda_check.h (shared with the other kernels).

// ---------------------------------------------------------------------------------------------
// fp32 tile GEMM (SIMT): cs[r][c] = Σ_{k < kend} x̃[row0 + r, k] · B[k, col0 + c]
// ---------------------------------------------------------------------------------------------

namespace simt {
constexpr int THREADS = 256;
constexpr int BK = 16;
constexpr int LDS = 64 + 4;  // pitch of the shared A (k-major) and B tiles, in floats
static_assert(BM == 64 && BN == 64, "the thread mapping below assumes 64 × 64 tiles");

struct __align__(16) Smem {
  float a[BK][LDS];  // x̃ tile, transposed: a[k][r]
  float b[BK][LDS];  // B tile: b[k][c]
};

template <class In>
__device__ __forceinline__ void tile_gemm(const typename In::raw* __restrict__ x,
                                          const float* __restrict__ center, int N, int E, int row0,
                                          const float* __restrict__ B, int ldb, int ncols, int col0,
                                          int kend, Smem& sm, float (*cs)[LDC]) {
  using raw = typename In::raw;
  const int tid = threadIdx.x;
  const int ak = tid % BK, ar = tid / BK;  // A loads: rows ar + 16 i, i < 4 (coalesced along k)
  const int bc = tid % BN, bk = tid / BN;  // B loads: k rows bk + 4 i, i < 4 (coalesced along c)
  const int tx = tid % 16, ty = tid / 16;  // outputs: rows ty*4 .. +3, columns tx*4 .. +3

  raw ra[4];
  float rc = 0.f;
  float rb[4];
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  // Global → registers (raw values; converted when stored to shared memory, so that the loads
  // of the next tile stay in flight while the current one is computed).
  auto load = [&](int k0) {
    const int k = k0 + ak;
    const bool kin = k < kend;
    rc = kin ? center[k] : 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = row0 + ar + 16 * i;
      ra[i] = (kin && n < N) ? x[static_cast<size_t>(n) * E + k] : raw(0);
    }
    const int c = col0 + bc;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int kk = k0 + bk + 4 * i;
      rb[i] = (kk < kend && c < ncols) ? B[static_cast<size_t>(kk) * ldb + c] : 0.f;
    }
  };

  if (kend > 0) load(0);
  for (int k0 = 0; k0 < kend; k0 += BK) {
    __syncthreads();  // the previous tile's readers are done with sm
    {
      const bool kin = k0 + ak < kend;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = ar + 16 * i;
        sm.a[ak][r] = (kin && row0 + r < N) ? In::f(ra[i]) - rc : 0.f;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) sm.b[bk + 4 * i][bc] = rb[i];
    }
    __syncthreads();
    if (k0 + BK < kend) load(k0 + BK);
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      const float4 a = *reinterpret_cast<const float4*>(&sm.a[kk][ty * 4]);
      const float4 b = *reinterpret_cast<const float4*>(&sm.b[kk][tx * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w};
      const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
    *reinterpret_cast<float4*>(&cs[ty * 4 + i][tx * 4]) =
        make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
}
}  // namespace simt

// ---------------------------------------------------------------------------------------------
// bf16 tile GEMM (tensor cores, WMMA m16n16k16, fp32 accumulation); same contract as simt.
// ---------------------------------------------------------------------------------------------

namespace tc {
constexpr int THREADS = 128;
constexpr int BK = 32;
constexpr int LDA = BK + 8;  // bf16 elements: 80-byte rows (multiple of 16 bytes, conflict-free)
constexpr int LDB = BN + 8;  // 144-byte rows
static_assert(BM == 64 && BN == 64, "the warp layout below assumes 64 × 64 tiles");

struct __align__(128) Smem {
  __nv_bfloat16 a[BM][LDA];  // x̃ tile a[r][k] (row-major A)
  __nv_bfloat16 b[BK][LDB];  // B tile b[k][c] (row-major B)
};
static_assert(sizeof(__nv_bfloat16) * BM * LDA % 32 == 0, "b must start 32-byte aligned");

template <class In>
__device__ __forceinline__ void tile_gemm(const typename In::raw* __restrict__ x,
                                          const float* __restrict__ center, int N, int E, int row0,
                                          const float* __restrict__ B, int ldb, int ncols, int col0,
                                          int kend, Smem& sm, float (*cs)[LDC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA needs sm_80+; the host refuses such devices before launching
#else
  using namespace nvcuda;
  using raw = typename In::raw;
  const int tid = threadIdx.x;
  const int ak = tid % BK, ar = tid / BK;  // A loads: rows ar + 4 i, i < 16 (coalesced along k)
  const int bc = tid % BN, bk = tid / BN;  // B loads: k rows bk + 2 i, i < 16 (coalesced along c)
  const int warp = tid / 32, wm = warp / 2, wn = warp % 2;  // warp computes rows wm*32, cols wn*32

  raw ra[16];
  float rc = 0.f;
  float rb[16];
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  auto load = [&](int k0) {
    const int k = k0 + ak;
    const bool kin = k < kend;
    rc = kin ? center[k] : 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int n = row0 + ar + 4 * i;
      ra[i] = (kin && n < N) ? x[static_cast<size_t>(n) * E + k] : raw(0);
    }
    const int c = col0 + bc;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int kk = k0 + bk + 2 * i;
      rb[i] = (kk < kend && c < ncols) ? B[static_cast<size_t>(kk) * ldb + c] : 0.f;
    }
  };

  if (kend > 0) load(0);
  for (int k0 = 0; k0 < kend; k0 += BK) {
    __syncthreads();
    {
      const bool kin = k0 + ak < kend;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int r = ar + 4 * i;
        // x̃ in fp32 first, then one round to bf16 (what the reference does).
        sm.a[r][ak] = __float2bfloat16_rn((kin && row0 + r < N) ? In::f(ra[i]) - rc : 0.f);
      }
#pragma unroll
      for (int i = 0; i < 16; ++i) sm.b[bk + 2 * i][bc] = __float2bfloat16_rn(rb[i]);
    }
    __syncthreads();
    if (k0 + BK < kend) load(k0 + BK);
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sm.a[wm * 32 + i * 16][kk], LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &sm.b[kk][wn * 32 + j * 16], LDB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&cs[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], LDC,
                              wmma::mem_row_major);
#endif
}
}  // namespace tc

template <bool TC>
struct Gemm;
template <>
struct Gemm<false> {
  static constexpr int THREADS = simt::THREADS;
  using Smem = simt::Smem;
  template <class In, class... A>
  static __device__ __forceinline__ void run(A&&... a) {
    simt::tile_gemm<In>(static_cast<A&&>(a)...);
  }
};
template <>
struct Gemm<true> {
  static constexpr int THREADS = tc::THREADS;
  using Smem = tc::Smem;
  template <class In, class... A>
  static __device__ __forceinline__ void run(A&&... a) {
    tc::tile_gemm<In>(static_cast<A&&>(a)...);
  }
};

// ---------------------------------------------------------------------------------------------
// Reductions: min with first-index ties (NaN wins, as torch.min propagates it) and an online
// logsumexp state (running max m, Σ exp(v − m)).
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ bool min_better(float va, int ia, float vb, int ib) {
  const bool na = va != va, nb = vb != vb;
  if (na || nb) return na && (!nb || ia < ib);
  return va < vb || (va == vb && ia < ib);
}

__device__ __forceinline__ void lse_add(float& m, float& s, float v) {
  if (v == -INFINITY || m == INFINITY) return;
  if (v > m) {
    s = s * expf(m - v) + 1.f;  // m = −inf the first time: s = 0 · 0 + 1
    m = v;
  } else {
    s += expf(v - m);  // v NaN: s becomes NaN and stays so
  }
}

// Symmetric in its two arguments (bitwise), so butterfly shuffles leave every lane equal.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2;
    s = s2;
    return;
  }
  const float M = fmaxf(m, m2);
  s = s * expf(m - M) + s2 * expf(m2 - M);
  m = M;
}

__device__ __forceinline__ float dist2(float acc, float cst, float q) {
  // (−2·acc + const) + q, in the reference's order; −2·acc is exact, so the fma rounds once
  // exactly as the separate multiply and add do. The clamp keeps NaN (as torch.clamp does).
  const float d = fmaf(-2.f, acc, cst) + q;
  return d < 0.f ? 0.f : d;
}

// ---------------------------------------------------------------------------------------------
// Kernel A: quadratic terms. Block b: row tile b % row_tiles, split (b / row_tiles) % splits,
// group b / (row_tiles · splits). The split s owns column tiles s, s + splits, ...
// Writes qout[(s · N + n) · G + g] (with splits = 1 that is q itself).
// ---------------------------------------------------------------------------------------------

template <class In, bool TC>
__global__ void __launch_bounds__(Gemm<TC>::THREADS)
    quad_kernel(const typename In::raw* __restrict__ x, const float* __restrict__ center,
                const float* __restrict__ factors, int N, int E, int G, int splits, bool triangular,
                float* __restrict__ qout) {
  constexpr int THREADS = Gemm<TC>::THREADS;
  constexpr int TPR = THREADS / BM;  // threads per row in the epilogue (consecutive lanes)
  static_assert(TPR >= 1 && TPR <= 32 && (TPR & (TPR - 1)) == 0, "TPR: power of two <= 32");
  __shared__ typename Gemm<TC>::Smem sm;
  __shared__ __align__(128) float cs[BM][LDC];

  const int row_tiles = (N + BM - 1) / BM;
  unsigned b = blockIdx.x;
  const int rt = static_cast<int>(b % row_tiles);
  b /= row_tiles;
  const int s = static_cast<int>(b % splits);
  const int g = static_cast<int>(b / splits);
  const int row0 = rt * BM;
  const float* W = factors + static_cast<size_t>(g) * E * E;
  const int col_tiles = (E + BN - 1) / BN;
  const int r = threadIdx.x / TPR, sub = threadIdx.x % TPR;

  float run = 0.f;
  for (int jt = s; jt < col_tiles; jt += splits) {
    const int col0 = jt * BN;
    const int kend = triangular ? min(E, col0 + BN) : E;
    Gemm<TC>::template run<In>(x, center, N, E, row0, W, E, E, col0, kend, sm, cs);
    __syncthreads();
    float sum = 0.f;
    for (int c = sub; c < BN; c += TPR) {
      if (col0 + c < E) {
        const float z = cs[r][c];
        sum = fmaf(z, z, sum);
      }
    }
#pragma unroll
    for (int off = TPR / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    run += sum;
    __syncthreads();  // cs is rewritten by the next tile
  }
  const int n = row0 + r;
  if (sub == 0 && n < N) qout[(static_cast<size_t>(s) * N + n) * G + g] = run;
}

__global__ void sum_splits_kernel(const float* __restrict__ part, int splits, size_t count,
                                  float* __restrict__ q) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) acc += part[static_cast<size_t>(s) * count + i];
    q[i] = acc;
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel B: distances with the fused epilogue. Block b: row tile b % row_tiles, split
// b / row_tiles, owning class tiles s, s + splits, ... RED: 0 none, 1 min, 2 logsumexp.
// With splits > 1 (RED != 0), row n's result for split s goes to part[s · N + n] as
// (min, argmin bits) or (m, Σexp) and combine_kernel finishes it.
// ---------------------------------------------------------------------------------------------

template <class In, bool TC, int RED>
__global__ void __launch_bounds__(Gemm<TC>::THREADS)
    dist_kernel(const typename In::raw* __restrict__ x, const float* __restrict__ center,
                const float* __restrict__ proj, const float* __restrict__ cst,
                const long long* __restrict__ group, const float* __restrict__ q, int G,
                const float* __restrict__ bias, int N, int E, int C, int splits,
                float* __restrict__ out, long long* __restrict__ idx, float2* __restrict__ part) {
  constexpr int THREADS = Gemm<TC>::THREADS;
  constexpr int TPR = THREADS / BM;
  static_assert(TPR >= 1 && TPR <= 32 && (TPR & (TPR - 1)) == 0, "TPR: power of two <= 32");
  static_assert(THREADS >= BN, "class parameters are staged one per thread");
  __shared__ typename Gemm<TC>::Smem sm;
  __shared__ __align__(128) float cs[BM][LDC];
  __shared__ float s_const[BN];
  __shared__ float s_bias[BN];
  __shared__ int s_group[BN];

  const int row_tiles = (N + BM - 1) / BM;
  const int rt = static_cast<int>(blockIdx.x % row_tiles);
  const int s = static_cast<int>(blockIdx.x / row_tiles);
  const int row0 = rt * BM;
  const int class_tiles = (C + BN - 1) / BN;
  const int tid = threadIdx.x;
  const int r = tid / TPR, sub = tid % TPR;

  float best = INFINITY;  // RED 1: running (min, argmin)
  int best_i = INT_MAX;
  float lm = -INFINITY, ls = 0.f;  // RED 2: running (max, Σexp)

  for (int ct = s; ct < class_tiles; ct += splits) {
    const int col0 = ct * BN;
    if (tid < BN) {  // read after the __syncthreads that follows the GEMM
      const int c = col0 + tid;
      if (c < C) {
        s_const[tid] = cst[c];
        s_group[tid] = G > 0 ? static_cast<int>(group[c]) : 0;
        s_bias[tid] = (RED == 2 && bias != nullptr) ? bias[c] : 0.f;
      }
    }
    Gemm<TC>::template run<In>(x, center, N, E, row0, proj, C, C, col0, E, sm, cs);
    __syncthreads();

    if constexpr (RED == 0) {
      for (int i = tid; i < BM * BN; i += THREADS) {
        const int rr = i / BN, c = i % BN;
        const int n = row0 + rr, cc = col0 + c;
        if (n < N && cc < C) {
          float qv = 0.f;
          if (G > 0) {
            const int gg = s_group[c];
            qv = (gg >= 0 && gg < G) ? q[static_cast<size_t>(n) * G + gg] : NAN;
          }
          out[static_cast<size_t>(n) * C + cc] = dist2(cs[rr][c], s_const[c], qv);
        }
      }
    } else {
      const int n = row0 + r;
      float tb = INFINITY;
      int ti = INT_MAX;
      float tm = -INFINITY, ts = 0.f;
      if (n < N) {
        for (int c = sub; c < BN; c += TPR) {
          const int cc = col0 + c;
          if (cc >= C) break;
          float qv = 0.f;
          if (G > 0) {
            const int gg = s_group[c];
            qv = (gg >= 0 && gg < G) ? q[static_cast<size_t>(n) * G + gg] : NAN;
          }
          const float d = dist2(cs[r][c], s_const[c], qv);
          if constexpr (RED == 1) {
            if (min_better(d, cc, tb, ti)) {
              tb = d;
              ti = cc;
            }
          } else {
            lse_add(tm, ts, s_bias[c] - 0.5f * d);
          }
        }
      }
      // Combine the TPR lanes of this row (all lanes of the warp take part).
#pragma unroll
      for (int off = TPR / 2; off > 0; off >>= 1) {
        if constexpr (RED == 1) {
          const float ob = __shfl_xor_sync(0xffffffffu, tb, off);
          const int oi = __shfl_xor_sync(0xffffffffu, ti, off);
          if (min_better(ob, oi, tb, ti)) {
            tb = ob;
            ti = oi;
          }
        } else {
          const float om = __shfl_xor_sync(0xffffffffu, tm, off);
          const float os = __shfl_xor_sync(0xffffffffu, ts, off);
          lse_merge(tm, ts, om, os);
        }
      }
      if constexpr (RED == 1) {
        if (min_better(tb, ti, best, best_i)) {
          best = tb;
          best_i = ti;
        }
      } else {
        lse_merge(lm, ls, tm, ts);
      }
    }
    __syncthreads();  // cs and the class parameters are rewritten by the next tile
  }

  if constexpr (RED != 0) {
    const int n = row0 + r;
    if (sub == 0 && n < N) {
      if (splits == 1) {
        if constexpr (RED == 1) {
          out[n] = best;
          idx[n] = best_i;
        } else {
          out[n] = lm + logf(ls);  // all terms −inf: −inf + log 0 = −inf
        }
      } else {
        part[static_cast<size_t>(s) * N + n] =
            RED == 1 ? make_float2(best, __int_as_float(best_i)) : make_float2(lm, ls);
      }
    }
  }
}

template <int RED>
__global__ void combine_kernel(const float2* __restrict__ part, int splits, int N,
                               float* __restrict__ out, long long* __restrict__ idx) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  float a = RED == 1 ? INFINITY : -INFINITY, b = 0.f;
  int bi = INT_MAX;
  for (int s = 0; s < splits; ++s) {  // fixed order: deterministic
    const float2 p = part[static_cast<size_t>(s) * N + n];
    if constexpr (RED == 1) {
      const int pi = __float_as_int(p.y);
      if (min_better(p.x, pi, a, bi)) {
        a = p.x;
        bi = pi;
      }
    } else {
      lse_merge(a, b, p.x, p.y);
    }
  }
  if constexpr (RED == 1) {
    out[n] = a;
    idx[n] = bi;
  } else {
    out[n] = a + logf(b);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

std::atomic<size_t> g_q_budget{size_t(64) << 20};  // bytes of q per row chunk

inline long long cdiv(long long a, long long b) { return (a + b - 1) / b; }
inline size_t align_floats(size_t n) { return (n + 63) / 64 * 64; }  // 256-byte regions

struct ChunkPlan {
  int q_splits = 1;     // column-tile splits of kernel A (1: it writes q directly)
  int dist_splits = 1;  // class-tile splits of kernel B
  size_t q_floats = 0, qpart_floats = 0, rpart_float2 = 0;
};

ChunkPlan plan_chunk(long long rows, int E, int G, int C, int reduce, int sms) {
  ChunkPlan p;
  const long long row_tiles = cdiv(rows, BM);
  const long long target = 2LL * sms;  // CTAs wanted in flight
  if (G > 0) {
    const long long col_tiles = cdiv(E, BN);
    p.q_splits = static_cast<int>(std::clamp(cdiv(target, row_tiles * G), 1LL, col_tiles));
    p.q_floats = align_floats(static_cast<size_t>(rows) * G);
    if (p.q_splits > 1) p.qpart_floats = align_floats(static_cast<size_t>(p.q_splits) * rows * G);
  }
  const long long class_tiles = cdiv(C, BN);
  if (reduce == 0) {
    p.dist_splits = static_cast<int>(class_tiles);
  } else {
    p.dist_splits = static_cast<int>(std::clamp(cdiv(target, row_tiles), 1LL, class_tiles));
    if (p.dist_splits > 1) p.rpart_float2 = align_floats(static_cast<size_t>(p.dist_splits) * rows);
  }
  return p;
}

struct Args {
  const void* x;
  int N, E, G, C, reduce;
  const float *center, *factors, *proj, *cst, *bias;
  const long long* group;
  float* out;
  long long* idx;
  bool triangular;
  cudaStream_t stream;
  int sms;
};

template <class In, bool TC>
void run_typed(const Args& a, float* q, float* qpart, float2* rpart, long long row_chunk) {
  using raw = typename In::raw;
  constexpr int THREADS = Gemm<TC>::THREADS;
  const raw* x = static_cast<const raw*>(a.x);
  for (long long n0 = 0; n0 < a.N; n0 += row_chunk) {
    const int rows = static_cast<int>(std::min<long long>(row_chunk, a.N - n0));
    const ChunkPlan p = plan_chunk(rows, a.E, a.G, a.C, a.reduce, a.sms);
    const raw* xc = x + static_cast<size_t>(n0) * a.E;
    const long long row_tiles = cdiv(rows, BM);

    if (a.G > 0) {
      const long long blocks = row_tiles * p.q_splits * a.G;
      if (blocks > INT_MAX) throw std::invalid_argument("ood_fast._cuda: too many groups × rows");
      float* dst = p.q_splits > 1 ? qpart : q;
      quad_kernel<In, TC><<<static_cast<unsigned>(blocks), THREADS, 0, a.stream>>>(
          xc, a.center, a.factors, rows, a.E, a.G, p.q_splits, a.triangular, dst);
      OOD_CUDA_CHECK_LAUNCH("quad_kernel", a.stream);
      if (p.q_splits > 1) {
        const size_t count = static_cast<size_t>(rows) * a.G;
        const long long grid = std::min<long long>(cdiv(static_cast<long long>(count), 256),
                                                   32LL * a.sms);
        sum_splits_kernel<<<static_cast<unsigned>(grid), 256, 0, a.stream>>>(qpart, p.q_splits,
                                                                              count, q);
        OOD_CUDA_CHECK_LAUNCH("sum_splits_kernel", a.stream);
      }
    }

    const long long blocks = row_tiles * p.dist_splits;
    if (blocks > INT_MAX) throw std::invalid_argument("ood_fast._cuda: too many rows × classes");
    float* out = a.out + (a.reduce == 0 ? static_cast<size_t>(n0) * a.C : static_cast<size_t>(n0));
    long long* idx = a.idx != nullptr ? a.idx + n0 : nullptr;
    const float* qc = a.G > 0 ? q : nullptr;
#define OOD_DIST(RED)                                                                       \
  dist_kernel<In, TC, RED><<<static_cast<unsigned>(blocks), THREADS, 0, a.stream>>>(        \
      xc, a.center, a.proj, a.cst, a.group, qc, a.G, a.bias, rows, a.E, a.C, p.dist_splits, \
      out, idx, rpart)
    if (a.reduce == 0) OOD_DIST(0);
    else if (a.reduce == 1) OOD_DIST(1);
    else OOD_DIST(2);
#undef OOD_DIST
    OOD_CUDA_CHECK_LAUNCH("dist_kernel", a.stream);
    if (a.reduce != 0 && p.dist_splits > 1) {
      const unsigned grid = static_cast<unsigned>(cdiv(rows, 256));
      if (a.reduce == 1)
        combine_kernel<1><<<grid, 256, 0, a.stream>>>(rpart, p.dist_splits, rows, out, idx);
      else
        combine_kernel<2><<<grid, 256, 0, a.stream>>>(rpart, p.dist_splits, rows, out, idx);
      OOD_CUDA_CHECK_LAUNCH("combine_kernel", a.stream);
    }
  }
}

int as_int(long long v, const char* name, long long lo) {
  if (v < lo || v > INT_MAX)
    throw std::invalid_argument(std::string("ood_fast._cuda.mahalanobis_fused: ") + name +
                                " out of range: " + std::to_string(v));
  return static_cast<int>(v);
}

template <class T>
T* as_ptr(std::uintptr_t p, const char* name, bool required) {
  if (required && p == 0)
    throw std::invalid_argument(std::string("ood_fast._cuda.mahalanobis_fused: ") + name +
                                " is a null pointer");
  return reinterpret_cast<T*>(p);
}

void mahalanobis_fused(std::uintptr_t x_ptr, const std::string& x_dtype, long long N_,
                       long long E_, std::uintptr_t center_ptr, std::uintptr_t factors_ptr,
                       long long G_, std::uintptr_t proj_ptr, std::uintptr_t const_ptr,
                       std::uintptr_t group_ptr, long long C_, int reduce,
                       std::uintptr_t bias_ptr, std::uintptr_t out_ptr, std::uintptr_t idx_ptr,
                       bool triangular, bool bf16, std::uintptr_t stream_ptr) {
  // ---- argument checks (no CUDA calls) ----
  int dtype;
  if (x_dtype == "f32") dtype = 0;
  else if (x_dtype == "f16") dtype = 1;
  else if (x_dtype == "bf16") dtype = 2;
  else
    throw std::invalid_argument("ood_fast._cuda.mahalanobis_fused: x_dtype must be 'f32', 'f16' "
                                "or 'bf16', got '" + x_dtype + "'");
  if (reduce < 0 || reduce > 2)
    throw std::invalid_argument("ood_fast._cuda.mahalanobis_fused: reduce must be 0 (none), "
                                "1 (min) or 2 (logsumexp), got " + std::to_string(reduce));
  Args a{};
  a.N = as_int(N_, "N", 0);
  a.E = as_int(E_, "E", 1);
  a.C = as_int(C_, "C", 1);
  a.reduce = reduce;
  a.G = factors_ptr != 0 ? as_int(G_, "G (with factors)", 1) : 0;
  a.x = as_ptr<const void>(x_ptr, "x_ptr", true);
  a.center = as_ptr<const float>(center_ptr, "center_ptr", true);
  a.factors = as_ptr<const float>(factors_ptr, "factors_ptr", false);
  a.proj = as_ptr<const float>(proj_ptr, "proj_ptr", true);
  a.cst = as_ptr<const float>(const_ptr, "const_ptr", true);
  a.group = as_ptr<const long long>(group_ptr, "group_ptr", a.G > 0);
  a.bias = as_ptr<const float>(bias_ptr, "bias_ptr", false);
  a.out = as_ptr<float>(out_ptr, "out_ptr", true);
  a.idx = as_ptr<long long>(idx_ptr, "idx_ptr", reduce == 1);
  if (reduce != 1) a.idx = nullptr;
  a.triangular = triangular;
  a.stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  if (a.N == 0) return;
  const size_t budget = g_q_budget.load();

  py::gil_scoped_release nogil;  // no Python objects below; launches may block on a full queue

  (void)cudaGetLastError();  // a stale error from an earlier call must not be blamed on this one
  cudaPointerAttributes attr{};
  OOD_CUDA_CHECK(cudaPointerGetAttributes(&attr, a.x));
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw std::invalid_argument("ood_fast._cuda.mahalanobis_fused: x_ptr is not CUDA device "
                                "memory (pass CUDA tensors)");
  DeviceGuard guard(attr.device);
  const int dev = attr.device;
  int sms = 0, major = 0, pools = 0;
  OOD_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  OOD_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  OOD_CUDA_CHECK(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, dev));
  if (bf16 && major < 8)
    throw std::runtime_error("ood_fast._cuda: precision='bf16' needs a GPU of compute "
                             "capability 8.0 or newer (bf16 tensor cores)");
  a.sms = std::max(sms, 1);

  // ---- workspace: q [rows, G] (+ split partials), for the largest and the last chunk ----
  long long row_chunk = a.N;
  if (a.G > 0) {
    const long long rows_fit = static_cast<long long>(budget / (sizeof(float) * a.G));
    row_chunk = std::max<long long>(BM, rows_fit / BM * BM);
    row_chunk = std::min<long long>(row_chunk, a.N);
  }
  const ChunkPlan first = plan_chunk(row_chunk, a.E, a.G, a.C, reduce, a.sms);
  const long long last_rows = a.N - (a.N - 1) / row_chunk * row_chunk;
  const ChunkPlan last = plan_chunk(last_rows, a.E, a.G, a.C, reduce, a.sms);
  const size_t q_f = std::max(first.q_floats, last.q_floats);
  const size_t qp_f = std::max(first.qpart_floats, last.qpart_floats);
  const size_t rp_f = 2 * std::max(first.rpart_float2, last.rpart_float2);
  Workspace ws((q_f + qp_f + rp_f) * sizeof(float), a.stream, pools != 0);
  float* base = static_cast<float*>(ws.ptr);
  float* q = q_f ? base : nullptr;
  float* qpart = qp_f ? base + q_f : nullptr;
  float2* rpart = rp_f ? reinterpret_cast<float2*>(base + q_f + qp_f) : nullptr;

  switch (dtype * 2 + (bf16 ? 1 : 0)) {
    case 0: run_typed<InF32, false>(a, q, qpart, rpart, row_chunk); break;
    case 1: run_typed<InF32, true>(a, q, qpart, rpart, row_chunk); break;
    case 2: run_typed<InF16, false>(a, q, qpart, rpart, row_chunk); break;
    case 3: run_typed<InF16, true>(a, q, qpart, rpart, row_chunk); break;
    case 4: run_typed<InBF16, false>(a, q, qpart, rpart, row_chunk); break;
    default: run_typed<InBF16, true>(a, q, qpart, rpart, row_chunk); break;
  }
}

}  // namespace ood_fast::cuda::maha

void bind_mahalanobis(py::module_& m) {
  using namespace pybind11::literals;
  m.def("mahalanobis_fused", &ood_fast::cuda::maha::mahalanobis_fused, "x_ptr"_a, "x_dtype"_a,
        "N"_a, "E"_a, "center_ptr"_a, "factors_ptr"_a, "G"_a, "proj_ptr"_a, "const_ptr"_a,
        "group_ptr"_a, "C"_a, "reduce"_a, "bias_ptr"_a, "out_ptr"_a, "idx_ptr"_a, "triangular"_a,
        "bf16"_a, "stream"_a,
        R"doc(Fused squared Mahalanobis distances with a reduction over classes (asynchronous).

All pointers are raw CUDA device addresses (ints) of contiguous row-major buffers on one device:
x [N, E] ("f32" | "f16" | "bf16"); center f32 [E]; factors f32 [G, E, E] or 0 (no quadratic
term); proj f32 [E, C]; const f32 [C]; group int64 [C] (values in [0, G)); bias f32 [C] or 0
(zeros; logsumexp only); out f32 [N, C] for reduce 0 (none), else [N]; idx int64 [N] for
reduce 1 (min), else 0. reduce 2 is logsumexp_c(bias_c - d2_c / 2). triangular: factors are
upper triangular (K tiles below the diagonal are skipped). bf16: GEMM operands rounded to
bfloat16 (tensor cores), fp32 accumulation. stream: cudaStream_t as an int (0: legacy default).

Work is queued on `stream` and the call returns; scratch memory (q [rows, G] and split
partials, at most ~64 MiB of q per row chunk) is taken with cudaMallocAsync on that stream.
Raises ValueError for bad arguments and RuntimeError for CUDA errors (no GPU, launch failure);
set OOD_FAST_CUDA_SYNC=1 to synchronize after each kernel and report faults where they happen.)doc");
  m.def("_set_workspace_budget", [](size_t bytes) {
    if (bytes < sizeof(float)) throw std::invalid_argument("budget must be >= 4 bytes");
    return ood_fast::cuda::maha::g_q_budget.exchange(bytes);
  }, "bytes"_a, "Testing hook: bytes of q per row chunk (default 64 MiB); returns the old value.");
}
