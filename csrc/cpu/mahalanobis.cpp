// mahalanobis_fused, CPU backend: batched Mahalanobis distances with a fused reduction.
//
//   x̃ = x − center
//   q[n, g]  = ‖x̃_n W_g‖²
//   d²[n, c] = max(0, q[n, group[c]] − 2 x̃_n · proj[:, c] + const[c])
//   reduce: none → d² [N, C]; min → (min_c d², first argmin); logsumexp → logsumexp_c(bias_c − d²_c/2)
//
// One pass over x in row tiles (OpenMP over tiles). Per tile: convert the rows to fp32 x̃ and
// pack them (gemm.h layout, bf16 pairs when precision is bf16), then walk the column panels of
// the packed B = [W_0 | ... | W_{G-1} | proj] built once at construction: each panel is one
// packed GEMM (tile x 32) followed by its epilogue, a sum of squares into q for a W panel, the
// distance and the running reduction for a proj panel. Nothing larger than tile x 32 (+ q, tile x
// G) is materialized. Triangular factors store and multiply only their upper part (panel
// [j0, j0+32) of W needs k < j0 + 32), halving the whitening flops.
#include <pybind11/pybind11.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "gemm.h"
#include "simd.h"
#include "threads.h"


namespace py = pybind11;

// Bytes of packed x per tile (kept in L2 while every B panel streams past it).
#ifndef OOD_FAST_TILE_BYTES
#define OOD_FAST_TILE_BYTES (int64_t(1) << 20)
#endif

namespace ood_fast {
namespace {

using gemm::NR;

enum Reduce { kNone = 0, kMin = 1, kLse = 2 };
enum XType { kF32 = 0, kF16 = 1, kBF16 = 2 };

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kLanes = 16;  // per-row reduction state: 16 lanes (one zmm), reduced at the end

struct EpiArgs {
  const float* cbuf;   // [m][32] GEMM result of the panel
  int64_t m;           // valid rows in the tile
  int64_t n0;          // global index of the tile's first row
  int64_t c0;          // first column of the panel
  int nc;              // valid columns in the panel (1..32)
  const float* qT;     // [G][Mt] quadratic terms of the tile
  int64_t Mt;          // tile rows (stride of qT)
  const int32_t* goff;  // [Cpad] group[c] * Mt
  int ugroup;          // >= 0: every column of the panel has this group; -1 mixed; -2 no q (G = 0)
  const float* cst;    // [Cpad]
  const float* bias;   // [Cpad]
  int reduce;
  float* out;          // reduce none: [N][C]
  int64_t C;
  float* st0;          // [Mt][16] min value / running max
  float* st1;          // [Mt][16] argmin (int32 bits) / running sum
};

// ------------------------------------------------------------------------------------------
// Portable epilogues and row conversion
// ------------------------------------------------------------------------------------------

void epi_sumsq_generic(const float* cbuf, int64_t m, float* q) {
  for (int64_t r = 0; r < m; ++r) {
    float s = 0.0f;
    for (int j = 0; j < NR; ++j) s += cbuf[r * NR + j] * cbuf[r * NR + j];
    q[r] += s;
  }
}

void epi_proj_generic(const EpiArgs& a) {
  for (int64_t r = 0; r < a.m; ++r) {
    const float* acc = a.cbuf + r * NR;
    const float qu = a.ugroup >= 0 ? a.qT[a.ugroup * a.Mt + r] : 0.0f;
    float* s0 = a.st0 + r * kLanes;
    float* s1 = a.st1 + r * kLanes;
    for (int j = 0; j < a.nc; ++j) {
      const int64_t c = a.c0 + j;
      const float q = a.ugroup == -1 ? a.qT[a.goff[c] + r] : qu;
      float d = (q + a.cst[c]) - 2.0f * acc[j];
      d = d < 0.0f ? 0.0f : d;
      const int lane = j & (kLanes - 1);
      if (a.reduce == kNone) {
        a.out[(a.n0 + r) * a.C + c] = d;
      } else if (a.reduce == kMin) {
        if (d < s0[lane]) {
          s0[lane] = d;
          int32_t ci = static_cast<int32_t>(c);
          std::memcpy(&s1[lane], &ci, 4);
        }
      } else {
        const float v = a.bias[c] - 0.5f * d;
        if (!(v > -kInf)) continue;
        if (v > s0[lane]) {
          s1[lane] = s1[lane] * std::exp(s0[lane] - v) + 1.0f;
          s0[lane] = v;
        } else {
          s1[lane] += std::exp(v - s0[lane]);
        }
      }
    }
  }
}

void convert_row_generic(const void* x, int xt, int64_t E, const float* center, float* row) {
  if (xt == kF32) {
    const float* p = static_cast<const float*>(x);
    for (int64_t k = 0; k < E; ++k) row[k] = p[k] - center[k];
  } else if (xt == kF16) {
    const uint16_t* p = static_cast<const uint16_t*>(x);
    for (int64_t k = 0; k < E; ++k) row[k] = gemm::f16_to_f32(p[k]) - center[k];
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(x);
    for (int64_t k = 0; k < E; ++k) row[k] = gemm::bf16_to_f32(p[k]) - center[k];
  }
}

// ------------------------------------------------------------------------------------------
// AVX-512 epilogues and row conversion
// ------------------------------------------------------------------------------------------

#ifdef OOD_FAST_X86

// exp(x) for x <= ~88: 2^n · e^r with n = round(x / ln 2), |r| <= ln2 / 2, degree-7 Taylor
// polynomial (error < 1e-8 relative), scaled by vscalefps (underflows cleanly to 0).
OOD_TARGET_AVX512 inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

OOD_TARGET_AVX512 void epi_sumsq_avx512(const float* cbuf, int64_t m, float* q) {
  for (int64_t r = 0; r < m; ++r) {
    const __m512 a = _mm512_loadu_ps(cbuf + r * NR);
    const __m512 b = _mm512_loadu_ps(cbuf + r * NR + 16);
    q[r] += _mm512_reduce_add_ps(_mm512_fmadd_ps(b, b, _mm512_mul_ps(a, a)));
  }
}

OOD_TARGET_AVX512 void epi_proj_avx512(const EpiArgs& a) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512 neg2 = _mm512_set1_ps(-2.0f);
  const __m512 mhalf = _mm512_set1_ps(-0.5f);
  for (int h = 0; h < 2; ++h) {
    const int nh = std::min(a.nc - 16 * h, 16);
    if (nh <= 0) break;
    const __mmask16 mask = static_cast<__mmask16>((1u << nh) - 1u);
    const int64_t cb = a.c0 + 16 * h;  // arrays are padded to a multiple of 32 columns
    const __m512 cst = _mm512_loadu_ps(a.cst + cb);
    const __m512 bias = _mm512_loadu_ps(a.bias + cb);
    const __m512i goff = _mm512_loadu_si512(a.goff + cb);
    const __m512i col = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(cb)),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    for (int64_t r = 0; r < a.m; ++r) {
      const __m512 acc = _mm512_loadu_ps(a.cbuf + r * NR + 16 * h);
      __m512 q;
      if (a.ugroup >= 0) {
        q = _mm512_set1_ps(a.qT[a.ugroup * a.Mt + r]);
      } else if (a.ugroup == -1) {
        q = _mm512_mask_i32gather_ps(zero, mask, _mm512_add_epi32(goff, _mm512_set1_epi32(static_cast<int32_t>(r))),
                                     a.qT, 4);
      } else {
        q = zero;
      }
      __m512 d = _mm512_fmadd_ps(neg2, acc, _mm512_add_ps(q, cst));
      d = _mm512_max_ps(zero, d);  // NaN propagates (max returns the second operand)
      if (a.reduce == kNone) {
        _mm512_mask_storeu_ps(a.out + (a.n0 + r) * a.C + cb, mask, d);
      } else if (a.reduce == kMin) {
        float* s0 = a.st0 + r * kLanes;
        float* s1 = a.st1 + r * kLanes;
        const __m512 vmin = _mm512_load_ps(s0);
        const __mmask16 lt = _mm512_mask_cmp_ps_mask(mask, d, vmin, _CMP_LT_OQ);
        _mm512_store_ps(s0, _mm512_mask_mov_ps(vmin, lt, d));
        _mm512_store_si512(s1, _mm512_mask_mov_epi32(_mm512_load_si512(s1), lt, col));
      } else {
        float* s0 = a.st0 + r * kLanes;
        float* s1 = a.st1 + r * kLanes;
        const __m512 v = _mm512_fmadd_ps(mhalf, d, bias);
        const __mmask16 ok = _mm512_mask_cmp_ps_mask(mask, v, _mm512_set1_ps(-kInf), _CMP_GT_OQ);
        if (!ok) continue;
        const __m512 vm = _mm512_load_ps(s0);
        const __m512 vs = _mm512_load_ps(s1);
        const __m512 mnew = _mm512_mask_max_ps(vm, ok, vm, v);
        const __m512 e_old = exp512(_mm512_sub_ps(vm, mnew));
        const __m512 e_new = exp512(_mm512_sub_ps(v, mnew));
        _mm512_store_ps(s1, _mm512_mask_fmadd_ps(vs, ok, e_old, e_new));
        _mm512_store_ps(s0, mnew);
      }
    }
  }
}

OOD_TARGET_AVX512 void convert_row_avx512(const void* x, int xt, int64_t E, const float* center, float* row) {
  int64_t k = 0;
  if (xt == kF32) {
    const float* p = static_cast<const float*>(x);
    for (; k + 16 <= E; k += 16)
      _mm512_storeu_ps(row + k, _mm512_sub_ps(_mm512_loadu_ps(p + k), _mm512_loadu_ps(center + k)));
    for (; k < E; ++k) row[k] = p[k] - center[k];
  } else if (xt == kF16) {
    const uint16_t* p = static_cast<const uint16_t*>(x);
    for (; k + 16 <= E; k += 16) {
      const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k)));
      _mm512_storeu_ps(row + k, _mm512_sub_ps(v, _mm512_loadu_ps(center + k)));
    }
    for (; k < E; ++k) row[k] = gemm::f16_to_f32(p[k]) - center[k];
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(x);
    for (; k + 16 <= E; k += 16) {
      const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k)));
      const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
      _mm512_storeu_ps(row + k, _mm512_sub_ps(v, _mm512_loadu_ps(center + k)));
    }
    for (; k < E; ++k) row[k] = gemm::bf16_to_f32(p[k]) - center[k];
  }
}

#endif  // OOD_FAST_X86

// ------------------------------------------------------------------------------------------
// The op
// ------------------------------------------------------------------------------------------

const void* as_ptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }

class FusedDistance {
 public:
  FusedDistance(uintptr_t center_ptr, uintptr_t factors_ptr, int64_t G, uintptr_t proj_ptr, uintptr_t const_ptr,
                uintptr_t group_ptr, int64_t E, int64_t C, bool triangular, bool bf16, const std::string& isa)
      : E_(E), C_(C), G_(factors_ptr ? G : 0), tri_(triangular), bf16_(bf16) {
    if (E < 1 || C < 1 || G < 0) throw std::invalid_argument("FusedDistance: need E >= 1, C >= 1, G >= 0");
    if (!center_ptr || !proj_ptr || !const_ptr) throw std::invalid_argument("FusedDistance: null parameter pointer");
    if (G_ > 0 && !group_ptr) throw std::invalid_argument("FusedDistance: null group pointer");
    if (isa == "auto") {
      kr_ = gemm::select_kernel(bf16);
    } else if (isa == "generic") {
      kr_ = gemm::generic_kernel();
#ifdef OOD_FAST_X86
    } else if (isa == "avx512f" && cpu_has_avx512f()) {
      kr_ = gemm::avx512_kernel();
    } else if (isa == "avx512bf16" && bf16 && cpu_has_avx512bf16()) {
      kr_ = gemm::avx512bf16_kernel();
    } else if (isa == "amx" && bf16 && cpu_has_amx_bf16()) {
      kr_ = gemm::amx_kernel();
#endif
    } else {
      throw std::invalid_argument("FusedDistance: isa '" + isa +
                                  "' is not available (choose auto, generic, avx512f where the CPU has "
                                  "AVX-512, avx512bf16 with bf16=True where it has AVX512-BF16, amx with "
                                  "bf16=True where it has AMX-BF16)");
    }
    avx512_ = kr_.isa != gemm::Isa::Generic;
    a_steps_ = gemm::ksteps(kr_, E);
    // Tile rows: the packed A tile (Mt x E words) stays within ~1 MiB of L2, at most ~256 rows.
    const int64_t mr = kr_.mr;
    int64_t nb = OOD_FAST_TILE_BYTES / std::max<int64_t>(1, a_steps_ * 4 * mr);
    nb = std::max<int64_t>(1, std::min<int64_t>(nb, 256 / mr));
    Mt_ = nb * mr;

    const float* center = static_cast<const float*>(as_ptr(center_ptr));
    const float* proj = static_cast<const float*>(as_ptr(proj_ptr));
    const float* cst = static_cast<const float*>(as_ptr(const_ptr));
    const int64_t* group = static_cast<const int64_t*>(as_ptr(group_ptr));
    const float* factors = static_cast<const float*>(as_ptr(factors_ptr));

    center_.assign(center, center + E);
    Cpad_ = (C + NR - 1) / NR * NR;
    const_.assign(Cpad_, 0.0f);
    std::copy(cst, cst + C, const_.begin());
    goff_.assign(Cpad_, 0);
    if (G_ > 0) {
      for (int64_t c = 0; c < C; ++c) {
        if (group[c] < 0 || group[c] >= G_) throw std::invalid_argument("FusedDistance: group index out of range");
        goff_[c] = static_cast<int32_t>(group[c] * Mt_);
      }
    }

    // Panels: W_0 ... W_{G-1} (ceil(E/32) each), then proj (ceil(C/32)).
    const bool round = bf16;
    gemm::PackedBBuilder builder(kr_, round);
    wpanels_ = (E + NR - 1) / NR;
    for (int64_t g = 0; g < G_; ++g)
      for (int64_t p = 0; p < wpanels_; ++p) builder.add(tri_ ? std::min(E, (p + 1) * NR) : E);
    ppanels_ = Cpad_ / NR;
    for (int64_t p = 0; p < ppanels_; ++p) builder.add(E);
    builder.allocate(B_);
    size_t idx = 0;
    for (int64_t g = 0; g < G_; ++g) {
      const float* W = factors + g * E * E;
      for (int64_t p = 0; p < wpanels_; ++p, ++idx) {
        const int64_t j0 = p * NR;
        const bool tri = tri_;
        builder.fill(B_, idx, [&](int64_t k, int j) -> float {
          const int64_t col = j0 + j;
          if (col >= E || k >= E || (tri && k > col)) return 0.0f;
          return W[k * E + col];
        });
      }
    }
    pgroup_.assign(ppanels_, -2);
    for (int64_t p = 0; p < ppanels_; ++p, ++idx) {
      const int64_t c0 = p * NR;
      builder.fill(B_, idx, [&](int64_t k, int j) -> float {
        const int64_t col = c0 + j;
        if (col >= C || k >= E) return 0.0f;
        return proj[k * C + col];
      });
      if (G_ > 0) {
        int ug = static_cast<int>(group[c0]);
        for (int64_t c = c0; c < std::min(C, c0 + NR); ++c)
          if (group[c] != ug) ug = -1;
        pgroup_[p] = ug;
      }
    }
  }

  void run(uintptr_t x_ptr, const std::string& x_dtype, int64_t N, int reduce, uintptr_t bias_ptr,
           uintptr_t out_ptr, uintptr_t idx_ptr, int num_threads) const {
    int xt;
    if (x_dtype == "f32") xt = kF32;
    else if (x_dtype == "f16") xt = kF16;
    else if (x_dtype == "bf16") xt = kBF16;
    else throw std::invalid_argument("FusedDistance.run: x_dtype must be f32, f16 or bf16, got '" + x_dtype + "'");
    if (reduce < 0 || reduce > 2) throw std::invalid_argument("FusedDistance.run: reduce must be 0, 1 or 2");
    if (N < 0) throw std::invalid_argument("FusedDistance.run: N < 0");
    if (N == 0) return;
    if (!x_ptr || !out_ptr) throw std::invalid_argument("FusedDistance.run: null x or out pointer");
    if (reduce == kMin && !idx_ptr) throw std::invalid_argument("FusedDistance.run: reduce=min needs idx");

    std::vector<float> bias(Cpad_, 0.0f);
    if (bias_ptr) {
      const float* b = static_cast<const float*>(as_ptr(bias_ptr));
      std::copy(b, b + C_, bias.begin());
    }
    const char* x = static_cast<const char*>(as_ptr(x_ptr));
    const size_t xsize = xt == kF32 ? 4 : 2;
    float* out = reinterpret_cast<float*>(out_ptr);
    int64_t* idx = reinterpret_cast<int64_t*>(idx_ptr);

    const int64_t ntiles = (N + Mt_ - 1) / Mt_;
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, ntiles)));
    const int64_t mr = kr_.mr;

    // Per-thread workspaces, allocated before the parallel region (no throwing inside it).
    struct Work {
      gemm::Buffer<uint32_t> A;
      gemm::Buffer<float> cbuf, qT, st0, st1, rows;
    };
    std::vector<Work> work(nt);
    for (auto& w : work) {
      w.A.resize(static_cast<size_t>(Mt_ * a_steps_));
      w.cbuf.resize(static_cast<size_t>(Mt_ * NR));
      w.qT.resize(static_cast<size_t>(std::max<int64_t>(G_, 1) * Mt_));
      w.st0.resize(static_cast<size_t>(Mt_ * kLanes));
      w.st1.resize(static_cast<size_t>(Mt_ * kLanes));
      w.rows.resize(static_cast<size_t>(mr * E_ + 16));
    }

    std::atomic<int64_t> next_tile{nt};  // tiles 0..nt-1 go one per thread
#pragma omp parallel num_threads(nt)
    {
      const int tid = thread_index();
      Work& w = work[tid];
      const gemm::AmxScope amx(kr_);  // tile configuration for this thread (AMX kernel only)
      // Dynamic tiles with one tile of lookahead: a thread claims its next tile before working
      // on the current one, so it can prefetch the next tile's rows of x meanwhile. (Results do
      // not depend on the assignment: tile boundaries are fixed, rows are independent.)
      int64_t t = tid;
      while (t < ntiles) {
        const int64_t t_next = next_tile.fetch_add(1);
        const int64_t n0 = t * Mt_;
        const int64_t m = std::min(Mt_, N - n0);
        const int64_t n_micro = (m + mr - 1) / mr;
        uint32_t* A = w.A.data();
        for (int64_t i = 0; i < n_micro; ++i) {
          const int64_t r0 = i * mr, mrows = std::min(mr, m - r0);
          for (int64_t r = 0; r < mrows; ++r) {
            const void* xr = x + static_cast<size_t>(n0 + r0 + r) * E_ * xsize;
            float* row = w.rows.data() + r * E_;
#ifdef OOD_FAST_X86
            if (avx512_) convert_row_avx512(xr, xt, E_, center_.data(), row);
            else convert_row_generic(xr, xt, E_, center_.data(), row);
#else
            convert_row_generic(xr, xt, E_, center_.data(), row);
#endif
          }
          gemm::pack_a_panel(kr_, A, a_steps_, i, w.rows.data(), E_, mrows, E_, bf16_);
        }
        const char* pf = nullptr;
        size_t pf_bytes = 0;
        if (t_next < ntiles) {
          const int64_t nn = t_next * Mt_;
          pf = x + static_cast<size_t>(nn) * E_ * xsize;
          pf_bytes = static_cast<size_t>(std::min(Mt_, N - nn)) * E_ * xsize;
        }
        tile(A, n_micro, m, n0, bias.data(), reduce, out, idx, w.cbuf.data(), w.qT.data(), w.st0.data(),
             w.st1.data(), pf, pf_bytes);
        t = t_next;
      }
    }
  }

  std::string isa() const {
    switch (kr_.isa) {
      case gemm::Isa::Amx: return "amx";
      case gemm::Isa::Avx512Bf16: return "avx512bf16";
      case gemm::Isa::Avx512: return "avx512f";
      default: return "generic";
    }
  }
  int64_t tile_rows() const { return Mt_; }

 private:
  void tile(const uint32_t* A, int64_t n_micro, int64_t m, int64_t n0, const float* bias, int reduce, float* out,
            int64_t* idx, float* cbuf, float* qT, float* st0, float* st1, const char* pf, size_t pf_bytes) const {
    // Prefetch the next tile's rows of x, spread over every micro-kernel call of this tile.
    gemm::Prefetcher prefetcher;
    {
      int64_t calls = 0;
      for (const auto& pn : B_.panels) calls += gemm::panel_calls(kr_, n_micro, pn.steps);
      prefetcher.set(pf, pf_bytes, static_cast<size_t>(calls));
    }
    if (G_ > 0) std::fill(qT, qT + G_ * Mt_, 0.0f);
    for (int64_t r = 0; r < m; ++r) {
      for (int l = 0; l < kLanes; ++l) {
        if (reduce == kMin) {
          st0[r * kLanes + l] = kInf;
          int32_t zero = 0;
          std::memcpy(&st1[r * kLanes + l], &zero, 4);
        } else {
          st0[r * kLanes + l] = -kInf;
          st1[r * kLanes + l] = 0.0f;
        }
      }
    }
    const uint32_t* Bd = B_.data.data();
    size_t p = 0;
    for (int64_t g = 0; g < G_; ++g) {
      for (int64_t wp = 0; wp < wpanels_; ++wp, ++p) {
        const auto& pn = B_.panels[p];
        gemm::panel_gemm(kr_, A, a_steps_, n_micro, Bd + pn.offset, pn.steps, cbuf, &prefetcher);
#ifdef OOD_FAST_X86
        if (avx512_) epi_sumsq_avx512(cbuf, m, qT + g * Mt_);
        else epi_sumsq_generic(cbuf, m, qT + g * Mt_);
#else
        epi_sumsq_generic(cbuf, m, qT + g * Mt_);
#endif
      }
    }
    EpiArgs ea;
    ea.cbuf = cbuf;
    ea.m = m;
    ea.n0 = n0;
    ea.qT = qT;
    ea.Mt = Mt_;
    ea.goff = goff_.data();
    ea.cst = const_.data();
    ea.bias = bias;
    ea.reduce = reduce;
    ea.out = out;
    ea.C = C_;
    ea.st0 = st0;
    ea.st1 = st1;
    for (int64_t pp = 0; pp < ppanels_; ++pp, ++p) {
      const auto& pn = B_.panels[p];
      gemm::panel_gemm(kr_, A, a_steps_, n_micro, Bd + pn.offset, pn.steps, cbuf, &prefetcher);
      ea.c0 = pp * NR;
      ea.nc = static_cast<int>(std::min<int64_t>(NR, C_ - ea.c0));
      ea.ugroup = pgroup_[pp];
#ifdef OOD_FAST_X86
      if (avx512_) epi_proj_avx512(ea);
      else epi_proj_generic(ea);
#else
      epi_proj_generic(ea);
#endif
    }
    if (reduce == kNone) return;
    for (int64_t r = 0; r < m; ++r) {
      const float* s0 = st0 + r * kLanes;
      const float* s1 = st1 + r * kLanes;
      if (reduce == kMin) {
        float best = kInf;
        int32_t bi = 0;
        bool found = false;
        for (int l = 0; l < kLanes; ++l) {
          int32_t ci;
          std::memcpy(&ci, &s1[l], 4);
          if (s0[l] < best || (s0[l] == best && found && ci < bi)) {
            best = s0[l];
            bi = ci;
            found = true;
          }
        }
        if (!found) {  // every distance was NaN or +inf
          best = kInf;
          bi = 0;
          for (int l = 0; l < kLanes; ++l)
            if (std::isnan(s0[l])) best = s0[l];
        }
        out[n0 + r] = best;
        idx[n0 + r] = bi;
      } else {
        float mx = -kInf;
        for (int l = 0; l < kLanes; ++l) mx = std::max(mx, s0[l]);
        if (!(mx > -kInf)) {
          out[n0 + r] = -kInf;
          continue;
        }
        double s = 0.0;
        for (int l = 0; l < kLanes; ++l)
          if (s0[l] > -kInf) s += static_cast<double>(s1[l]) * std::exp(static_cast<double>(s0[l]) - mx);
        out[n0 + r] = static_cast<float>(mx + std::log(s));
      }
    }
  }

  int64_t E_, C_, G_;
  bool tri_, bf16_;
  bool avx512_ = false;
  gemm::Kernel kr_;
  int64_t a_steps_ = 0, Mt_ = 0, Cpad_ = 0, wpanels_ = 0, ppanels_ = 0;
  std::vector<float> center_, const_;
  std::vector<int32_t> goff_;
  std::vector<int> pgroup_;
  gemm::PackedB B_;
};

}  // namespace
}  // namespace ood_fast

void bind_mahalanobis(py::module_& m) {
  using ood_fast::FusedDistance;
  py::class_<FusedDistance>(m, "FusedDistance",
                            "Fused Mahalanobis distances with packed parameters (see csrc/cpu/mahalanobis.cpp).")
      .def(py::init<uintptr_t, uintptr_t, int64_t, uintptr_t, uintptr_t, uintptr_t, int64_t, int64_t, bool, bool,
                    const std::string&>(),
           py::arg("center_ptr"), py::arg("factors_ptr"), py::arg("G"), py::arg("proj_ptr"), py::arg("const_ptr"),
           py::arg("group_ptr"), py::arg("E"), py::arg("C"), py::arg("triangular"), py::arg("bf16"),
           py::arg("isa") = "auto",
           "Copy and pack center [E], factors [G, E, E] (0, G = 0: none), proj [E, C], const [C], group [C] "
           "(float32 / int64, contiguous). isa: 'auto' (fastest here), or force 'generic' (portable), 'avx512f', "
           "'avx512bf16' (vdpbf16ps; bf16=True only), 'amx' (AMX-BF16 tiles; bf16=True only; 'auto' picks it "
           "for bf16 where available).")
      .def("run", &FusedDistance::run, py::arg("x_ptr"), py::arg("x_dtype"), py::arg("N"), py::arg("reduce"),
           py::arg("bias_ptr"), py::arg("out_ptr"), py::arg("idx_ptr"), py::arg("num_threads"),
           py::call_guard<py::gil_scoped_release>(),
           "x [N, E] (f32|f16|bf16); reduce 0 none (out [N, C]), 1 min (out [N], idx [N] int64), "
           "2 logsumexp (out [N]); bias [C] float32 or 0.")
      .def_property_readonly("isa", &FusedDistance::isa, "Kernel in use: amx, avx512bf16, avx512f or generic.")
      .def_property_readonly("tile_rows", &FusedDistance::tile_rows, "Rows of x per tile.");
}
