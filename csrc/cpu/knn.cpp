// knn, CPU backend: exact k-nearest-neighbour search with a fused distance + top-k epilogue.
//
//   l2: d = max(0, (‖q‖² + ‖b‖²) − 2 q·b)      ip: d = −q·b        (fp32 throughout)
//   result per query: the k smallest (d, index) pairs, ascending, ties by lower index.
//
// Every q·b is the same fp32 chain, c = fma(q[k], b[k], c) for k = 0..D−1 (the packed GEMM
// micro-kernel of gemm.h, whatever the tiling), and the norms are computed once per row by one
// function, so every path (query tiles × shared bank chunks for large batches, bank split over
// threads for small ones, any thread count) gives bit-identical distances and hence identical
// results. Reduced-precision banks (f16/bf16) are upcast exactly while being packed, so their
// results equal the fp32 search over the upcast values by construction. One exception, for speed:
// a bf16 bank on a processor with AMX-BF16 (batches of 64+ queries, k <= 512) runs a split-query
// AMX pass and a certified re-rank that reproduces the fp32 path's result bit for bit (see
// knn_bf16_amx below); with exact=False that pass's own top k is returned. (vdpbf16ps alone
// would not pay: it runs at half the fp32 FMA rate on this kind of processor.)
//
// Large batches: the bank is packed in chunks of up to 64 MiB (32-row GEMM panels, shared by
// the threads; OOD_FAST_KNN_CHUNK_BYTES overrides, for tests), each thread multiplies its query
// tiles (packed once per block of queries, in L2 while in use) by every panel of the chunk, and
// the epilogue turns each 32-wide slab of dot products into distances, compares them with the
// query's threshold (its current k-th distance) and compress-stores the few that pass as 64-bit
// (distance, index) keys; when a buffer (up to min(k, 1024) keys per query of the tile) fills, and
// at the end of each chunk, the k smallest keys of it and the query's kept set (unsorted, in its
// int64 output row) are selected (topk::select_keys) and the threshold becomes the k-th key's
// distance; each kept set is sorted once at the end. Only a tile × 32 block of distances exists
// at a time. Banks are limited to 2^32 − 1 rows (the key's index half).
// Small batches (fewer queries than two micro-panels): the bank is split between the threads,
// each streams its part, packing 32 rows × one K block at a time into L1 (a GEMV in effect, with
// a micro-kernel as tall as the batch), keeps private lists, and the lists are merged at the end.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "gemm.h"
#include "simd.h"
#include "threads.h"
#include "topk.h"


namespace py = pybind11;

namespace ood_fast {
namespace {

using gemm::NR;

enum DType { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum Metric { kL2 = 0, kIP = 1 };

constexpr float kInf = std::numeric_limits<float>::infinity();

int parse_dtype(const std::string& s, const char* what) {
  if (s == "f32") return kF32;
  if (s == "f16") return kF16;
  if (s == "bf16") return kBF16;
  throw std::invalid_argument(std::string("knn: ") + what + " dtype must be f32, f16 or bf16, got '" + s + "'");
}

inline size_t dtype_size(int dt) { return dt == kF32 ? 4 : 2; }

inline float load_elem(const void* p, int dt, int64_t idx) {
  if (dt == kF32) return static_cast<const float*>(p)[idx];
  const uint16_t h = static_cast<const uint16_t*>(p)[idx];
  return dt == kF16 ? gemm::f16_to_f32(h) : gemm::bf16_to_f32(h);
}

// ------------------------------------------------------------------------------------------
// Row conversion, squared norms, bank panel packing: portable versions
// ------------------------------------------------------------------------------------------

void convert_row_generic(const void* src, int dt, int64_t D, float* dst) {
  for (int64_t k = 0; k < D; ++k) dst[k] = load_elem(src, dt, k);
}

// Squared norms are one sequential chain over k, like the dot products (s = s + x·x here,
// fma(x, x, s) in the AVX-512 versions), whether computed from a row or from a packed panel.
float sqnorm_generic(const float* x, int64_t D) {
  float s = 0.0f;
  for (int64_t k = 0; k < D; ++k) s += x[k] * x[k];
  return s;
}

// dst[s][j] (s < ks, j < 32) = bank row j (of the rows at `bank`), element k0 + s; rows past nv
// are zero. nrm (if set): nrm[j] continues the squared-norm chain of row j over these elements.
void pack_b_generic(const char* bank, int dt, int64_t D, int64_t nv, int64_t k0, int64_t ks, float* dst, float* nrm) {
  const size_t row_bytes = static_cast<size_t>(D) * dtype_size(dt);
  for (int j = 0; j < NR; ++j) {
    const void* row = bank + j * row_bytes;
    float s = nrm ? nrm[j] : 0.0f;
    for (int64_t t = 0; t < ks; ++t) {
      const float v = j < nv ? load_elem(row, dt, k0 + t) : 0.0f;
      dst[t * NR + j] = v;
      s += v * v;
    }
    if (nrm) nrm[j] = s;
  }
}

#ifdef OOD_FAST_X86

OOD_TARGET_AVX512 inline __m512 load16(const void* p, int dt, __mmask16 m) {
  if (dt == kF32) return _mm512_maskz_loadu_ps(m, p);
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  if (dt == kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

OOD_TARGET_AVX512 void convert_row_avx512(const void* src, int dt, int64_t D, float* dst) {
  const char* p = static_cast<const char*>(src);
  const size_t es = dtype_size(dt);
  for (int64_t k = 0; k < D; k += 16) {
    const int kv = static_cast<int>(std::min<int64_t>(16, D - k));
    const __mmask16 m = static_cast<__mmask16>((1u << kv) - 1u);
    _mm512_mask_storeu_ps(dst + k, m, load16(p + k * es, dt, m));
  }
}

OOD_TARGET_AVX512 float sqnorm_avx512(const float* x, int64_t D) {
  __m128 s = _mm_setzero_ps();
  for (int64_t k = 0; k < D; ++k) {
    const __m128 v = _mm_set_ss(x[k]);
    s = _mm_fmadd_ss(v, v, s);
  }
  return _mm_cvtss_f32(s);
}

OOD_TARGET_AVX512 void pack_b_avx512(const char* bank, int dt, int64_t D, int64_t nv, int64_t k0, int64_t ks,
                                     float* dst, float* nrm) {
  const size_t es = dtype_size(dt);
  const size_t row_bytes = static_cast<size_t>(D) * es;
  for (int h = 0; h < 2; ++h) {
    const int64_t rows = std::min<int64_t>(16, nv - 16 * h);
    if (rows <= 0) {
      for (int64_t s = 0; s < ks; ++s) _mm512_store_ps(dst + s * NR + 16 * h, _mm512_setzero_ps());
      if (nrm) _mm512_storeu_ps(nrm + 16 * h, _mm512_setzero_ps());
      continue;
    }
    const char* base = bank + static_cast<size_t>(16 * h) * row_bytes;
    __m512 acc = nrm ? _mm512_loadu_ps(nrm + 16 * h) : _mm512_setzero_ps();
    for (int64_t s0 = 0; s0 < ks; s0 += 16) {
      const int kv = static_cast<int>(std::min<int64_t>(16, ks - s0));
      const __mmask16 m = static_cast<__mmask16>((1u << kv) - 1u);
      __m512 v[16];
      for (int r = 0; r < 16; ++r)
        v[r] = r < rows ? load16(base + r * row_bytes + (k0 + s0) * es, dt, m) : _mm512_setzero_ps();
      gemm::transpose16x16(v);
      for (int j = 0; j < kv; ++j) {
        _mm512_store_ps(dst + (s0 + j) * NR + 16 * h, v[j]);
        acc = _mm512_fmadd_ps(v[j], v[j], acc);
      }
    }
    if (nrm) _mm512_storeu_ps(nrm + 16 * h, acc);
  }
}

gemm::MicroKernel ukr_f32_rows(int mr) {
  switch (mr) {
    case 1: return &gemm::ukr_f32_avx512<1>;
    case 2: return &gemm::ukr_f32_avx512<2>;
    case 3: return &gemm::ukr_f32_avx512<3>;
    case 4: return &gemm::ukr_f32_avx512<4>;
    case 5: return &gemm::ukr_f32_avx512<5>;
    case 6: return &gemm::ukr_f32_avx512<6>;
    case 7: return &gemm::ukr_f32_avx512<7>;
    case 8: return &gemm::ukr_f32_avx512<8>;
    case 9: return &gemm::ukr_f32_avx512<9>;
    case 10: return &gemm::ukr_f32_avx512<10>;
    case 11: return &gemm::ukr_f32_avx512<11>;
    case 12: return &gemm::ukr_f32_avx512<12>;
    case 13: return &gemm::ukr_f32_avx512<13>;
    default: return &gemm::ukr_f32_avx512<14>;
  }
}

#endif  // OOD_FAST_X86

// ------------------------------------------------------------------------------------------
// Per-thread candidate buffers and the query lists they are merged into
// ------------------------------------------------------------------------------------------

struct Lists {  // rows of the (global or thread-private) result, indexed by local query row
  uint64_t* keys;  // sorted (distance, index) keys, k per row
  int64_t stride;  // = k
  int64_t* count;
  float* thr;      // the k-th distance once the list is full, else +inf
};

struct Work {
  gemm::Buffer<uint32_t> A;     // packed query tile (large path)
  gemm::Buffer<float> cbuf;     // [rows][32] dot products of one panel
  gemm::Buffer<float> bbuf;     // one packed K block of a bank panel (small path)
  gemm::Buffer<float> rows;     // converted query rows (packing)
  std::vector<uint64_t> cand;   // [tile rows][cap] keys (distance, row)
  std::vector<int32_t> ncand;   // [tile rows]
  std::vector<uint64_t> sort_tmp;  // [cap]
  alignas(64) float nrm[NR];    // squared norms of the panel's rows (small path)
  std::vector<uint64_t> tmp;    // merge scratch, k
};

class Search {
 public:
  Search(const void* q, int qt, int64_t N, const char* bank, int bt, int64_t M, int64_t D, int64_t k, int metric,
         float* out_d, int64_t* out_i, int nthreads)
      : q_(q), qt_(qt), N_(N), bank_(bank), bt_(bt), M_(M), D_(D), k_(k), metric_(metric), out_d_(out_d),
        out_i_(out_i), nthreads_(std::max(1, nthreads)) {
#ifdef OOD_FAST_X86
    avx512_ = cpu_has_avx512f();
#endif
    kr_ = avx512_ ? avx512_kernel() : gemm::generic_kernel();
    cap_ = static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(16, k)));
    cstride_ = cap_ + 32;
    row_bytes_ = static_cast<size_t>(D) * dtype_size(bt);
  }

  void run() {
    if (N_ < 2 * 14) run_bank_split();  // fewer queries than two micro-panels
    else run_query_tiles();
  }

 private:
  static gemm::Kernel avx512_kernel() {
#ifdef OOD_FAST_X86
    return gemm::avx512_kernel();
#else
    return gemm::generic_kernel();
#endif
  }

  void convert_row(const void* src, int dt, float* dst) const {
#ifdef OOD_FAST_X86
    if (avx512_) return convert_row_avx512(src, dt, D_, dst);
#endif
    convert_row_generic(src, dt, D_, dst);
  }
  float sqnorm(const float* x) const {
#ifdef OOD_FAST_X86
    if (avx512_) return sqnorm_avx512(x, D_);
#endif
    return sqnorm_generic(x, D_);
  }
  void pack_b(int64_t r0, int64_t k0, int64_t ks, float* dst, float* nrm) const {
    const int64_t nv = std::min<int64_t>(NR, M_ - r0);
    const char* src = bank_ + static_cast<size_t>(r0) * row_bytes_;
    if (metric_ != kL2) nrm = nullptr;
#ifdef OOD_FAST_X86
    if (avx512_) return pack_b_avx512(src, bt_, D_, nv, k0, ks, dst, nrm);
#endif
    pack_b_generic(src, bt_, D_, nv, k0, ks, dst, nrm);
  }

  void alloc_work(Work& w, int64_t tile_rows, bool bbuf) const {
    w.A.resize(static_cast<size_t>(tile_rows * D_));
    w.cbuf.resize(static_cast<size_t>(tile_rows * NR));
    if (bbuf) w.bbuf.resize(static_cast<size_t>(kr_.kc * NR));
    w.rows.resize(static_cast<size_t>(kr_.mr * D_ + 16));
    w.cand.resize(static_cast<size_t>(tile_rows * cstride_));
    w.ncand.assign(static_cast<size_t>(tile_rows), 0);
    w.sort_tmp.resize(static_cast<size_t>(std::max<int64_t>(cap_, k_)));
    w.tmp.resize(static_cast<size_t>(k_ + cstride_));
  }

  // Packs queries [n0, n0 + m) into w.A (micro-panels of kr.mr rows) and their norms into qn.
  void pack_queries(const gemm::Kernel& kr, Work& w, uint32_t* A, int64_t n0, int64_t m, float* qn) const {
    const int64_t mr = kr.mr;
    const size_t qrow = static_cast<size_t>(D_) * dtype_size(qt_);
    const char* q = static_cast<const char*>(q_);
    for (int64_t i = 0; i * mr < m; ++i) {
      const int64_t r0 = i * mr, mrows = std::min(mr, m - r0);
      for (int64_t r = 0; r < mrows; ++r) {
        float* row = w.rows.data() + r * D_;
        convert_row(q + static_cast<size_t>(n0 + r0 + r) * qrow, qt_, row);
        qn[r0 + r] = metric_ == kL2 ? sqnorm(row) : 0.0f;
      }
      gemm::pack_a_panel(kr, A, D_, i, w.rows.data(), D_, mrows, D_, false);
    }
  }

  void flush(Work& w, const Lists& L, int64_t r) const {
    const int32_t nc = w.ncand[r];
    if (!nc) return;
    uint64_t* c = w.cand.data() + r * cstride_;
    uint64_t* list = L.keys + r * L.stride;
    uint64_t kth = 0;
    L.count[r] = topk::select_keys(list, L.count[r], k_, c, nc, w.tmp.data(), &kth);
    if (L.count[r] == k_) L.thr[r] = topk::from_ordered_bits(static_cast<uint32_t>(kth >> 32));
    w.ncand[r] = 0;
  }

  void push(Work& w, const Lists& L, int64_t r, float d, int64_t idx) const {
    if (!(d < L.thr[r])) return;  // re-checked: a flush may have lowered the threshold
    int32_t& nc = w.ncand[r];
    w.cand[r * cstride_ + nc] = topk::make_key(d + 0.0f, static_cast<uint32_t>(idx));  // +0.0f: no -0
    if (++nc == cap_) flush(w, L, r);
  }

  // Distances of one panel's dot products (cbuf [m][32]) and selection into the candidates.
  void epilogue(Work& w, const Lists& L, const float* qn, const float* bn, int64_t m, int64_t col0) const {
    const int nc = static_cast<int>(std::min<int64_t>(NR, M_ - col0));
    const float* cb = w.cbuf.data();
#ifdef OOD_FAST_X86
    if (avx512_) return epilogue_avx512(w, L, qn, m, col0, nc, cb, bn);
#endif
    for (int64_t r = 0; r < m; ++r) {
      for (int j = 0; j < nc; ++j) {
        const float c = cb[r * NR + j];
        float d;
        if (metric_ == kL2) {
          const float s = qn[r] + bn[j];
          d = s - 2.0f * c;
          d = d < 0.0f ? 0.0f : d;
        } else {
          d = -c;
        }
        push(w, L, r, d, col0 + j);
      }
    }
  }

#ifdef OOD_FAST_X86
  // topk::ordered_bits on 16 lanes.
  OOD_TARGET_AVX512 static __m512i ordered(__m512 d) {
    const __m512i u = _mm512_castps_si512(d);
    const __m512i flip = _mm512_or_si512(_mm512_srai_epi32(u, 31), _mm512_set1_epi32(static_cast<int>(0x80000000u)));
    return _mm512_xor_si512(u, flip);
  }
  OOD_TARGET_AVX512 static int store_keys(uint64_t* dst, __m256i o, __mmask8 h, __m512i idx) {
    // (compress in a register + full store: dst has room for 8 more words past any hit count)
    const __m512i key = _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepu32_epi64(o), 32), idx);
    _mm512_storeu_si512(dst, _mm512_maskz_compress_epi64(h, key));
    return __builtin_popcount(h);
  }
  OOD_TARGET_AVX512 void epilogue_avx512(Work& w, const Lists& L, const float* qn, int64_t m, int64_t col0, int nc,
                                         const float* cb, const float* bn) const {
    const __mmask16 m0 = nc >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << nc) - 1u);
    const __mmask16 m1 = nc >= 32 ? __mmask16(0xffff) : nc > 16 ? static_cast<__mmask16>((1u << (nc - 16)) - 1u) : 0;
    const __m512 b0 = _mm512_loadu_ps(bn), b1 = _mm512_loadu_ps(bn + 16);
    const __m512 neg2 = _mm512_set1_ps(-2.0f), zero = _mm512_setzero_ps();
    const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u)));
    const __m512i base = _mm512_set1_epi64(col0);
    const __m512i i0 = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), i8 = _mm512_add_epi64(i0, _mm512_set1_epi64(8));
    const __m512i i16 = _mm512_add_epi64(i0, _mm512_set1_epi64(16)), i24 = _mm512_add_epi64(i0, _mm512_set1_epi64(24));
    for (int64_t r = 0; r < m; ++r) {
      const __m512 c0 = _mm512_loadu_ps(cb + r * NR), c1 = _mm512_loadu_ps(cb + r * NR + 16);
      __m512 d0, d1;
      if (metric_ == kL2) {
        const __m512 s = _mm512_set1_ps(qn[r]);
        d0 = _mm512_max_ps(zero, _mm512_fmadd_ps(neg2, c0, _mm512_add_ps(s, b0)));
        d1 = _mm512_max_ps(zero, _mm512_fmadd_ps(neg2, c1, _mm512_add_ps(s, b1)));
      } else {
        d0 = _mm512_xor_ps(c0, sign);
        d1 = _mm512_xor_ps(c1, sign);
      }
      const __m512 t = _mm512_set1_ps(L.thr[r]);
      const __mmask16 h0 = _mm512_mask_cmp_ps_mask(m0, d0, t, _CMP_LT_OQ);
      const __mmask16 h1 = _mm512_mask_cmp_ps_mask(m1, d1, t, _CMP_LT_OQ);
      if (!(h0 | h1)) continue;
      // Keys of the hits, compress-stored: (ordered distance bits << 32) | (col0 + j).
      int32_t& ncr = w.ncand[r];
      uint64_t* dst = w.cand.data() + r * cstride_ + ncr;
      const __m512i o0 = ordered(_mm512_add_ps(d0, zero)), o1 = ordered(_mm512_add_ps(d1, zero));
      int n = 0;
      n += store_keys(dst + n, _mm512_castsi512_si256(o0), static_cast<__mmask8>(h0), _mm512_add_epi64(base, i0));
      n += store_keys(dst + n, _mm512_extracti64x4_epi64(o0, 1), static_cast<__mmask8>(h0 >> 8), _mm512_add_epi64(base, i8));
      n += store_keys(dst + n, _mm512_castsi512_si256(o1), static_cast<__mmask8>(h1), _mm512_add_epi64(base, i16));
      n += store_keys(dst + n, _mm512_extracti64x4_epi64(o1, 1), static_cast<__mmask8>(h1 >> 8), _mm512_add_epi64(base, i24));
      ncr += n;
      if (ncr >= cap_) flush(w, L, r);
    }
  }
#endif

  // ---------------------------------------------------------------------------------------
  // Large batches: query tiles (per thread) × shared packed bank chunks
  // ---------------------------------------------------------------------------------------
  void run_query_tiles() {
    const gemm::Kernel& kr = kr_;
    const int64_t mr = kr.mr;
    // Tile rows: the packed query tile (Mt x D fp32) within ~1 MiB of L2, at most 252 rows, and
    // no more than an even share of the batch.
    int64_t nb = (int64_t(1) << 20) / std::max<int64_t>(1, D_ * 4 * mr);
    nb = std::max<int64_t>(1, std::min<int64_t>(nb, 252 / mr));
    const int64_t share = (N_ + nthreads_ - 1) / nthreads_;
    nb = std::max<int64_t>(1, std::min<int64_t>(nb, (share + mr - 1) / mr));
    const int64_t Mt = nb * mr;
    // Query block: packed tiles of up to ~32 MiB; bank chunk: ~4 MiB of packed panels.
    const int64_t tile_words = Mt * D_;
    const int64_t tiles_per_block = std::max<int64_t>(1, (int64_t(32) << 20) / (tile_words * 4));
    const int64_t ntiles_total = (N_ + Mt - 1) / Mt;
    const int64_t tpb = std::min(tiles_per_block, ntiles_total);
    const int64_t panels_total = (M_ + NR - 1) / NR;
    const int64_t panel_words = D_ * NR;
    // (OOD_FAST_KNN_CHUNK_BYTES overrides the chunk size: tests use it to cross chunk boundaries.)
    int64_t chunk_bytes = int64_t(64) << 20;
    if (const char* env = std::getenv("OOD_FAST_KNN_CHUNK_BYTES")) chunk_bytes = std::max<int64_t>(1, std::atoll(env));
    const int64_t chunk_panels =
        std::max<int64_t>(1, std::min<int64_t>(panels_total, chunk_bytes / (panel_words * 4)));
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads_, ntiles_total)));

    gemm::Buffer<uint32_t> Ablock(static_cast<size_t>(tpb * tile_words));
    gemm::Buffer<float> chunk(static_cast<size_t>(chunk_panels * panel_words));
    gemm::Buffer<float> chunk_nrm(static_cast<size_t>(chunk_panels * NR));
    std::vector<float> qn(static_cast<size_t>(tpb * Mt));
    std::vector<int64_t> count(static_cast<size_t>(N_), 0);
    std::vector<float> thr(static_cast<size_t>(N_), kInf);
    std::vector<Work> work(nt);
    for (auto& w : work) alloc_work(w, Mt, false);

#pragma omp parallel num_threads(nt)
    {
      Work& w = work[thread_index()];
      for (int64_t t0 = 0; t0 < ntiles_total; t0 += tpb) {
        const int64_t tiles = std::min(tpb, ntiles_total - t0);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t n0 = (t0 + t) * Mt, m = std::min(Mt, N_ - n0);
          pack_queries(kr, w, Ablock.data() + t * tile_words, n0, m, qn.data() + t * Mt);
        }
        for (int64_t p0 = 0; p0 < panels_total; p0 += chunk_panels) {
          const int64_t np = std::min(chunk_panels, panels_total - p0);
#pragma omp for schedule(static)
          for (int64_t p = 0; p < np; ++p) {
            std::fill(chunk_nrm.data() + p * NR, chunk_nrm.data() + (p + 1) * NR, 0.0f);
            pack_b((p0 + p) * NR, 0, D_, chunk.data() + p * panel_words, chunk_nrm.data() + p * NR);
          }
#pragma omp for schedule(dynamic, 1)
          for (int64_t t = 0; t < tiles; ++t) {
            const int64_t n0 = (t0 + t) * Mt, m = std::min(Mt, N_ - n0);
            const int64_t n_micro = (m + mr - 1) / mr;
            const uint32_t* A = Ablock.data() + t * tile_words;
            Lists L{reinterpret_cast<uint64_t*>(out_i_ + n0 * k_), k_, count.data() + n0, thr.data() + n0};
            for (int64_t p = 0; p < np; ++p) {
              const uint32_t* Bp = reinterpret_cast<const uint32_t*>(chunk.data() + p * panel_words);
              gemm::panel_gemm(kr, A, D_, n_micro, Bp, D_, w.cbuf.data());
              epilogue(w, L, qn.data() + t * Mt, chunk_nrm.data() + p * NR, m, (p0 + p) * NR);
            }
            for (int64_t r = 0; r < m; ++r) flush(w, L, r);
          }
        }
      }
      std::vector<int64_t> scratch;
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N_; ++n) {
        topk::sort_keys_full(reinterpret_cast<uint64_t*>(out_i_ + n * k_), count[n], w.sort_tmp.data());
        topk::decode_keys(out_d_ + n * k_, out_i_ + n * k_, count[n]);
        topk::fill_missing(out_d_ + n * k_, out_i_ + n * k_, count[n], k_, scratch);
      }
    }
  }

  // ---------------------------------------------------------------------------------------
 public:
  // bf16 bank with AMX-BF16: the low-precision pass of the exact search (see knn_bf16_amx).
  // Same structure as run_query_tiles, with the split-query AMX kernel (fp32 queries carried as
  // bf16 hi + lo, the bank's bf16 values exact) and the bank packed straight from its bf16 rows.
  // Leaves the k_ smallest (distance, index) keys of each query unsorted in keys [N][k_], with
  // count[n] of them, and returns the largest squared norm of a bank row.
  // ---------------------------------------------------------------------------------------
  float run_split_lowpass(uint64_t* keys, int64_t* count) {
    float max_nrm = 0.0f;
#ifdef OOD_FAST_X86
    const gemm::Kernel amx = gemm::amx_kernel();  // (for the tile configuration)
    constexpr int64_t mr = 32;
    const int64_t steps = ((D_ + 1) / 2 + 15) / 16 * 16;  // bf16 pairs, whole 16-step tiles
    const int64_t kc = 256;                               // k-steps per B block (32 KiB, in L1)
    const int64_t row_words = 2 * steps;                  // hi + lo words per query row
    int64_t nb = std::max<int64_t>(1, std::min<int64_t>(8, (int64_t(1) << 20) / (mr * row_words * 4)));
    const int64_t share = (N_ + nthreads_ - 1) / nthreads_;
    nb = std::max<int64_t>(1, std::min<int64_t>(nb, (share + mr - 1) / mr));
    const int64_t Mt = nb * mr, tile_words = Mt * row_words;
    const int64_t ntiles_total = (N_ + Mt - 1) / Mt;
    const int64_t tpb = std::min(std::max<int64_t>(1, (int64_t(32) << 20) / (tile_words * 4)), ntiles_total);
    const int64_t panels_total = (M_ + NR - 1) / NR, panel_words = steps * NR;
    int64_t chunk_bytes = int64_t(64) << 20;
    if (const char* env = std::getenv("OOD_FAST_KNN_CHUNK_BYTES")) chunk_bytes = std::max<int64_t>(1, std::atoll(env));
    const int64_t chunk_panels = std::max<int64_t>(1, std::min<int64_t>(panels_total, chunk_bytes / (panel_words * 4)));
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads_, ntiles_total)));

    gemm::Buffer<uint32_t> Ablock(static_cast<size_t>(tpb * tile_words));
    gemm::Buffer<uint32_t> chunk(static_cast<size_t>(chunk_panels * panel_words));
    gemm::Buffer<float> chunk_nrm(static_cast<size_t>(chunk_panels * NR));
    std::vector<float> qn(static_cast<size_t>(tpb * Mt), 0.0f);
    std::vector<float> thr(static_cast<size_t>(N_), kInf);
    std::vector<float> tmax(static_cast<size_t>(nt), 0.0f);
    std::vector<Work> work(nt);
    for (auto& w : work) {
      alloc_work(w, Mt, false);
      w.rows.resize(static_cast<size_t>(mr * D_ + 16));
    }
    const uint16_t* bank = reinterpret_cast<const uint16_t*>(bank_);
    const char* q = static_cast<const char*>(q_);
    const size_t qrow = static_cast<size_t>(D_) * dtype_size(qt_);

#pragma omp parallel num_threads(nt)
    {
      const int tid = thread_index();
      Work& w = work[tid];
      const gemm::AmxScope scope(amx);
      for (int64_t t0 = 0; t0 < ntiles_total; t0 += tpb) {
        const int64_t tiles = std::min(tpb, ntiles_total - t0);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t n0 = (t0 + t) * Mt, m = std::min(Mt, N_ - n0);
          for (int64_t i = 0; i * mr < m; ++i) {
            const int64_t r0 = i * mr, mrows = std::min(mr, m - r0);
            for (int64_t r = 0; r < mrows; ++r) {
              float* row = w.rows.data() + r * D_;
              convert_row_avx512(q + static_cast<size_t>(n0 + r0 + r) * qrow, qt_, D_, row);
              qn[t * Mt + r0 + r] = metric_ == kL2 ? sqnorm_avx512(row, D_) : 0.0f;
            }
            gemm::pack_a_panel_amx_split(Ablock.data() + t * tile_words + i * mr * row_words, w.rows.data(), D_, mrows,
                                         D_, steps);
          }
        }
        for (int64_t p0 = 0; p0 < panels_total; p0 += chunk_panels) {
          const int64_t np = std::min(chunk_panels, panels_total - p0);
#pragma omp for schedule(static)
          for (int64_t p = 0; p < np; ++p) {
            const int64_t r0 = (p0 + p) * NR, nv = std::min<int64_t>(NR, M_ - r0);
            float* nrm = chunk_nrm.data() + p * NR;
            gemm::pack_b_panel_bf16_rows(bank + r0 * D_, D_, nv, D_, steps, chunk.data() + p * panel_words, nrm);
            for (int j = 0; j < nv; ++j) tmax[tid] = std::max(tmax[tid], nrm[j]);
          }
#pragma omp for schedule(dynamic, 1)
          for (int64_t t = 0; t < tiles; ++t) {
            const int64_t n0 = (t0 + t) * Mt, m = std::min(Mt, N_ - n0);
            const int64_t n_micro = (m + mr - 1) / mr;
            const uint32_t* A = Ablock.data() + t * tile_words;
            Lists L{keys + n0 * k_, k_, count + n0, thr.data() + n0};
            for (int64_t p = 0; p < np; ++p) {
              const uint32_t* Bp = chunk.data() + p * panel_words;
              for (int64_t s0 = 0; s0 < steps; s0 += kc) {
                const int64_t ks = std::min(kc, steps - s0);
                for (int64_t i = 0; i < n_micro; ++i)
                  gemm::ukr_bf16x2_amx(ks, A + i * mr * row_words + s0 * 2 * mr, Bp + s0 * NR, w.cbuf.data() + i * mr * NR,
                                       s0 > 0);
              }
              epilogue(w, L, qn.data() + t * Mt, chunk_nrm.data() + p * NR, m, (p0 + p) * NR);
            }
            for (int64_t r = 0; r < m; ++r) flush(w, L, r);
          }
        }
      }
    }
    for (float v : tmax) max_nrm = std::max(max_nrm, v);
#else
    (void)keys;
    (void)count;
#endif
    return max_nrm;
  }

 private:
  // ---------------------------------------------------------------------------------------
  // Small batches: the bank split between threads, private lists, merged at the end
  // ---------------------------------------------------------------------------------------
  void run_bank_split() {
    gemm::Kernel kr = kr_;
#ifdef OOD_FAST_X86
    if (avx512_ && N_ <= 14) {
      kr.mr = static_cast<int>(N_);
      kr.ukr = ukr_f32_rows(kr.mr);
    }
#endif
    const int64_t mr = kr.mr;
    const int64_t n_micro = (N_ + mr - 1) / mr;
    const int64_t rows = n_micro * mr;
    const int64_t panels_total = (M_ + NR - 1) / NR;
    // Each thread gets a contiguous range of panels; no fewer than ~64 panels per thread.
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads_, panels_total / 64)));
    std::vector<Work> work(nt);
    for (auto& w : work) alloc_work(w, rows, true);
    std::vector<float> qn(static_cast<size_t>(rows), 0.0f);
    pack_queries(kr, work[0], work[0].A.data(), 0, N_, qn.data());
    for (int t = 1; t < nt; ++t) std::copy(work[0].A.data(), work[0].A.data() + rows * D_, work[t].A.data());

    // Thread 0 writes straight into the output; the others into private lists.
    std::vector<std::vector<uint64_t>> pk(nt);
    std::vector<std::vector<int64_t>> pcount(nt);
    std::vector<std::vector<float>> pthr(nt);
    for (int t = 0; t < nt; ++t) {
      if (t > 0) pk[t].resize(static_cast<size_t>(N_ * k_));
      pcount[t].assign(static_cast<size_t>(N_), 0);
      pthr[t].assign(static_cast<size_t>(N_), kInf);
    }
    const int64_t kc = kr.kc;
    const int64_t flush_every = 64;  // panels between flushes

#pragma omp parallel num_threads(nt)
    {
      const int tid = thread_index();
      Work& w = work[tid];
      const int64_t pb = panels_total * tid / nt, pe = panels_total * (tid + 1) / nt;
      Lists L{tid == 0 ? reinterpret_cast<uint64_t*>(out_i_) : pk[tid].data(), k_, pcount[tid].data(),
              pthr[tid].data()};
      const uint32_t* A = w.A.data();
      float* B = w.bbuf.data();
      for (int64_t p = pb; p < pe; ++p) {
        const int64_t r0 = p * NR;
        if (p + 1 < pe) {  // the next panel's rows, into L2 while this one is computed
          const char* nx = bank_ + static_cast<size_t>(r0 + NR) * row_bytes_;
          const size_t bytes = static_cast<size_t>(std::min<int64_t>(NR, M_ - r0 - NR)) * row_bytes_;
          for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(nx + off, 0, 1);
        }
        std::fill(w.nrm, w.nrm + NR, 0.0f);
        for (int64_t s0 = 0; s0 < D_; s0 += kc) {
          const int64_t ks = std::min(kc, D_ - s0);
          pack_b(r0, s0, ks, B, w.nrm);
          for (int64_t i = 0; i < n_micro; ++i)
            kr.ukr(ks, A + i * D_ * mr + s0 * mr, reinterpret_cast<const uint32_t*>(B), w.cbuf.data() + i * mr * NR,
                   s0 > 0);
        }
        epilogue(w, L, qn.data(), w.nrm, N_, r0);
        if ((p - pb + 1) % flush_every == 0)
          for (int64_t r = 0; r < N_; ++r) flush(w, L, r);
      }
      for (int64_t r = 0; r < N_; ++r) {
        flush(w, L, r);
        topk::sort_keys_full(L.keys + r * L.stride, L.count[r], w.sort_tmp.data());
      }
    }
    // Merge the private lists into the output (thread order = index order, but the merge
    // compares (d, index) anyway).
    std::vector<uint64_t> merged(static_cast<size_t>(k_));
    std::vector<int64_t> scratch;
    for (int64_t n = 0; n < N_; ++n) {
      float* od = out_d_ + n * k_;
      int64_t* oi = out_i_ + n * k_;
      uint64_t* ok = reinterpret_cast<uint64_t*>(oi);
      int64_t cnt = pcount[0][n];
      for (int t = 1; t < nt; ++t) {
        cnt = topk::merge_key_lists(ok, cnt, pk[t].data() + n * k_, pcount[t][n], k_, merged.data());
        std::copy(merged.begin(), merged.begin() + cnt, ok);
      }
      topk::decode_keys(od, oi, cnt);
      topk::fill_missing(od, oi, cnt, k_, scratch);
    }
  }

  const void* q_;
  int qt_;
  int64_t N_;
  const char* bank_;
  int bt_;
  int64_t M_, D_, k_;
  int metric_;
  float* out_d_;
  int64_t* out_i_;
  int nthreads_;
  bool avx512_ = false;
  gemm::Kernel kr_;
  int cap_ = 16;
  int64_t cstride_ = 16 + 32;  // cap_ + room for one 32-wide row of hits
  size_t row_bytes_ = 0;
};

// ------------------------------------------------------------------------------------------
// bf16 banks on AMX-BF16 processors: a fast low-precision pass, then a certified exact re-rank
// ------------------------------------------------------------------------------------------
//
// Pass 1 (Search::run_split_lowpass): each fp32 query is split into bf16 hi + lo parts and
// multiplied by the (exact) bf16 bank on AMX tiles, keeping kl = k + margin candidates per query.
// Its dot products c' differ from the fp32 path's c by at most
//   Δc = ‖r‖·B + γ(2D + 64)·(‖hi‖ + ‖lo‖)·B + γ(D)·‖q‖·B + (denormal flushes)
// with r = q − hi − lo (|r_k| <= 2^-16 |q_k|), B the largest bank row norm and γ(n) = nu/(1 − nu),
// u = 2^-24 (fp32 sums of n terms in any order), so a distance moves by δ = 2Δc + 2u(‖q‖ + B)²
// ("l2") or δ = Δc ("ip"). Pass 2, per query: when the largest candidate distance exceeds the k-th
// smallest by more than 2δ, no row outside the candidates can be in the exact top k (its fp32
// distance is above the k-th candidate's); the candidates' distances are then recomputed exactly
// as the fp32 path computes them (one fma chain per (query, row) in k order, same norms, same
// epilogue), so the result equals the fp32 search bit for bit. A query that cannot be certified
// (rare: candidates bunched within 2δ) is searched again by the fp32 path.
// The margin defaults to max(64, k / 2) (OOD_FAST_KNN_MARGIN overrides it, for tests); at the
// 50k × 512 benchmark shape, k = 50 needs ~65 candidates on median for a 2δ window.
// OOD_FAST_KNN_BF16_PASS=0 turns the path off; OOD_FAST_KNN_BF16_BLOCK sets its query block (tests).

#ifdef OOD_FAST_X86
// Exact fp32 distances of one query (fp32 row q, squared norm qn) to up to 16 bf16 bank rows:
// lane j is one sequential fma chain over k, exactly the fp32 micro-kernel's chain for that pair.
OOD_TARGET_AVX512 void exact_distances16(const float* q, float qn, const uint16_t* const* rows, int nrows, int64_t D,
                                         int metric, float* out) {
  __m512 c = _mm512_setzero_ps(), bn = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < D; k0 += 16) {
    const int kv = static_cast<int>(std::min<int64_t>(16, D - k0));
    const __mmask16 m = static_cast<__mmask16>((1u << kv) - 1u);
    __m512 v[16];
    for (int r = 0; r < 16; ++r) v[r] = r < nrows ? load16(rows[r] + k0, kBF16, m) : _mm512_setzero_ps();
    gemm::transpose16x16(v);
    for (int j = 0; j < kv; ++j) {
      c = _mm512_fmadd_ps(_mm512_set1_ps(q[k0 + j]), v[j], c);
      bn = _mm512_fmadd_ps(v[j], v[j], bn);
    }
  }
  __m512 d;
  if (metric == kL2) {
    d = _mm512_max_ps(_mm512_setzero_ps(), _mm512_fmadd_ps(_mm512_set1_ps(-2.0f), c, _mm512_add_ps(_mm512_set1_ps(qn), bn)));
  } else {
    d = _mm512_xor_ps(c, _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u))));
  }
  _mm512_storeu_ps(out, _mm512_add_ps(d, _mm512_setzero_ps()));
}
#endif

int64_t bf16_pass_margin(int64_t k) {
  if (const char* env = std::getenv("OOD_FAST_KNN_MARGIN")) return std::max<int64_t>(0, std::atoll(env));
  return std::max<int64_t>(64, k / 2);
}

bool bf16_pass_eligible(int bt, int64_t N, int64_t M, int64_t k, bool exact) {
#ifdef OOD_FAST_X86
  const char* env = std::getenv("OOD_FAST_KNN_BF16_PASS");
  if (env && std::string(env) == "0") return false;
  if (bt != kBF16 || N < 64 || k > 512 || !cpu_has_avx512f() || !cpu_has_amx_bf16()) return false;
  return !exact || k + bf16_pass_margin(k) < M;
#else
  (void)bt, (void)N, (void)M, (void)k, (void)exact;
  return false;
#endif
}

void knn_bf16_amx(const void* q, int qt, int64_t N, const char* bank, int bt, int64_t M, int64_t D, int64_t k,
                  int metric, bool exact, float* out_d, int64_t* out_i, int nthreads) {
#ifdef OOD_FAST_X86
  const int64_t kl = exact ? k + bf16_pass_margin(k) : k;
  std::vector<uint64_t> keys(static_cast<size_t>(N * kl));
  std::vector<int64_t> count(static_cast<size_t>(N), 0);
  const float max_bn = Search(q, qt, N, bank, bt, M, D, kl, metric, nullptr, nullptr, nthreads)
                           .run_split_lowpass(keys.data(), count.data());
  const double u = std::ldexp(1.0, -24);
  auto gamma = [u](double n) { return n * u / (1.0 - n * u); };
  const double B = std::sqrt(static_cast<double>(max_bn) * (1.0 + gamma(static_cast<double>(D)))) * (1.0 + 4 * u);
  const uint16_t* bank16 = reinterpret_cast<const uint16_t*>(bank);
  const size_t qrow = static_cast<size_t>(D) * dtype_size(qt);
  std::vector<uint8_t> redo(static_cast<size_t>(N), 0);
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, N)));

#pragma omp parallel num_threads(nt)
  {
    std::vector<float> row(static_cast<size_t>(D));
    std::vector<uint64_t> tmp(static_cast<size_t>(kl));
    const uint16_t* rows[16];
    alignas(64) float d16[16];
#pragma omp for schedule(dynamic, 16)
    for (int64_t n = 0; n < N; ++n) {
      uint64_t* kr = keys.data() + n * kl;
      float* od = out_d + n * k;
      int64_t* oi = out_i + n * k;
      if (count[n] < kl) {  // fewer finite candidates than asked for (non-finite bank rows)
        redo[n] = 1;
        continue;
      }
      if (!exact) {
        topk::sort_keys_full(kr, k, tmp.data());
        for (int64_t j = 0; j < k; ++j) {
          od[j] = topk::from_ordered_bits(static_cast<uint32_t>(kr[j] >> 32));
          oi[j] = static_cast<int64_t>(kr[j] & 0xffffffffu);
        }
        continue;
      }
      convert_row_avx512(static_cast<const char*>(q) + static_cast<size_t>(n) * qrow, qt, D, row.data());
      const float qn = metric == kL2 ? sqnorm_avx512(row.data(), D) : 0.0f;
      double qq = 0, hh = 0, ll = 0, rr = 0;
      for (int64_t j = 0; j < D; ++j) {
        const float v = row[j], hi = gemm::round_bf16(v), lo = gemm::round_bf16(v - hi);
        const double r = static_cast<double>(v - hi) - static_cast<double>(lo);
        qq += double(v) * v, hh += double(hi) * hi, ll += double(lo) * lo, rr += r * r;
      }
      const double qnorm = std::sqrt(qq);
      const double tiny = std::ldexp(3.0 * D + 64 + 2 * std::sqrt(double(D)) * (qnorm + B), -126);
      const double dc = std::sqrt(rr) * B + gamma(2.0 * D + 64) * (std::sqrt(hh) + std::sqrt(ll)) * B +
                        gamma(static_cast<double>(D)) * qnorm * B + tiny;
      const double delta = 1.01 * (metric == kL2 ? 2 * dc + 2 * u * (qnorm + B) * (qnorm + B) : dc);
      std::copy(kr, kr + kl, tmp.begin());
      std::nth_element(tmp.begin(), tmp.begin() + (k - 1), tmp.end());
      const double dk = topk::from_ordered_bits(static_cast<uint32_t>(tmp[k - 1] >> 32));
      const double dl = topk::from_ordered_bits(static_cast<uint32_t>(*std::max_element(kr, kr + kl) >> 32));
      if (!(dl - dk > 2 * delta)) {
        redo[n] = 1;
        continue;
      }
      for (int64_t g = 0; g < kl; g += 16) {
        const int nr = static_cast<int>(std::min<int64_t>(16, kl - g));
        for (int j = 0; j < nr; ++j) rows[j] = bank16 + static_cast<int64_t>(kr[g + j] & 0xffffffffu) * D;
        exact_distances16(row.data(), qn, rows, nr, D, metric, d16);
        for (int j = 0; j < nr; ++j) tmp[g + j] = topk::make_key(d16[j], static_cast<uint32_t>(kr[g + j]));
      }
      std::nth_element(tmp.begin(), tmp.begin() + (k - 1), tmp.end());
      std::sort(tmp.begin(), tmp.begin() + k);
      for (int64_t j = 0; j < k; ++j) {
        od[j] = topk::from_ordered_bits(static_cast<uint32_t>(tmp[j] >> 32));
        oi[j] = static_cast<int64_t>(tmp[j] & 0xffffffffu);
      }
    }
  }
  // Queries the re-rank could not certify: the fp32 path, on their rows upcast to fp32 (exact).
  std::vector<int64_t> todo;
  for (int64_t n = 0; n < N; ++n)
    if (redo[n]) todo.push_back(n);
  if (todo.empty()) return;
  const int64_t nf = static_cast<int64_t>(todo.size());
  std::vector<float> qf(static_cast<size_t>(nf * D));
  for (int64_t i = 0; i < nf; ++i)
    convert_row_avx512(static_cast<const char*>(q) + static_cast<size_t>(todo[i]) * qrow, qt, D, qf.data() + i * D);
  std::vector<float> df(static_cast<size_t>(nf * k));
  std::vector<int64_t> xf(static_cast<size_t>(nf * k));
  Search(qf.data(), kF32, nf, bank, bt, M, D, k, metric, df.data(), xf.data(), nthreads).run();
  for (int64_t i = 0; i < nf; ++i) {
    std::copy(df.begin() + i * k, df.begin() + (i + 1) * k, out_d + todo[i] * k);
    std::copy(xf.begin() + i * k, xf.begin() + (i + 1) * k, out_i + todo[i] * k);
  }
#else
  (void)q, (void)qt, (void)N, (void)bank, (void)bt, (void)M, (void)D, (void)k, (void)metric, (void)exact;
  (void)out_d, (void)out_i, (void)nthreads;
#endif
}

void knn(uintptr_t q_ptr, const std::string& q_dtype, int64_t N, uintptr_t bank_ptr, const std::string& bank_dtype,
         int64_t M, int64_t D, int64_t k, int metric, bool exact, uintptr_t out_d_ptr, uintptr_t out_i_ptr,
         int num_threads) {
  const int qt = parse_dtype(q_dtype, "query");
  const int bt = parse_dtype(bank_dtype, "bank");
  if (N < 0 || M < 1 || D < 1) throw std::invalid_argument("knn: need N >= 0, M >= 1, D >= 1");
  if (k < 1 || k > M) throw std::invalid_argument("knn: need 1 <= k <= M");
  if (metric != kL2 && metric != kIP) throw std::invalid_argument("knn: metric must be 0 (l2) or 1 (ip)");
  if (M > int64_t(0xffffffff)) throw std::invalid_argument("knn: banks of more than 2^32 - 1 rows are not supported");
  if (N == 0) return;
  if (!q_ptr || !bank_ptr || !out_d_ptr || !out_i_ptr) throw std::invalid_argument("knn: null pointer");
  const void* q = reinterpret_cast<const void*>(q_ptr);
  const char* bank = reinterpret_cast<const char*>(bank_ptr);
  float* out_d = reinterpret_cast<float*>(out_d_ptr);
  int64_t* out_i = reinterpret_cast<int64_t*>(out_i_ptr);
  if (!bf16_pass_eligible(bt, N, M, k, exact)) return Search(q, qt, N, bank, bt, M, D, k, metric, out_d, out_i, num_threads).run();
  // The bf16 pass keeps k + margin candidate keys per query until its re-rank: in blocks of
  // queries, so that buffer stays within ~256 MiB whatever the batch (a short last block, too
  // small for the pass, takes the fp32 path; results are identical either way).
  const int64_t kl = exact ? k + bf16_pass_margin(k) : k;
  int64_t block = (int64_t(256) << 20) / (kl * 8);
  if (const char* env = std::getenv("OOD_FAST_KNN_BF16_BLOCK")) block = std::atoll(env);  // tests
  block = std::max<int64_t>(64, block);
  const size_t qrow = static_cast<size_t>(D) * dtype_size(qt);
  for (int64_t q0 = 0; q0 < N; q0 += block) {
    const int64_t nb = std::min(block, N - q0);
    const void* qb = static_cast<const char*>(q) + static_cast<size_t>(q0) * qrow;
    if (bf16_pass_eligible(bt, nb, M, k, exact))
      knn_bf16_amx(qb, qt, nb, bank, bt, M, D, k, metric, exact, out_d + q0 * k, out_i + q0 * k, num_threads);
    else
      Search(qb, qt, nb, bank, bt, M, D, k, metric, out_d + q0 * k, out_i + q0 * k, num_threads).run();
  }
}

}  // namespace
}  // namespace ood_fast

void bind_knn(py::module_& m) {
  m.def("knn", &ood_fast::knn, py::arg("q_ptr"), py::arg("q_dtype"), py::arg("N"), py::arg("bank_ptr"),
        py::arg("bank_dtype"), py::arg("M"), py::arg("D"), py::arg("k"), py::arg("metric"), py::arg("exact"),
        py::arg("out_d_ptr"), py::arg("out_i_ptr"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
        "Exact k nearest bank rows of each query (see csrc/cpu/knn.cpp). queries [N, D], bank [M, D] "
        "(f32|f16|bf16, contiguous); metric 0: squared l2, 1: negated inner product; out_d [N, k] float32, "
        "out_i [N, k] int64, ascending, ties by lower index.");
}
