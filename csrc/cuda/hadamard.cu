// CUDA Hadamard transform and fused rotate + quantize (ood_fast._cuda.hadamard /
// ood_fast._cuda.rotate_quantize); the math is docs/QUANT_CONTRACT.md.
//
//   hadamard:        out[r, j] = scale * Σ_i (x[r, i] * signs[i]) * H[i, j],  H = kron(H_K, S_{2^p})
//   rotate_quantize: y = hadamard(x / smooth, 1/sqrt(n), signs) (K = 0: y = x / smooth), then
//                    symmetric / asymmetric, per token / per tensor, dynamic / static codes.
//
// With a row viewed as X [K, P2] (P2 = 2^p, column i = a·P2 + b) the transform is
// H_Kᵀ · X · S: a fast Walsh–Hadamard transform (FWHT) of each of the K sub-rows, then the K
// sub-rows mixed with H_Kᵀ (y[c, :] = Σ_a H_K[a, c] · fwht(X[a, :])). fp32 arithmetic; every
// butterfly is the exact fp32 pair (a + b, a − b); mixing uses fmaf(±1, x, acc) (= acc ± x).
//
// Thread layout (one row per group of TR = K·TS threads, each thread holding E = 2^LOG_E
// CONTIGUOUS elements of one sub-row: thread (a, s) holds X[a, s·E .. s·E + E)):
//   * the FWHT bits [0, LOG_E) are butterflies in registers;
//   * bits [LOG_E, LOG_E + min(LS, 5)) (LS = log2 TS) are lane bits: __shfl_xor_sync pairs;
//     a sub-row's TS threads are TS-aligned lanes (TS ≤ 32) or whole warps (TS ≥ 32), so the
//     xor partner is always the same sub-row's thread holding the partner elements;
//   * the HB = LS − 5 remaining (warp) bits go through shared memory: the row is written to
//     shared memory, each thread gathers groups of 2^HB elements spaced 32·E apart, butterflies
//     them in registers and writes them back (LOG_E is chosen so that HB ≤ LOG_E, i.e. a thread
//     holds whole groups);
//   * the K mixing (K > 1) also reads the row from shared memory: a thread takes whole columns
//     (K values), computes the K outputs and writes them back in place (it owns its columns);
//   * finally each thread reads its E elements back and stores them (16-byte vector stores).
// Shared memory holds fp32 values at padded indices g + g/32 (one pad word per 32): a warp
// whose lanes access with a power-of-two stride ≤ 32 (E contiguous elements per lane) or unit
// stride in 32-aligned windows hits 32 distinct banks. Global loads and stores are 16-byte
// vectors when the row and the pointer are 16-byte aligned (else scalar).
//
// Sizes: E = 2^LOG_E with LOG_E = min(p, max(3, ceil((p − 5) / 2), ceil(log2(n / 1024)))), so
// TR ≤ 1024 threads and HB ≤ LOG_E: every n = K·2^p up to MAX_N = 32768 (the row in shared
// memory: 135 KB at n = 32768, which needs the opt-in shared memory of sm_80 / sm_90). Rows
// with TR ≤ 32 threads are packed several per 256-thread block, each in a power-of-two lane
// group (TRP = next_pow2(TR) threads, the extra ones idle); larger rows get one block of TR
// threads rounded up to whole warps.
//
// Quantization epilogue (fused; the row never leaves the block): per-token statistics (absmax,
// or min(min y, 0) / max(max y, 0)) are reduced over the row's threads with shuffles (and one
// shared-memory step across warps), scale = __fdiv_rn(absmax, qmax) etc. (IEEE division),
// rintf (round half to even), codes stored as bytes (vectorized when aligned). Per-tensor
// dynamic scales take three launches on the stream (no host sync): per-row statistics, a
// one-block reduction that writes scale / zero, then the quantizing pass reading them.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_check.h"

namespace py = pybind11;

namespace ood_fast::cuda::hadamard {

constexpr int MAX_N = 32768;
constexpr int MAX_K = 28;
constexpr int SMALL_BLOCK = 256;  // threads of a block that packs several short rows

enum Mode : int {
  MODE_HADAMARD = 0,  // write the transformed row (x's dtype)
  MODE_PER_TOKEN = 1, // dynamic per-row scale (and zero) computed here
  MODE_FIXED = 2,     // scale (and zero) read from scales[0] / zeros[0] (per-tensor dynamic)
  MODE_STATS = 3,     // per-row statistics only (per-tensor dynamic, first pass)
  MODE_STATIC = 4,    // the static scale (symmetric)
};

struct Params {
  const void* x;
  void* out;              // MODE_HADAMARD
  unsigned char* codes;   // quantization modes
  float* scales;
  int* zeros;
  float* stats;           // MODE_STATS: [rows] absmax, or [2·rows] (lo, hi)
  const float* hk;        // [K, K] or null (K <= 1)
  const float* signs;     // [n] or null
  const float* smooth;    // [n] or null
  long long rows;
  int n, K;               // K = 0: no rotation
  int P2, TS, LS, TR, TRP, RB, HB;
  int sm_hk, sm_red;      // offsets (floats) into dynamic shared memory
  bool use_smem;          // the row goes through shared memory (K > 1 or HB > 0)
  bool aligned_in, aligned_out;
  int codes_align;        // 1, 2, 4, 8 or 16: byte alignment of every row of codes
  float scale;            // hadamard's scale, or 1/sqrt(n) for rotate_quantize
  float qmax, levels, static_scale;
  int mode;
  bool sym, per_token;
};

__host__ __device__ __forceinline__ int sidx(int g) { return g + (g >> 5); }  // padded smem index

template <class In>
struct Store;
template <>
struct Store<InF32> {
  static __device__ __forceinline__ float r(float v) { return v; }
};
template <>
struct Store<InF16> {
  static __device__ __forceinline__ unsigned short r(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};
template <>
struct Store<InBF16> {
  static __device__ __forceinline__ unsigned short r(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

// E contiguous elements from src (only the first cnt are read; the rest are 0).
template <class In, int E>
__device__ __forceinline__ void load_vals(const typename In::raw* src, int cnt, bool aligned,
                                          float (&v)[E]) {
  using raw = typename In::raw;
  constexpr int PER = 16 / sizeof(raw);
  if constexpr (E % PER == 0) {
    if (aligned && cnt == E) {
#pragma unroll
      for (int c = 0; c < E / PER; ++c) {
        // plain (coherent) load: out may alias x (in place)
        const uint4 w = reinterpret_cast<const uint4*>(src)[c];
        const raw* r = reinterpret_cast<const raw*>(&w);
#pragma unroll
        for (int i = 0; i < PER; ++i) v[c * PER + i] = In::f(r[i]);
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < E; ++i) v[i] = i < cnt ? In::f(src[i]) : 0.f;
}

template <class In, int E>
__device__ __forceinline__ void store_vals(typename In::raw* dst, int cnt, bool aligned,
                                           const float (&v)[E]) {
  using raw = typename In::raw;
  constexpr int PER = 16 / sizeof(raw);
  if constexpr (E % PER == 0) {
    if (aligned && cnt == E) {
#pragma unroll
      for (int c = 0; c < E / PER; ++c) {
        uint4 w;
        raw* r = reinterpret_cast<raw*>(&w);
#pragma unroll
        for (int i = 0; i < PER; ++i) r[i] = Store<In>::r(v[c * PER + i]);
        reinterpret_cast<uint4*>(dst)[c] = w;
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < E; ++i)
    if (i < cnt) dst[i] = Store<In>::r(v[i]);
}

// E bytes of codes; vector width = the largest power of two dividing E, the alignment, 16.
template <int E>
__device__ __forceinline__ void store_codes(unsigned char* dst, int cnt, int align,
                                            const unsigned char (&c)[E]) {
  if (cnt == E) {
    if constexpr (E % 16 == 0) {
      if (align >= 16) {
#pragma unroll
        for (int k = 0; k < E / 16; ++k)
          reinterpret_cast<uint4*>(dst)[k] = reinterpret_cast<const uint4*>(c)[k];
        return;
      }
    }
    if constexpr (E % 8 == 0) {
      if (align >= 8) {
#pragma unroll
        for (int k = 0; k < E / 8; ++k)
          reinterpret_cast<uint2*>(dst)[k] = reinterpret_cast<const uint2*>(c)[k];
        return;
      }
    }
    if constexpr (E % 4 == 0) {
      if (align >= 4) {
#pragma unroll
        for (int k = 0; k < E / 4; ++k)
          reinterpret_cast<unsigned*>(dst)[k] = reinterpret_cast<const unsigned*>(c)[k];
        return;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < E; ++i)
    if (i < cnt) dst[i] = c[i];
}

// Row reduction of (a, b) with op_a / op_b over the row's TRP threads (see the header).
// Every thread of the block must call it (shuffles with a full mask; one __syncthreads when
// TRP > 32). Threads of padding / rows past the end contribute their neutral 0.
template <bool SYM>
__device__ __forceinline__ void row_reduce(float& a, float& b, const Params& p, float* red) {
  auto combine = [](float& x, float& y, float ox, float oy) {
    if (SYM) {
      x = fmaxf(x, ox);
    } else {
      x = fminf(x, ox);
      y = fmaxf(y, oy);
    }
  };
  const int width = p.TRP < 32 ? p.TRP : 32;
  for (int o = width >> 1; o > 0; o >>= 1) {
    const float oa = __shfl_xor_sync(0xffffffffu, a, o);
    const float ob = __shfl_xor_sync(0xffffffffu, b, o);
    combine(a, b, oa, ob);
  }
  if (p.TRP > 32) {  // one row per block: combine the warps
    const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if ((threadIdx.x & 31) == 0) {
      red[warp] = a;
      red[32 + warp] = b;
    }
    __syncthreads();
    a = red[0];
    b = red[32];
    for (int w = 1; w < nw; ++w) combine(a, b, red[w], red[32 + w]);
  }
}

template <class In, int LOG_E>
__global__ void __launch_bounds__(1024) row_kernel(Params p) {
  constexpr int E = 1 << LOG_E;
  using raw = typename In::raw;
  extern __shared__ float smem[];
  const int tid = threadIdx.x;
  const int l = tid % p.TRP;  // thread within its row group
  const int rb = tid / p.TRP; // row within the block
  const long long row = static_cast<long long>(blockIdx.x) * p.RB + rb;
  const bool row_ok = row < p.rows;
  const int a = l / p.TS, s = l % p.TS;  // sub-row, thread within the sub-row
  const bool active = row_ok && l < p.TR;
  const int col0 = a * p.P2 + s * E;
  const int cnt = active ? max(0, min(E, p.n - col0)) : 0;  // < E only without rotation
  const size_t rowoff = static_cast<size_t>(row_ok ? row : 0) * static_cast<size_t>(p.n);

  if (p.K > 1) {  // H_K into shared memory (read after the __syncthreads below)
    float* shk = smem + p.sm_hk;
    for (int i = tid; i < p.K * p.K; i += blockDim.x) shk[i] = p.hk[i];
  }

  float v[E];
  load_vals<In, E>(static_cast<const raw*>(p.x) + rowoff + col0, cnt, p.aligned_in, v);
  if (p.smooth != nullptr) {
#pragma unroll
    for (int i = 0; i < E; ++i)
      if (i < cnt) v[i] = __fdiv_rn(v[i], p.smooth[col0 + i]);
  }
  if (p.signs != nullptr) {
#pragma unroll
    for (int i = 0; i < E; ++i)
      if (i < cnt) v[i] *= p.signs[col0 + i];
  }

  if (p.K > 0) {
    // ---- FWHT bits [0, LOG_E): registers ----
#pragma unroll
    for (int h = 1; h < E; h <<= 1) {
#pragma unroll
      for (int i = 0; i < E; ++i) {
        if ((i & h) == 0) {
          const float x0 = v[i], x1 = v[i + h];
          v[i] = x0 + x1;
          v[i + h] = x0 - x1;
        }
      }
    }
    // ---- bits [LOG_E, LOG_E + min(LS, 5)): lanes ----
    const int lane_stages = p.LS < 5 ? p.LS : 5;
    for (int k = 0; k < lane_stages; ++k) {
      const int o = 1 << k;
      const bool upper = (s & o) != 0;  // this thread holds the "b" elements of the pairs
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const float other = __shfl_xor_sync(0xffffffffu, v[i], o);
        v[i] = upper ? other - v[i] : v[i] + other;
      }
    }
    if (p.use_smem) {
      float* sd = smem;
      const int g0 = rb * p.n + col0;
      if (active) {
#pragma unroll
        for (int i = 0; i < E; ++i) sd[sidx(g0 + i)] = v[i];
      }
      __syncthreads();
      // ---- the HB warp bits: groups of G elements spaced W0 = 32·E apart (RB == 1) ----
      if (p.HB > 0) {
        const int G = 1 << p.HB, W0 = 32 * E, per = E >> p.HB;
        if (active) {
          for (int j = 0; j < per; ++j) {
            const int base = a * p.P2 + s + j * p.TS;  // lanes: consecutive, 32-aligned
            float u[E];
#pragma unroll
            for (int h = 0; h < E; ++h)
              if (h < G) u[h] = sd[sidx(base + h * W0)];
#pragma unroll
            for (int st = 1; st < E; st <<= 1) {
              if (st < G) {
#pragma unroll
                for (int h = 0; h < E; ++h) {
                  if (h < G && (h & st) == 0) {
                    const float x0 = u[h], x1 = u[h + st];
                    u[h] = x0 + x1;
                    u[h + st] = x0 - x1;
                  }
                }
              }
            }
#pragma unroll
            for (int h = 0; h < E; ++h)
              if (h < G) sd[sidx(base + h * W0)] = u[h];
          }
        }
        __syncthreads();
      }
      // ---- K mixing: y[c, j] = Σ_a H_K[a, c] · X[a, j], whole columns per thread ----
      if (p.K > 1) {
        const float* shk = smem + p.sm_hk;
        if (row_ok) {
          for (int j = l; j < p.P2; j += p.TRP) {
            const int gb = rb * p.n + j;
            float xin[MAX_K];
#pragma unroll
            for (int t = 0; t < MAX_K; ++t)
              if (t < p.K) xin[t] = sd[sidx(gb + t * p.P2)];
            for (int c = 0; c < p.K; ++c) {
              float acc = 0.f;
#pragma unroll
              for (int t = 0; t < MAX_K; ++t)
                if (t < p.K) acc = fmaf(shk[t * p.K + c], xin[t], acc);
              sd[sidx(gb + c * p.P2)] = acc;
            }
          }
        }
        __syncthreads();
      }
      // every thread overwrites v (0 when idle), so v is dead across the phases above
#pragma unroll
      for (int i = 0; i < E; ++i) v[i] = active ? sd[sidx(g0 + i)] : 0.f;
    }
  }

  if (p.mode == MODE_HADAMARD) {
    if (cnt > 0) {
#pragma unroll
      for (int i = 0; i < E; ++i) v[i] *= p.scale;
      store_vals<In, E>(static_cast<raw*>(p.out) + rowoff + col0, cnt, p.aligned_out, v);
    }
    return;
  }

  // ---- quantization epilogue ----
  if (p.K > 0) {
#pragma unroll
    for (int i = 0; i < E; ++i) v[i] *= p.scale;  // 1/sqrt(n)
  }
  float scale = 0.f, zero = 0.f;
  if (p.mode == MODE_PER_TOKEN || p.mode == MODE_STATS) {
    float st0 = 0.f, st1 = 0.f;  // sym: absmax; asym: min(min y, 0), max(max y, 0)
#pragma unroll
    for (int i = 0; i < E; ++i) {
      if (i < cnt) {
        if (p.sym) {
          st0 = fmaxf(st0, fabsf(v[i]));
        } else {
          st0 = fminf(st0, v[i]);
          st1 = fmaxf(st1, v[i]);
        }
      }
    }
    float* red = smem + p.sm_red;
    if (p.sym) row_reduce<true>(st0, st1, p, red);
    else row_reduce<false>(st0, st1, p, red);
    if (p.mode == MODE_STATS) {
      if (row_ok && l == 0) {
        p.stats[row] = st0;
        if (!p.sym) p.stats[p.rows + row] = st1;
      }
      return;
    }
    if (p.sym) {
      scale = __fdiv_rn(st0, p.qmax);
    } else {
      scale = __fdiv_rn(st1 - st0, p.levels);
      if (scale != 0.f) zero = fminf(fmaxf(rintf(__fdiv_rn(-st0, scale)), 0.f), p.levels);
    }
    if (row_ok && l == 0) {
      p.scales[row] = scale;
      if (!p.sym) p.zeros[row] = static_cast<int>(zero);
    }
  } else if (p.mode == MODE_FIXED) {
    scale = p.scales[0];
    if (!p.sym) zero = static_cast<float>(p.zeros[0]);
  } else {  // MODE_STATIC
    scale = p.static_scale;
    if (p.per_token) {
      if (row_ok && l == 0) p.scales[row] = scale;
    } else if (blockIdx.x == 0 && tid == 0) {
      p.scales[0] = scale;
    }
  }
  if (cnt == 0) return;
  const float safe = scale == 0.f ? 1.f : scale;
  unsigned char c[E];
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const float q = __fdiv_rn(v[i], safe);
    int code;
    if (p.sym) {
      code = static_cast<int>(rintf(fminf(fmaxf(q, -p.qmax), p.qmax)));
    } else {
      const float t = rintf(fminf(fmaxf(q, -p.levels), p.levels)) + zero;
      code = static_cast<int>(fminf(fmaxf(t, 0.f), p.levels));
    }
    if (scale == 0.f) code = 0;
    c[i] = static_cast<unsigned char>(code & 0xFF);  // int8 codes as their two's complement
  }
  store_codes<E>(p.codes + rowoff + col0, cnt, p.codes_align, c);
}

// Per-tensor dynamic: one block reduces the per-row statistics and writes scale / zero.
__global__ void __launch_bounds__(1024) tensor_scale_kernel(const float* stats, long long rows,
                                                            bool sym, float qmax, float levels,
                                                            float* scale_out, int* zero_out) {
  __shared__ float red[64];
  float a = 0.f, b = 0.f;
  for (long long r = threadIdx.x; r < rows; r += blockDim.x) {
    if (sym) {
      a = fmaxf(a, stats[r]);
    } else {
      a = fminf(a, stats[r]);
      b = fmaxf(b, stats[rows + r]);
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float oa = __shfl_xor_sync(0xffffffffu, a, o);
    const float ob = __shfl_xor_sync(0xffffffffu, b, o);
    a = sym ? fmaxf(a, oa) : fminf(a, oa);
    b = fmaxf(b, ob);
  }
  const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if ((threadIdx.x & 31) == 0) {
    red[warp] = a;
    red[32 + warp] = b;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  a = red[0];
  b = red[32];
  for (int w = 1; w < nw; ++w) {
    a = sym ? fmaxf(a, red[w]) : fminf(a, red[w]);
    b = fmaxf(b, red[32 + w]);
  }
  if (sym) {
    scale_out[0] = __fdiv_rn(a, qmax);
  } else {
    const float s = __fdiv_rn(b - a, levels);
    scale_out[0] = s;
    zero_out[0] = s == 0.f ? 0 : static_cast<int>(fminf(fmaxf(rintf(__fdiv_rn(-a, s)), 0.f), levels));
  }
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------

int parse_dtype(const std::string& s) {
  if (s == "f32") return 0;
  if (s == "f16") return 1;
  if (s == "bf16") return 2;
  throw std::invalid_argument("ood_fast._cuda: dtype must be \"f32\", \"f16\" or \"bf16\", got \"" +
                              s + "\"");
}

int ilog2(long long v) {
  int r = 0;
  while ((1LL << (r + 1)) <= v) ++r;
  return r;
}
int ceil_log2(long long v) {
  int r = 0;
  while ((1LL << r) < v) ++r;
  return r;
}

// Thread layout and shared memory of one problem (see the header comment).
struct Plan {
  int LOG_E = 0;
  size_t smem_bytes = 0;
  unsigned blocks = 0, threads = 0;
};

Plan plan(Params& p, const char* fn) {
  const int n = p.n, K = p.K;
  if (n < 1 || n > MAX_N)
    throw std::invalid_argument(std::string("ood_fast._cuda.") + fn + ": n=" + std::to_string(n) +
                                " out of range 1.." + std::to_string(MAX_N));
  Plan pl;
  int logp = 0;
  if (K > 0) {
    if (K != 1 && K != 12 && K != 20 && K != 28)
      throw std::invalid_argument(std::string("ood_fast._cuda.") + fn +
                                  ": K must be 1, 12, 20 or 28, got " + std::to_string(K));
    const int q = n / K;
    if (n % K != 0 || (q & (q - 1)) != 0)
      throw std::invalid_argument(std::string("ood_fast._cuda.") + fn + ": n=" +
                                  std::to_string(n) + " is not K·2^p with K=" + std::to_string(K));
    logp = ilog2(q);
    int le = std::max(3, (logp - 5 + 1) / 2);
    le = std::max(le, ceil_log2((n + 1023) / 1024));
    pl.LOG_E = std::min(le, logp);
    p.P2 = 1 << logp;
  } else {
    pl.LOG_E = std::max(3, ceil_log2((n + 1023) / 1024));
    const int E = 1 << pl.LOG_E;
    p.P2 = (n + E - 1) / E * E;
  }
  const int E = 1 << pl.LOG_E;
  p.TS = p.P2 / E;
  p.LS = K > 0 ? ilog2(p.TS) : 0;
  p.TR = std::max(K, 1) * p.TS;
  if (p.TR <= 32) {
    p.TRP = 1 << ceil_log2(p.TR);
    p.RB = SMALL_BLOCK / p.TRP;
  } else {
    p.TRP = (p.TR + 31) / 32 * 32;
    p.RB = 1;
  }
  p.HB = K > 0 ? std::max(0, p.LS - 5) : 0;
  if (p.HB > pl.LOG_E || p.TRP > 1024)  // cannot happen for n <= MAX_N (see the header)
    throw std::logic_error("ood_fast._cuda.hadamard: internal layout error");
  p.use_smem = K > 1 || p.HB > 0;
  const long long data = p.use_smem ? sidx(p.RB * n) + 1 : 0;
  p.sm_hk = static_cast<int>(data);
  p.sm_red = p.sm_hk + (K > 1 ? K * K : 0);
  pl.smem_bytes = sizeof(float) * static_cast<size_t>(p.sm_red + 64);
  pl.threads = static_cast<unsigned>(p.RB * p.TRP);
  pl.blocks = static_cast<unsigned>((p.rows + p.RB - 1) / p.RB);
  return pl;
}

template <class In, int LOG_E>
void launch_t(const Params& p, const Plan& pl, cudaStream_t stream, int dev) {
  auto kern = row_kernel<In, LOG_E>;
  if (pl.smem_bytes > 48 * 1024) {
    int optin = 0;
    OOD_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (pl.smem_bytes > static_cast<size_t>(optin))
      throw std::invalid_argument("ood_fast._cuda.hadamard: n=" + std::to_string(p.n) + " needs " +
                                  std::to_string(pl.smem_bytes) +
                                  " bytes of shared memory per block; this device allows " +
                                  std::to_string(optin));
    OOD_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(pl.smem_bytes)));
  }
  kern<<<pl.blocks, pl.threads, pl.smem_bytes, stream>>>(p);
  OOD_CUDA_CHECK_LAUNCH("hadamard row_kernel", stream);
}

template <class In>
void launch_e(const Params& p, const Plan& pl, cudaStream_t stream, int dev) {
  switch (pl.LOG_E) {
    case 0: return launch_t<In, 0>(p, pl, stream, dev);
    case 1: return launch_t<In, 1>(p, pl, stream, dev);
    case 2: return launch_t<In, 2>(p, pl, stream, dev);
    case 3: return launch_t<In, 3>(p, pl, stream, dev);
    case 4: return launch_t<In, 4>(p, pl, stream, dev);
    case 5: return launch_t<In, 5>(p, pl, stream, dev);
    default: throw std::logic_error("ood_fast._cuda.hadamard: bad LOG_E");
  }
}

void launch(int dtype, const Params& p, const Plan& pl, cudaStream_t stream, int dev) {
  if (dtype == 0) launch_e<InF32>(p, pl, stream, dev);
  else if (dtype == 1) launch_e<InF16>(p, pl, stream, dev);
  else launch_e<InBF16>(p, pl, stream, dev);
}

int device_of(const void* ptr, const char* fn, const char* what) {
  cudaPointerAttributes at{};
  OOD_CUDA_CHECK(cudaPointerGetAttributes(&at, ptr));
  if (at.type != cudaMemoryTypeDevice && at.type != cudaMemoryTypeManaged)
    throw std::invalid_argument(std::string("ood_fast._cuda.") + fn + ": " + what +
                                " must be CUDA device memory (pass CUDA tensors)");
  return at.device;
}

int align_of(std::uintptr_t ptr, long long row_bytes) {  // largest of 16, 8, 4, 2, 1 dividing both
  int a = 16;
  while (a > 1 && ((ptr % a) != 0 || (row_bytes % a) != 0)) a >>= 1;
  return a;
}

void common_args(Params& p, std::uintptr_t x_ptr, long long rows, long long n, long long K,
                 std::uintptr_t hk_ptr, std::uintptr_t signs_ptr, const char* fn) {
  if (x_ptr == 0) throw std::invalid_argument(std::string("ood_fast._cuda.") + fn + ": null x");
  if (rows < 0) throw std::invalid_argument(std::string("ood_fast._cuda.") + fn + ": rows < 0");
  if (n < 1 || n > MAX_N)
    throw std::invalid_argument(std::string("ood_fast._cuda.") + fn + ": n=" + std::to_string(n) +
                                " out of range 1.." + std::to_string(MAX_N));
  if (K > 1 && hk_ptr == 0)
    throw std::invalid_argument(std::string("ood_fast._cuda.") + fn + ": K > 1 needs hk");
  p.x = reinterpret_cast<const void*>(x_ptr);
  p.rows = rows;
  p.n = static_cast<int>(n);
  p.K = static_cast<int>(std::clamp<long long>(K, -1, 1000));
  p.hk = K > 1 ? reinterpret_cast<const float*>(hk_ptr) : nullptr;
  p.signs = signs_ptr ? reinterpret_cast<const float*>(signs_ptr) : nullptr;
}

void hadamard(std::uintptr_t x_ptr, const std::string& dtype, long long rows, long long n,
              long long K, std::uintptr_t hk_ptr, std::uintptr_t signs_ptr, double scale,
              std::uintptr_t out_ptr, std::uintptr_t stream_ptr) {
  Params p{};
  const int dt = parse_dtype(dtype);
  common_args(p, x_ptr, rows, n, K, hk_ptr, signs_ptr, "hadamard");
  if (p.K < 1)
    throw std::invalid_argument("ood_fast._cuda.hadamard: K must be 1, 12, 20 or 28, got " +
                                std::to_string(K));
  if (out_ptr == 0) throw std::invalid_argument("ood_fast._cuda.hadamard: null out");
  p.out = reinterpret_cast<void*>(out_ptr);
  p.mode = MODE_HADAMARD;
  p.scale = static_cast<float>(scale);
  const long long esize = dt == 0 ? 4 : 2;
  p.aligned_in = align_of(x_ptr, n * esize) == 16;
  p.aligned_out = align_of(out_ptr, n * esize) == 16;
  const Plan pl = plan(p, "hadamard");
  if (rows == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  py::gil_scoped_release nogil;
  (void)cudaGetLastError();
  const int dev = device_of(p.x, "hadamard", "x");
  if (device_of(p.out, "hadamard", "out") != dev)
    throw std::invalid_argument("ood_fast._cuda.hadamard: x and out are on different devices");
  DeviceGuard guard(dev);
  launch(dt, p, pl, stream, dev);
}

void rotate_quantize(std::uintptr_t x_ptr, const std::string& dtype, long long rows, long long n,
                     long long K, std::uintptr_t hk_ptr, std::uintptr_t signs_ptr,
                     std::uintptr_t smooth_ptr, bool per_token, bool symmetric,
                     double static_scale, long long bits, std::uintptr_t codes_ptr,
                     std::uintptr_t scales_ptr, std::uintptr_t zeros_ptr,
                     std::uintptr_t stream_ptr) {
  Params p{};
  const int dt = parse_dtype(dtype);
  common_args(p, x_ptr, rows, n, K, hk_ptr, signs_ptr, "rotate_quantize");
  if (p.K < 0)
    throw std::invalid_argument("ood_fast._cuda.rotate_quantize: K must be 0 (no rotation), 1, "
                                "12, 20 or 28, got " + std::to_string(K));
  if (p.K == 0 && p.signs != nullptr)
    throw std::invalid_argument("ood_fast._cuda.rotate_quantize: signs need a rotation (K >= 1)");
  if (bits < 2 || bits > 8)
    throw std::invalid_argument("ood_fast._cuda.rotate_quantize: bits must be in 2..8, got " +
                                std::to_string(bits));
  const bool is_static = static_scale > 0;
  if (is_static && !symmetric)
    throw std::invalid_argument("ood_fast._cuda.rotate_quantize: static_scale needs symmetric");
  if (is_static && !std::isfinite(static_scale))
    throw std::invalid_argument("ood_fast._cuda.rotate_quantize: static_scale must be finite");
  if (codes_ptr == 0 || scales_ptr == 0 || (!symmetric && zeros_ptr == 0))
    throw std::invalid_argument("ood_fast._cuda.rotate_quantize: null codes/scales/zeros");
  p.smooth = smooth_ptr ? reinterpret_cast<const float*>(smooth_ptr) : nullptr;
  p.codes = reinterpret_cast<unsigned char*>(codes_ptr);
  p.scales = reinterpret_cast<float*>(scales_ptr);
  p.zeros = symmetric ? nullptr : reinterpret_cast<int*>(zeros_ptr);
  p.sym = symmetric;
  p.per_token = per_token;
  p.qmax = static_cast<float>((1 << (bits - 1)) - 1);
  p.levels = static_cast<float>((1 << bits) - 1);
  p.static_scale = static_cast<float>(static_scale);
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  const long long esize = dt == 0 ? 4 : 2;
  p.aligned_in = align_of(x_ptr, n * esize) == 16;
  p.codes_align = align_of(codes_ptr, n);
  const Plan pl = plan(p, "rotate_quantize");
  auto stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  py::gil_scoped_release nogil;
  (void)cudaGetLastError();
  const int dev = device_of(p.x, "rotate_quantize", "x");
  DeviceGuard guard(dev);
  if (rows == 0) {  // per tensor: the scale of an empty tensor (0, or the static scale)
    if (!per_token) {
      const float s = is_static ? p.static_scale : 0.f;
      OOD_CUDA_CHECK(cudaMemcpyAsync(p.scales, &s, sizeof(float), cudaMemcpyHostToDevice, stream));
      if (!symmetric) OOD_CUDA_CHECK(cudaMemsetAsync(p.zeros, 0, sizeof(int), stream));
      OOD_CUDA_CHECK(cudaStreamSynchronize(stream));  // &s lives on this stack frame
    }
    return;
  }
  if (is_static) {
    p.mode = MODE_STATIC;
    launch(dt, p, pl, stream, dev);
  } else if (per_token) {
    p.mode = MODE_PER_TOKEN;
    launch(dt, p, pl, stream, dev);
  } else {
    int pools = 0;
    OOD_CUDA_CHECK(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, dev));
    Workspace ws(sizeof(float) * static_cast<size_t>(rows) * (symmetric ? 1 : 2), stream,
                 pools != 0);
    p.stats = static_cast<float*>(ws.ptr);
    p.mode = MODE_STATS;
    launch(dt, p, pl, stream, dev);
    tensor_scale_kernel<<<1, 1024, 0, stream>>>(p.stats, rows, symmetric, p.qmax, p.levels,
                                                p.scales, p.zeros);
    OOD_CUDA_CHECK_LAUNCH("hadamard tensor_scale_kernel", stream);
    p.mode = MODE_FIXED;
    launch(dt, p, pl, stream, dev);
  }
}

}  // namespace ood_fast::cuda::hadamard

void bind_hadamard(py::module_& m) {
  using namespace pybind11::literals;
  m.def("hadamard", &ood_fast::cuda::hadamard::hadamard, "x_ptr"_a, "dtype"_a, "rows"_a, "n"_a,
        "K"_a, "hk_ptr"_a, "signs_ptr"_a, "scale"_a, "out_ptr"_a, "stream"_a,
        R"doc(Hadamard transform of every row (asynchronous).

x [rows, n] and out (same dtype "f32" | "f16" | "bf16"; out may equal x: in place) are raw CUDA
device addresses of contiguous row-major buffers. out[r, j] = scale * Σ_i x[r, i] * signs[i] *
H[i, j] with H = kron(H_K, Sylvester 2^p), n = K·2^p, K in (1, 12, 20, 28), n <= 32768;
hk_ptr: fp32 [K, K] (the reference's ±1 H_K; 0 when K = 1); signs_ptr: fp32 [n] or 0. fp32
arithmetic. stream: cudaStream_t as an int (0: legacy default). Raises ValueError for bad
arguments and RuntimeError for CUDA errors; OOD_FAST_CUDA_SYNC=1 synchronizes after each kernel.)doc");
  m.def("rotate_quantize", &ood_fast::cuda::hadamard::rotate_quantize, "x_ptr"_a, "dtype"_a,
        "rows"_a, "n"_a, "K"_a, "hk_ptr"_a, "signs_ptr"_a, "smooth_ptr"_a, "per_token"_a,
        "symmetric"_a, "static_scale"_a, "bits"_a, "codes_ptr"_a, "scales_ptr"_a, "zeros_ptr"_a,
        "stream"_a,
        R"doc(Fused smooth + Hadamard + quantization of every row (asynchronous).

y = hadamard(x / smooth, 1/sqrt(n), signs) in fp32 (K = 0: y = x / smooth, any n <= 32768);
symmetric: scale = absmax / qmax (or static_scale > 0), codes int8 = clamp(rint(y / scale),
±qmax); asymmetric: scale = (hi - lo) / (2^bits - 1) with lo = min(min y, 0), hi = max(max y,
0), zero = clamp(rint(-lo / scale), 0, L) int32, codes uint8 = clamp(rint(y / scale) + zero, 0,
L); scale 0 gives codes 0. IEEE division, round half to even. per_token: scales fp32 [rows]
(zeros int32 [rows]); else [1] (per tensor: statistics pass, one-block reduction, quantizing
pass, all on `stream`). static_scale <= 0: dynamic. bits in 2..8. smooth_ptr: fp32 [n] or 0.)doc");
}
