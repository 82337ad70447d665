// Exact k-nearest-neighbour search on CUDA (ood_fast._cuda.knn).
//
// Math (reference: ood_fast/reference/knn.py; docstring of ood_fast/ops/knn.py):
//
//   metric 0 ("l2"):  d[n, m] = max(0, (‖q_n‖² + ‖b_m‖²) − 2 q_n·b_m)   squared Euclidean
//   metric 1 ("ip"):  d[n, m] = −q_n·b_m                               negated inner product
//
// everything in fp32 (f16/bf16 inputs are upcast exactly on load); NaN (only from overflow of
// absurd inputs) becomes +inf, −0 becomes +0. Result per query: the k smallest (d, m) pairs in
// lexicographic order — distances ascending, ties by lower bank index — as the reference does.
// Cosine is handled by the Python adapter (unit rows + metric 1).
//
// Fused path (k <= 1024), two kernels on the caller's stream:
//   select_kernel  grid (query tiles, bank splits). A CTA (256 threads, 8 warps) owns BQ queries
//                  and a contiguous range of bank rows (one "split"), streamed in tiles of BN
//                  rows: an fp32 SIMT FFMA tile GEMM (BK = 16, register prefetch of the next K
//                  slice) → distances of the BQ × BN tile in shared memory (bank norms from a
//                  workspace computed once per call) → selection. Each warp owns BQ/8 queries;
//                  per query it keeps a sorted list of K = 32·P (P = 1..32, K >= k) (d, m)
//                  pairs in registers (element e = slot·32 + lane) and a 32-entry queue in
//                  shared memory. A distance passes the filter when (d, m) < the list's k-th
//                  pair; passing pairs are appended to the queue (ballot + popc); a full queue
//                  is flushed: warp bitonic sort of the 32 queued pairs, min against the
//                  reversed tail of the list (a bitonic sequence holding the K smallest), then
//                  a bitonic merge (register swaps for strides >= 32, shuffles below).
//                  With one split the CTA writes the first k pairs of each list to the outputs;
//                  with several it writes them to a workspace part[n][split][k].
//   merge_kernel   (only with several splits) one warp per query streams its splits' sorted
//                  lists through the same filter/queue/merge; a list is abandoned at its first
//                  failing pair (the lists are sorted and the threshold only tightens).
// select_kernel is built for 2 CTAs of 256 threads per SM (__launch_bounds__ caps it at 128
// registers). Splits exist to fill the GPU when there are few query tiles (batch-1 latency):
// enough CTAs for ~2 per SM, each split at least max(2·BN, k) rows. Tiles: BQ × BN = 64 × 64 (P <= 2),
// 32 × 64 (P = 4), 16 × 64 (P = 8), 8 × 128 (P >= 16, and every k when N <= 8).
//
// Two-pass path (k > 1024, never an error): queries in chunks; dist_kernel writes the chunk's
// full distance rows (keys) and bank indices (values) to a workspace, then
// cub::DeviceSegmentedRadixSort (stable, so ties keep index order) sorts every row and the first
// k pairs are copied out. Chunks hold at most ~512 MiB of sort buffers.
//
// exact: results are exact fp32 whatever its value (f16/bf16 banks are upcast exactly, so
// exact=True equals the fp32 search); exact=False is accepted and currently runs the same path.
//
// Workspace (cudaMallocAsync on the caller's stream, cudaFreeAsync after the last kernel; plain
// cudaMalloc + a stream sync where the device has no memory pools): fp32 copy of f16/bf16
// queries, query and bank squared norms (l2), split candidates, sort buffers. Deterministic: no
// atomics, fixed orders everywhere.
#include <pybind11/pybind11.h>

#include <cub/device/device_segmented_radix_sort.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_check.h"

namespace py = pybind11;

namespace ood_fast::cuda::knn {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int BK = 16;             // K (feature) slice of the tile GEMM
constexpr int MAX_FUSED_K = 1024;  // k above this takes the two-pass path
constexpr unsigned FULL = 0xffffffffu;
constexpr int SENT_I = INT_MAX;  // sentinel pair (+inf, INT_MAX): after every real pair

// ---------------------------------------------------------------------------------------------
// Element types: raw storage and the exact conversion to float.
// ---------------------------------------------------------------------------------------------

// InF32 / InF16 / InBF16 live in cuda_check.h (shared with the other kernels).

__device__ __forceinline__ bool lex_less(float ad, int ai, float bd, int bi) {
  return ad < bd || (ad == bd && ai < bi);
}

__device__ __forceinline__ float finish_distance(float dot, float qn, float bn, int metric) {
  float d;
  if (metric == 0) {
    d = (qn + bn) - 2.f * dot;
    d = isnan(d) ? INFINITY : fmaxf(d, 0.f);
  } else {
    d = -dot;
    if (isnan(d)) d = INFINITY;
  }
  return d + 0.0f;  // −0 → +0 (not folded: IEEE semantics without fast math)
}

// ---------------------------------------------------------------------------------------------
// Small kernels: upcast, squared norms, offsets, copy-out
// ---------------------------------------------------------------------------------------------

template <class In>
__global__ void to_f32_kernel(const typename In::raw* __restrict__ x, size_t count,
                              float* __restrict__ y) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    y[i] = In::f(x[i]);
}

// One warp per row, fixed summation order: out[r] = Σ_k x[r, k]².
template <class In>
__global__ void sqnorm_kernel(const typename In::raw* __restrict__ x, long long rows, int D,
                              float* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const long long warp0 = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) >> 5;
  const long long nwarps = (static_cast<long long>(gridDim.x) * blockDim.x) >> 5;
  for (long long r = warp0; r < rows; r += nwarps) {
    const typename In::raw* row = x + static_cast<size_t>(r) * D;
    float s = 0.f;
    for (int c = lane; c < D; c += 32) {
      const float v = In::f(row[c]);
      s = fmaf(v, v, s);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(FULL, s, off);
    if (lane == 0) out[r] = s;
  }
}

__global__ void offsets_kernel(int* __restrict__ off, int count, int M) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= count) off[i] = i * M;  // count * M <= INT_MAX (checked on the host)
}

__global__ void copy_topk_kernel(const float* __restrict__ keys, const int* __restrict__ vals,
                                 int rows, int M, int k, float* __restrict__ out_d,
                                 long long* __restrict__ out_i) {
  const size_t total = static_cast<size_t>(rows) * k;
  for (size_t t = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t r = t / k, j = t % k;
    out_d[t] = keys[r * M + j];
    out_i[t] = vals[r * M + j];
  }
}

// ---------------------------------------------------------------------------------------------
// Tile GEMM: acc[i][j] = Σ_c Q[q0 + ty·TM + i, c] · B[b0 + tx·TN + j, c]   (rows out of range: 0)
// ---------------------------------------------------------------------------------------------

template <int BQ_, int BN_, int TM_, int TN_>
struct Tile {
  static constexpr int BQ = BQ_, BN = BN_, TM = TM_, TN = TN_;
  static constexpr int TC = BN / TN;  // thread columns
  static constexpr int TR = BQ / TM;  // thread rows
  static constexpr int QW = BQ / WARPS;  // queries per warp in the selection
  static constexpr int LQ = BQ + 4;   // pitches (floats) of the transposed Q / B slices
  static constexpr int LB = BN + 4;
  static constexpr int LD = BN + 1;   // pitch of the distance tile
  static_assert(TC * TR == THREADS, "thread grid must cover the tile");
  static_assert(BQ % WARPS == 0 && BN % 32 == 0, "selection mapping");
  static_assert(TN == 4 && (TM == 1 || TM == 2 || TM == 4), "vector loads below");
};
using TileL = Tile<64, 64, 4, 4>;
using TileM = Tile<32, 64, 2, 4>;
using TileS = Tile<16, 64, 1, 4>;
using TileXS = Tile<8, 128, 1, 4>;

template <class T>
struct __align__(16) GemmSmem {
  float q[BK][T::LQ];  // q[c][r]
  float b[BK][T::LB];  // b[c][m]
};

template <class T, class BIn>
__device__ __forceinline__ void tile_dot(const float* __restrict__ Q, int N, int D, int q0,
                                         const typename BIn::raw* __restrict__ B, int bend,
                                         int b0, GemmSmem<T>& sm, float (&acc)[T::TM][T::TN]) {
  using raw = typename BIn::raw;
  constexpr int QE = T::BQ * BK, BE = T::BN * BK;
  constexpr int NQL = (QE + THREADS - 1) / THREADS;
  constexpr int NBL = (BE + THREADS - 1) / THREADS;
  const int tid = threadIdx.x;
  const int tx = tid % T::TC, ty = tid / T::TC;

  float rq[NQL];
  raw rb[NBL];
#pragma unroll
  for (int i = 0; i < T::TM; ++i)
#pragma unroll
    for (int j = 0; j < T::TN; ++j) acc[i][j] = 0.f;

  auto load = [&](int k0) {
#pragma unroll
    for (int t = 0; t < NQL; ++t) {
      const int e = tid + t * THREADS;
      const int r = e / BK, c = k0 + e % BK;
      const bool ok = (QE % THREADS == 0 || e < QE) && q0 + r < N && c < D;
      rq[t] = ok ? Q[static_cast<size_t>(q0 + r) * D + c] : 0.f;
    }
#pragma unroll
    for (int t = 0; t < NBL; ++t) {
      const int e = tid + t * THREADS;
      const int r = e / BK, c = k0 + e % BK;
      const bool ok = (BE % THREADS == 0 || e < BE) && b0 + r < bend && c < D;
      rb[t] = ok ? B[static_cast<size_t>(b0 + r) * D + c] : raw(0);
    }
  };

  load(0);  // D >= 1
  for (int k0 = 0; k0 < D; k0 += BK) {
    __syncthreads();  // the previous slice's readers are done with sm
#pragma unroll
    for (int t = 0; t < NQL; ++t) {
      const int e = tid + t * THREADS;
      if (QE % THREADS == 0 || e < QE) sm.q[e % BK][e / BK] = rq[t];
    }
#pragma unroll
    for (int t = 0; t < NBL; ++t) {
      const int e = tid + t * THREADS;
      if (BE % THREADS == 0 || e < BE) sm.b[e % BK][e / BK] = BIn::f(rb[t]);
    }
    __syncthreads();
    if (k0 + BK < D) load(k0 + BK);  // in flight while this slice is computed
#pragma unroll
    for (int c = 0; c < BK; ++c) {
      float a[T::TM];
      if constexpr (T::TM == 4) {
        const float4 v = *reinterpret_cast<const float4*>(&sm.q[c][ty * 4]);
        a[0] = v.x; a[1] = v.y; a[2] = v.z; a[3] = v.w;  // NOLINT
      } else if constexpr (T::TM == 2) {
        const float2 v = *reinterpret_cast<const float2*>(&sm.q[c][ty * 2]);
        a[0] = v.x; a[1] = v.y;  // NOLINT
      } else {
        a[0] = sm.q[c][ty];
      }
      const float4 w = *reinterpret_cast<const float4*>(&sm.b[c][tx * 4]);
      const float bv[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int i = 0; i < T::TM; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], bv[j], acc[i][j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Warp-level sorted list of K = 32·P pairs (element e = slot·32 + lane), ascending.
// ---------------------------------------------------------------------------------------------

// Sort one pair per lane across the warp, ascending (bitonic).
__device__ __forceinline__ void warp_sort32(float& d, int& i, int lane) {
#pragma unroll
  for (int size = 2; size <= 32; size <<= 1) {
#pragma unroll
    for (int j = size >> 1; j > 0; j >>= 1) {
      const float od = __shfl_xor_sync(FULL, d, j);
      const int oi = __shfl_xor_sync(FULL, i, j);
      const bool up = (lane & size) == 0;  // size == 32: the whole warp ascending
      const bool want_min = ((lane & j) == 0) == up;
      const bool take = want_min ? lex_less(od, oi, d, i) : lex_less(d, i, od, oi);
      if (take) {
        d = od;
        i = oi;
      }
    }
  }
}

// L ← the K smallest of L ∪ {(cd, ci) of the 32 lanes} (cd/ci need not be sorted), sorted.
template <int P>
__device__ __forceinline__ void list_merge32(float (&Ld)[P], int (&Li)[P], float cd, int ci,
                                             int lane) {
  constexpr int K = 32 * P;
  warp_sort32(cd, ci, lane);
  {  // tail of L (slot P-1, positions K-32+lane) against the reversed sorted candidates
    const float od = __shfl_sync(FULL, cd, 31 - lane);
    const int oi = __shfl_sync(FULL, ci, 31 - lane);
    if (lex_less(od, oi, Ld[P - 1], Li[P - 1])) {
      Ld[P - 1] = od;
      Li[P - 1] = oi;
    }
  }
  // L is now bitonic (ascending, then descending): bitonic merge to ascending.
#pragma unroll
  for (int j = K / 2; j >= 32; j >>= 1) {
    const int js = j / 32;
#pragma unroll
    for (int s = 0; s < P; ++s) {
      if ((s & js) == 0) {
        const int t = s | js;
        if (lex_less(Ld[t], Li[t], Ld[s], Li[s])) {
          const float td = Ld[s];
          const int ti = Li[s];
          Ld[s] = Ld[t];
          Li[s] = Li[t];
          Ld[t] = td;
          Li[t] = ti;
        }
      }
    }
  }
#pragma unroll
  for (int j = 16; j > 0; j >>= 1) {
    const bool want_min = (lane & j) == 0;
#pragma unroll
    for (int s = 0; s < P; ++s) {
      const float od = __shfl_xor_sync(FULL, Ld[s], j);
      const int oi = __shfl_xor_sync(FULL, Li[s], j);
      const bool take = want_min ? lex_less(od, oi, Ld[s], Li[s]) : lex_less(Ld[s], Li[s], od, oi);
      if (take) {
        Ld[s] = od;
        Li[s] = oi;
      }
    }
  }
}

// The k-th pair of the list (element k-1), on every lane.
template <int P>
__device__ __forceinline__ void list_kth(const float (&Ld)[P], const int (&Li)[P], int k,
                                         float& td, int& ti) {
  const int slot = (k - 1) >> 5, src = (k - 1) & 31;
  float d = Ld[0];
  int i = Li[0];
#pragma unroll
  for (int s = 1; s < P; ++s)
    if (s == slot) {
      d = Ld[s];
      i = Li[s];
    }
  td = __shfl_sync(FULL, d, src);
  ti = __shfl_sync(FULL, i, src);
}

// One query's selection state, owned by a warp.
template <int P>
struct Selector {
  float Ld[P];
  int Li[P];
  float thr_d;  // the list's k-th pair: only pairs lexicographically below it can enter
  int thr_i;
  int count;  // pairs in the queue (warp-uniform)

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int s = 0; s < P; ++s) {
      Ld[s] = INFINITY;
      Li[s] = SENT_I;
    }
    thr_d = INFINITY;
    thr_i = SENT_I;
    count = 0;
  }

  __device__ __forceinline__ void flush(float* qd, int* qi, int k, int lane) {
    __syncwarp();  // queue writes of every lane are visible
    float cd = INFINITY;
    int ci = SENT_I;
    if (lane < count) {
      cd = qd[lane];
      ci = qi[lane];
    }
    __syncwarp();  // every lane has read before the queue is refilled
    list_merge32<P>(Ld, Li, cd, ci, lane);
    list_kth<P>(Ld, Li, k, thr_d, thr_i);
    count = 0;
  }

  // Offer one pair per lane (valid lanes only); returns the ballot of pairs that passed.
  __device__ __forceinline__ unsigned offer(float d, int i, bool valid, float* qd, int* qi, int k,
                                            int lane) {
    const bool pass = valid && lex_less(d, i, thr_d, thr_i);
    const unsigned mask = __ballot_sync(FULL, pass);
    if (mask != 0u) {
      const int n = __popc(mask);
      if (count + n > 32) flush(qd, qi, k, lane);
      if (pass) {
        const int pos = count + __popc(mask & ((1u << lane) - 1u));
        qd[pos] = d;
        qi[pos] = i;
      }
      count += n;
    }
    return mask;
  }

  __device__ __forceinline__ void finish(float* qd, int* qi, int k, int lane) {
    if (count > 0) flush(qd, qi, k, lane);
  }

  // First k pairs of the list to dst (indices as I).
  template <class I>
  __device__ __forceinline__ void store(float* __restrict__ dd, I* __restrict__ di, int k,
                                        int lane) const {
#pragma unroll
    for (int s = 0; s < P; ++s) {
      const int e = s * 32 + lane;
      if (e < k) {
        dd[e] = Ld[s];
        di[e] = static_cast<I>(Li[s]);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Fused distance + top-k over one (query tile, bank split)
// ---------------------------------------------------------------------------------------------

template <class T>
struct __align__(16) SelectSmem {
  GemmSmem<T> g;
  float d[T::BQ][T::LD];   // distance tile
  float qd[T::BQ][32];     // per-query queues
  int qi[T::BQ][32];
  float qn[T::BQ];
  float bn[T::BN];
};

template <class T, int P, class BIn>
__global__ void __launch_bounds__(THREADS, 2)  // 2 CTAs per SM (≤ 128 registers)
select_kernel(const float* __restrict__ Q, const float* __restrict__ qnorm, int N,
              const typename BIn::raw* __restrict__ B, const float* __restrict__ bnorm, int M,
              int D, int k, int metric, int rows_per_split, int splits,
              float* __restrict__ out_d, long long* __restrict__ out_i,
              float* __restrict__ part_d, int* __restrict__ part_i) {
  constexpr int QW = T::QW;
  static_assert(QW * P <= 32, "selection registers");
  __shared__ SelectSmem<T> sm;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int q0 = blockIdx.x * T::BQ;
  const int split = blockIdx.y;
  const long long mbeg_l = static_cast<long long>(split) * rows_per_split;
  const long long mend_l = mbeg_l + rows_per_split;
  const int mbeg = static_cast<int>(mbeg_l);  // < M (splits = ceil(M / rows_per_split))
  const int mend = mend_l < M ? static_cast<int>(mend_l) : M;
  const int tx = tid % T::TC, ty = tid / T::TC;

  if (tid < T::BQ) sm.qn[tid] = (metric == 0 && q0 + tid < N) ? qnorm[q0 + tid] : 0.f;

  Selector<P> sel[QW];
#pragma unroll
  for (int j = 0; j < QW; ++j) sel[j].init();

  for (int b0 = mbeg; b0 < mend; b0 += T::BN) {
    for (int t = tid; t < T::BN; t += THREADS)
      sm.bn[t] = (metric == 0 && b0 + t < mend) ? bnorm[b0 + t] : 0.f;
    float acc[T::TM][T::TN];
    tile_dot<T, BIn>(Q, N, D, q0, B, mend, b0, sm.g, acc);
    __syncthreads();  // qn/bn visible (and ordered before the epilogue on every path)
#pragma unroll
    for (int i = 0; i < T::TM; ++i) {
      const int r = ty * T::TM + i;
#pragma unroll
      for (int j = 0; j < T::TN; ++j) {
        const int c = tx * T::TN + j;
        sm.d[r][c] = finish_distance(acc[i][j], sm.qn[r], sm.bn[c], metric);
      }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < QW; ++j) {
      const int r = warp * QW + j;
      if (q0 + r >= N) continue;  // warp-uniform
#pragma unroll
      for (int c = 0; c < T::BN / 32; ++c) {
        const int m = b0 + c * 32 + lane;
        sel[j].offer(sm.d[r][c * 32 + lane], m, m < mend, sm.qd[r], sm.qi[r], k, lane);
      }
    }
    __syncthreads();  // the distance tile and bn are rewritten by the next bank tile
  }

#pragma unroll
  for (int j = 0; j < QW; ++j) {
    const int r = warp * QW + j;
    const int n = q0 + r;
    if (n >= N) continue;
    sel[j].finish(sm.qd[r], sm.qi[r], k, lane);
    if (splits == 1) {
      sel[j].store(out_d + static_cast<size_t>(n) * k, out_i + static_cast<size_t>(n) * k, k,
                   lane);
    } else {
      const size_t off = (static_cast<size_t>(n) * splits + split) * k;
      sel[j].store(part_d + off, part_i + off, k, lane);
    }
  }
}

// Merge the per-split sorted lists: one warp per query.
template <int P>
__global__ void __launch_bounds__(THREADS)
merge_kernel(const float* __restrict__ part_d, const int* __restrict__ part_i, int N, int splits,
             int k, float* __restrict__ out_d, long long* __restrict__ out_i) {
  __shared__ float qd[WARPS][32];
  __shared__ int qi[WARPS][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long n = static_cast<long long>(blockIdx.x) * WARPS + warp;
  if (n >= N) return;  // whole warp; no block-wide barriers below
  Selector<P> sel;
  sel.init();
  for (int s = 0; s < splits; ++s) {
    const size_t base = (static_cast<size_t>(n) * splits + s) * k;
    for (int c0 = 0; c0 < k; c0 += 32) {
      const int e = c0 + lane;
      const bool valid = e < k;
      const float d = valid ? part_d[base + e] : INFINITY;
      const int i = valid ? part_i[base + e] : SENT_I;
      const unsigned mask = sel.offer(d, i, valid, qd[warp], qi[warp], k, lane);
      // The list is sorted and the threshold only tightens: after a failing pair, none passes.
      if (mask != __ballot_sync(FULL, valid)) break;
    }
  }
  sel.finish(qd[warp], qi[warp], k, lane);
  sel.store(out_d + static_cast<size_t>(n) * k, out_i + static_cast<size_t>(n) * k, k, lane);
}

// Two-pass path: full distance rows of a query chunk → keys [rows, M], values = bank index.
template <class T, class BIn>
__global__ void __launch_bounds__(THREADS)
dist_kernel(const float* __restrict__ Q, const float* __restrict__ qnorm, int N,
            const typename BIn::raw* __restrict__ B, const float* __restrict__ bnorm, int M, int D,
            int metric, float* __restrict__ keys, int* __restrict__ vals) {
  __shared__ GemmSmem<T> sm;
  const int tid = threadIdx.x;
  const int b0 = blockIdx.x * T::BN;
  const int q0 = blockIdx.y * T::BQ;
  const int tx = tid % T::TC, ty = tid / T::TC;
  float acc[T::TM][T::TN];
  tile_dot<T, BIn>(Q, N, D, q0, B, M, b0, sm, acc);
#pragma unroll
  for (int i = 0; i < T::TM; ++i) {
    const int n = q0 + ty * T::TM + i;
    if (n >= N) continue;
    const float qn = metric == 0 ? qnorm[n] : 0.f;
#pragma unroll
    for (int j = 0; j < T::TN; ++j) {
      const int m = b0 + tx * T::TN + j;
      if (m >= M) continue;
      const float bn = metric == 0 ? bnorm[m] : 0.f;
      const size_t o = static_cast<size_t>(n) * M + m;
      keys[o] = finish_distance(acc[i][j], qn, bn, metric);
      vals[o] = m;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

inline long long cdiv(long long a, long long b) { return (a + b - 1) / b; }
inline size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

constexpr size_t PART_BUDGET = size_t(512) << 20;  // split candidates, bytes
constexpr size_t SORT_BUDGET = size_t(512) << 20;  // two-pass sort buffers, bytes

struct Problem {
  const void* q;      // raw queries
  int q_dtype;        // 0 f32, 1 f16, 2 bf16
  const void* bank;   // raw bank
  int b_dtype;
  int N, M, D, k, metric;
  float* out_d;
  long long* out_i;
  cudaStream_t stream;
  int sms;
};

struct FusedPlan {
  int bq, bn;             // tile
  int splits, rows_per_split;
  long long qtiles;
};

FusedPlan plan_fused(const Problem& p, int P, bool small) {
  FusedPlan f{};
  if (small || P >= 16) {
    f.bq = TileXS::BQ;
    f.bn = TileXS::BN;
  } else if (P <= 2) {
    f.bq = TileL::BQ;
    f.bn = TileL::BN;
  } else if (P == 4) {
    f.bq = TileM::BQ;
    f.bn = TileM::BN;
  } else {
    f.bq = TileS::BQ;
    f.bn = TileS::BN;
  }
  f.qtiles = cdiv(p.N, f.bq);
  const long long target = 2LL * p.sms;  // CTAs wanted in flight
  long long want = std::max(1LL, cdiv(target, f.qtiles));
  // candidates in the workspace: N · splits · k pairs of 8 bytes
  const long long cap = std::max<long long>(
      1, static_cast<long long>(PART_BUDGET / (8ull * static_cast<size_t>(p.N) * p.k)));
  want = std::min(want, cap);
  const long long min_rows = cdiv(std::max<long long>(2LL * f.bn, p.k), f.bn) * f.bn;
  long long rows = cdiv(cdiv(p.M, want), f.bn) * f.bn;
  rows = std::max(rows, min_rows);
  rows = std::min<long long>(rows, cdiv(p.M, f.bn) * f.bn);  // one split covers the bank
  f.rows_per_split = static_cast<int>(rows);  // <= M rounded up to BN, < INT_MAX + BN: see check
  f.splits = static_cast<int>(cdiv(p.M, rows));
  return f;
}

template <class T, int P, class BIn>
void launch_fused(const Problem& p, const FusedPlan& f, const float* q, const float* qn,
                  const float* bn, float* part_d, int* part_i) {
  if (f.qtiles > INT_MAX) throw std::invalid_argument("ood_fast._cuda.knn: too many queries");
  const dim3 grid(static_cast<unsigned>(f.qtiles), static_cast<unsigned>(f.splits));
  select_kernel<T, P, BIn><<<grid, THREADS, 0, p.stream>>>(
      q, qn, p.N, static_cast<const typename BIn::raw*>(p.bank), bn, p.M, p.D, p.k, p.metric,
      f.rows_per_split, f.splits, p.out_d, p.out_i, part_d, part_i);
  OOD_CUDA_CHECK_LAUNCH("knn select_kernel", p.stream);
  if (f.splits > 1) {
    const unsigned blocks = static_cast<unsigned>(cdiv(p.N, WARPS));
    merge_kernel<P><<<blocks, THREADS, 0, p.stream>>>(part_d, part_i, p.N, f.splits, p.k,
                                                      p.out_d, p.out_i);
    OOD_CUDA_CHECK_LAUNCH("knn merge_kernel", p.stream);
  }
}

template <int P, class BIn>
void dispatch_tile(const Problem& p, const FusedPlan& f, const float* q, const float* qn,
                   const float* bn, float* part_d, int* part_i) {
  if (f.bq == TileXS::BQ) {
    launch_fused<TileXS, P, BIn>(p, f, q, qn, bn, part_d, part_i);
  } else if constexpr (P <= 2) {
    launch_fused<TileL, P, BIn>(p, f, q, qn, bn, part_d, part_i);
  } else if constexpr (P == 4) {
    launch_fused<TileM, P, BIn>(p, f, q, qn, bn, part_d, part_i);
  } else if constexpr (P == 8) {
    launch_fused<TileS, P, BIn>(p, f, q, qn, bn, part_d, part_i);
  } else {
    throw std::logic_error("ood_fast._cuda.knn: no tile for this list size");
  }
}

template <class BIn>
void dispatch_p(int P, const Problem& p, const FusedPlan& f, const float* q, const float* qn,
                const float* bn, float* part_d, int* part_i) {
  switch (P) {
    case 1: dispatch_tile<1, BIn>(p, f, q, qn, bn, part_d, part_i); break;
    case 2: dispatch_tile<2, BIn>(p, f, q, qn, bn, part_d, part_i); break;
    case 4: dispatch_tile<4, BIn>(p, f, q, qn, bn, part_d, part_i); break;
    case 8: dispatch_tile<8, BIn>(p, f, q, qn, bn, part_d, part_i); break;
    case 16: dispatch_tile<16, BIn>(p, f, q, qn, bn, part_d, part_i); break;
    default: dispatch_tile<32, BIn>(p, f, q, qn, bn, part_d, part_i); break;
  }
}

template <class BIn>
void launch_dist(const Problem& p, const float* q, const float* qn, int rows, const float* bn,
                 float* keys, int* vals) {
  using T = TileL;
  const dim3 grid(static_cast<unsigned>(cdiv(p.M, T::BN)), static_cast<unsigned>(cdiv(rows, T::BQ)));
  dist_kernel<T, BIn><<<grid, THREADS, 0, p.stream>>>(
      q, qn, rows, static_cast<const typename BIn::raw*>(p.bank), bn, p.M, p.D, p.metric, keys,
      vals);
  OOD_CUDA_CHECK_LAUNCH("knn dist_kernel", p.stream);
}

unsigned grid_for(size_t items, int sms) {
  return static_cast<unsigned>(std::max<long long>(
      1, std::min<long long>(static_cast<long long>((items + 255) / 256), 32LL * sms)));
}

template <class In>
void launch_sqnorm(const void* x, long long rows, int D, float* out, const Problem& p) {
  sqnorm_kernel<In><<<grid_for(static_cast<size_t>(rows) * 32, p.sms), 256, 0, p.stream>>>(
      static_cast<const typename In::raw*>(x), rows, D, out);
  OOD_CUDA_CHECK_LAUNCH("knn sqnorm_kernel", p.stream);
}

void sqnorm(int dtype, const void* x, long long rows, int D, float* out, const Problem& p) {
  if (dtype == 0) launch_sqnorm<InF32>(x, rows, D, out, p);
  else if (dtype == 1) launch_sqnorm<InF16>(x, rows, D, out, p);
  else launch_sqnorm<InBF16>(x, rows, D, out, p);
}

int parse_dtype(const std::string& s, const char* name) {
  if (s == "f32") return 0;
  if (s == "f16") return 1;
  if (s == "bf16") return 2;
  throw std::invalid_argument(std::string("ood_fast._cuda.knn: ") + name +
                              " must be 'f32', 'f16' or 'bf16', got '" + s + "'");
}

int as_int(long long v, const char* name, long long lo, long long hi = INT_MAX) {
  if (v < lo || v > hi)
    throw std::invalid_argument(std::string("ood_fast._cuda.knn: ") + name +
                                " out of range: " + std::to_string(v));
  return static_cast<int>(v);
}

void knn(std::uintptr_t q_ptr, const std::string& q_dtype, long long N_, std::uintptr_t bank_ptr,
         const std::string& bank_dtype, long long M_, long long D_, long long k_, int metric,
         bool exact, std::uintptr_t out_d_ptr, std::uintptr_t out_i_ptr,
         std::uintptr_t stream_ptr) {
  (void)exact;  // every path is exact fp32 (see the header comment)
  // ---- argument checks (no CUDA calls) ----
  Problem p{};
  p.q_dtype = parse_dtype(q_dtype, "q_dtype");
  p.b_dtype = parse_dtype(bank_dtype, "bank_dtype");
  p.N = as_int(N_, "N", 0);
  p.M = as_int(M_, "M", 1, INT_MAX - 4096);  // indices and split bounds stay below INT_MAX
  p.D = as_int(D_, "D", 1);
  p.k = as_int(k_, "k", 1, p.M);
  if (metric != 0 && metric != 1)
    throw std::invalid_argument("ood_fast._cuda.knn: metric must be 0 (l2) or 1 (ip), got " +
                                std::to_string(metric));
  p.metric = metric;
  if (q_ptr == 0 || bank_ptr == 0 || out_d_ptr == 0 || out_i_ptr == 0)
    throw std::invalid_argument("ood_fast._cuda.knn: null pointer argument");
  p.q = reinterpret_cast<const void*>(q_ptr);
  p.bank = reinterpret_cast<const void*>(bank_ptr);
  p.out_d = reinterpret_cast<float*>(out_d_ptr);
  p.out_i = reinterpret_cast<long long*>(out_i_ptr);
  p.stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  if (p.N == 0) return;

  py::gil_scoped_release nogil;  // no Python objects below; launches may block on a full queue

  (void)cudaGetLastError();  // a stale error from an earlier call must not be blamed on this one
  cudaPointerAttributes qa{}, ba{};
  OOD_CUDA_CHECK(cudaPointerGetAttributes(&qa, p.q));
  OOD_CUDA_CHECK(cudaPointerGetAttributes(&ba, p.bank));
  for (const cudaPointerAttributes* a : {&qa, &ba})
    if (a->type != cudaMemoryTypeDevice && a->type != cudaMemoryTypeManaged)
      throw std::invalid_argument("ood_fast._cuda.knn: queries and bank must be CUDA device "
                                  "memory (pass CUDA tensors)");
  if (qa.device != ba.device)
    throw std::invalid_argument("ood_fast._cuda.knn: queries and bank are on different devices");
  DeviceGuard guard(qa.device);
  const int dev = qa.device;
  int sms = 0, pools = 0;
  OOD_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  OOD_CUDA_CHECK(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, dev));
  p.sms = std::max(sms, 1);

  const bool fused = p.k <= MAX_FUSED_K;
  int P = 1;
  while (32 * P < p.k) P <<= 1;
  FusedPlan f{};
  long long chunk = 0;  // two-pass: queries per chunk
  size_t sort_temp = 0;
  if (fused) {
    f = plan_fused(p, P, p.N <= TileXS::BQ);
  } else {
    chunk = static_cast<long long>(SORT_BUDGET / (16ull * static_cast<size_t>(p.M)));
    chunk = std::min<long long>(chunk, (INT_MAX - 1) / p.M);  // cub's int num_items, offsets
    chunk = std::clamp<long long>(chunk, 1, p.N);
    const int items = static_cast<int>(chunk * p.M);
    OOD_CUDA_CHECK((cub::DeviceSegmentedRadixSort::SortPairs(
        nullptr, sort_temp, static_cast<const float*>(nullptr), static_cast<float*>(nullptr),
        static_cast<const int*>(nullptr), static_cast<int*>(nullptr), items,
        static_cast<int>(chunk), static_cast<const int*>(nullptr),
        static_cast<const int*>(nullptr), 0, 32, p.stream)));
  }

  // ---- workspace layout ----
  const size_t qf_b = p.q_dtype != 0 ? align_up(sizeof(float) * static_cast<size_t>(p.N) * p.D) : 0;
  const size_t qn_b = p.metric == 0 ? align_up(sizeof(float) * static_cast<size_t>(p.N)) : 0;
  const size_t bn_b = p.metric == 0 ? align_up(sizeof(float) * static_cast<size_t>(p.M)) : 0;
  size_t part_b = 0, sort_b = 0, off_b = 0, temp_b = 0;
  if (fused) {
    if (f.splits > 1)
      part_b = align_up(sizeof(float) * static_cast<size_t>(p.N) * f.splits * p.k);  // ×2 below
  } else {
    sort_b = align_up(sizeof(float) * static_cast<size_t>(chunk) * p.M);  // ×4 below
    off_b = align_up(sizeof(int) * static_cast<size_t>(chunk + 1));
    temp_b = align_up(std::max<size_t>(sort_temp, 1));
  }
  const size_t total = qf_b + qn_b + bn_b + 2 * part_b + 4 * sort_b + off_b + temp_b;
  Workspace ws(total, p.stream, pools != 0);
  char* w = static_cast<char*>(ws.ptr);
  auto take = [&](size_t bytes) {
    char* r = bytes ? w : nullptr;
    w += bytes;
    return r;
  };
  float* qf = reinterpret_cast<float*>(take(qf_b));
  float* qn = reinterpret_cast<float*>(take(qn_b));
  float* bn = reinterpret_cast<float*>(take(bn_b));
  float* part_d = reinterpret_cast<float*>(take(part_b));
  int* part_i = reinterpret_cast<int*>(take(part_b));
  float* keys_in = reinterpret_cast<float*>(take(sort_b));
  float* keys_out = reinterpret_cast<float*>(take(sort_b));
  int* vals_in = reinterpret_cast<int*>(take(sort_b));
  int* vals_out = reinterpret_cast<int*>(take(sort_b));
  int* offsets = reinterpret_cast<int*>(take(off_b));
  void* temp = take(temp_b);

  // ---- queries as fp32, squared norms ----
  const float* q = static_cast<const float*>(p.q);
  if (p.q_dtype != 0) {
    const size_t count = static_cast<size_t>(p.N) * p.D;
    if (p.q_dtype == 1)
      to_f32_kernel<InF16><<<grid_for(count, p.sms), 256, 0, p.stream>>>(
          static_cast<const unsigned short*>(p.q), count, qf);
    else
      to_f32_kernel<InBF16><<<grid_for(count, p.sms), 256, 0, p.stream>>>(
          static_cast<const unsigned short*>(p.q), count, qf);
    OOD_CUDA_CHECK_LAUNCH("knn to_f32_kernel", p.stream);
    q = qf;
  }
  if (p.metric == 0) {
    sqnorm(0, q, p.N, p.D, qn, p);
    sqnorm(p.b_dtype, p.bank, p.M, p.D, bn, p);
  }

  if (fused) {
    if (p.b_dtype == 0) dispatch_p<InF32>(P, p, f, q, qn, bn, part_d, part_i);
    else if (p.b_dtype == 1) dispatch_p<InF16>(P, p, f, q, qn, bn, part_d, part_i);
    else dispatch_p<InBF16>(P, p, f, q, qn, bn, part_d, part_i);
    return;
  }

  // ---- two-pass: distance rows, segmented stable sort, first k of each row ----
  offsets_kernel<<<static_cast<unsigned>(cdiv(chunk + 1, 256)), 256, 0, p.stream>>>(
      offsets, static_cast<int>(chunk), p.M);
  OOD_CUDA_CHECK_LAUNCH("knn offsets_kernel", p.stream);
  for (long long n0 = 0; n0 < p.N; n0 += chunk) {
    const int rows = static_cast<int>(std::min<long long>(chunk, p.N - n0));
    const float* qc = q + static_cast<size_t>(n0) * p.D;
    const float* qnc = qn ? qn + n0 : nullptr;
    if (p.b_dtype == 0) launch_dist<InF32>(p, qc, qnc, rows, bn, keys_in, vals_in);
    else if (p.b_dtype == 1) launch_dist<InF16>(p, qc, qnc, rows, bn, keys_in, vals_in);
    else launch_dist<InBF16>(p, qc, qnc, rows, bn, keys_in, vals_in);
    size_t temp_bytes = sort_temp;
    OOD_CUDA_CHECK((cub::DeviceSegmentedRadixSort::SortPairs(
        temp, temp_bytes, static_cast<const float*>(keys_in), keys_out,
        static_cast<const int*>(vals_in), vals_out, rows * p.M, rows,
        static_cast<const int*>(offsets), static_cast<const int*>(offsets + 1), 0, 32,
        p.stream)));
    OOD_CUDA_CHECK_LAUNCH("knn cub segmented radix sort", p.stream);
    const size_t outs = static_cast<size_t>(rows) * p.k;
    copy_topk_kernel<<<grid_for(outs, p.sms), 256, 0, p.stream>>>(
        keys_out, vals_out, rows, p.M, p.k, p.out_d + static_cast<size_t>(n0) * p.k,
        p.out_i + static_cast<size_t>(n0) * p.k);
    OOD_CUDA_CHECK_LAUNCH("knn copy_topk_kernel", p.stream);
  }
}

}  // namespace ood_fast::cuda::knn

void bind_knn(py::module_& m) {
  using namespace pybind11::literals;
  m.def("knn", &ood_fast::cuda::knn::knn, "q_ptr"_a, "q_dtype"_a, "N"_a, "bank_ptr"_a,
        "bank_dtype"_a, "M"_a, "D"_a, "k"_a, "metric"_a, "exact"_a, "out_d_ptr"_a, "out_i_ptr"_a,
        "stream"_a,
        R"doc(Exact k nearest bank rows of every query (asynchronous).

All pointers are raw CUDA device addresses (ints) of contiguous row-major buffers on one device:
queries [N, D] and bank [M, D] ("f32" | "f16" | "bf16", computed in fp32 from the exactly upcast
values); out_d f32 [N, k]; out_i int64 [N, k]. metric 0: squared Euclidean
max(0, ‖q‖² + ‖b‖² − 2 q·b); metric 1: −q·b. Rows come back by (distance, index) ascending:
ties go to the lower bank index, both in order and at the k-th place. 1 <= k <= M, any k
(k > 1024 takes a two-pass distance + segmented-sort path). exact: accepted; every path is exact
fp32. stream: cudaStream_t as an int (0: legacy default).

Work is queued on `stream` and the call returns; scratch memory is taken with cudaMallocAsync on
that stream. Raises ValueError for bad arguments and RuntimeError for CUDA errors (no GPU,
launch failure); set OOD_FAST_CUDA_SYNC=1 to synchronize after each kernel.)doc");
}
