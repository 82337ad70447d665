// Per-query running top-k for the fused distance + selection kernels (knn.cpp).
//
// A query's result is a list of (distance, index) pairs sorted by (distance, index), at most k
// long, kept as 64-bit keys in the caller's int64 index row during the scan (unsorted: the set of
// the k smallest so far, select_keys) and sorted (sort_keys_full) and decoded into the distance
// and index rows at the end. New rows arrive in candidate buffers (only rows whose distance
// beats the query's threshold, the current k-th distance, are collected); a flush selects the k
// smallest keys of the set and the buffer. The order is the
// total order on (distance, index): among equal distances the lower bank index wins, both for
// position and for membership at the k-th place, so the result does not depend on the order in
// which bank rows were visited or on how the bank was split between threads.
//
// Distances here are never NaN (the kernels drop NaN and +inf rows and restore them, as +inf,
// with fill_missing once the scan is over).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace ood_fast {
namespace topk {

// Candidates and lists as sortable 64-bit keys: the distance's bits mapped to an unsigned integer
// of the same order (high half), the bank row index (low half, so banks of < 2^32 rows). Integer
// order on keys is the (distance, index) order. Distances must not be NaN or -0.0 (the kernels
// add +0.0 first).
inline uint32_t ordered_bits(float d) {
  uint32_t u;
  std::memcpy(&u, &d, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline float from_ordered_bits(uint32_t o) {
  const uint32_t u = (o & 0x80000000u) ? (o & 0x7fffffffu) : ~o;
  float d;
  std::memcpy(&d, &u, 4);
  return d;
}
inline uint64_t make_key(float d, uint32_t index) { return (uint64_t(ordered_bits(d)) << 32) | index; }

// Merges two sorted key lists into out (first k). Returns the count written.
inline int64_t merge_key_lists(const uint64_t* x, int64_t nx, const uint64_t* y, int64_t ny, int64_t k, uint64_t* out) {
  const int64_t total = std::min<int64_t>(k, nx + ny);
  int64_t a = 0, b = 0;
  for (int64_t o = 0; o < total; ++o) {
    const uint64_t av = a < nx ? x[a] : ~uint64_t(0);
    const uint64_t bv = b < ny ? y[b] : ~uint64_t(0);
    const bool tb = bv < av;
    out[o] = tb ? bv : av;
    b += tb;
    a += !tb;
  }
  return total;
}

// Turns a key list stored in the index row into (distance, index) pairs, in place.
inline void decode_keys(float* d, int64_t* i, int64_t count) {
  for (int64_t j = 0; j < count; ++j) {
    const uint64_t key = static_cast<uint64_t>(i[j]);
    d[j] = from_ordered_bits(static_cast<uint32_t>(key >> 32));
    i[j] = static_cast<int64_t>(key & 0xffffffffu);
  }
}

// Sorts keys ascending. Insertion sort for short buffers; otherwise an LSD radix sort on the
// distance half only (8-bit digits, digits every key shares skipped), which is stable, so the
// indices, appended in increasing order, stay increasing among equal distances. tmp: c words.
inline void sort_keys(uint64_t* p, int64_t c, uint64_t* tmp) {
  if (c > 48) {
    uint64_t* src = p;
    uint64_t* dst = tmp;
    for (int shift = 32; shift < 64; shift += 8) {
      uint32_t cnt[256] = {0};
      for (int64_t i = 0; i < c; ++i) ++cnt[(src[i] >> shift) & 255u];
      if (cnt[(src[0] >> shift) & 255u] == static_cast<uint32_t>(c)) continue;
      uint32_t sum = 0;
      for (int v = 0; v < 256; ++v) {
        const uint32_t t = cnt[v];
        cnt[v] = sum;
        sum += t;
      }
      for (int64_t i = 0; i < c; ++i) dst[cnt[(src[i] >> shift) & 255u]++] = src[i];
      std::swap(src, dst);
    }
    if (src != p) std::memcpy(p, src, sizeof(uint64_t) * c);
    return;
  }
  {
    for (int64_t a = 1; a < c; ++a) {
      const uint64_t v = p[a];
      int64_t b = a - 1;
      while (b >= 0 && v < p[b]) {
        p[b + 1] = p[b];
        --b;
      }
      p[b + 1] = v;
    }
  }
}

// Sorts keys in any input order ascending by the full key: the radix sort above orders by the
// distance half; a final insertion pass (linear when only runs of equal distances are out of
// order) puts equal distances in index order. tmp: c words.
inline void sort_keys_full(uint64_t* p, int64_t c, uint64_t* tmp) {
  sort_keys(p, c, tmp);
  if (c <= 48) return;  // insertion sort on whole keys
  for (int64_t a = 0; a + 1 < c;) {  // runs of equal distances: sort by index
    int64_t e = a + 1;
    while (e < c && (p[e] >> 32) == (p[a] >> 32)) ++e;
    if (e - a > 1) std::sort(p + a, p + e);
    a = e;
  }
}

// Keeps the k smallest keys of an unsorted kept set (list, count entries) and nc candidates in
// list (unsorted). tmp: count + nc words. Returns the new count; when it is k, *kth is the k-th
// smallest key (the largest kept). Keys are distinct, so the kept set is exactly defined.
inline int64_t select_keys(uint64_t* list, int64_t count, int64_t k, const uint64_t* c, int64_t nc, uint64_t* tmp,
                           uint64_t* kth) {
  if (nc == 0) return count;
  if (count + nc <= k) {
    std::memcpy(list + count, c, sizeof(uint64_t) * nc);
    count += nc;
    if (count == k) *kth = *std::max_element(list, list + k);
    return count;
  }
  // Radix select: a histogram of the distance halves over [lo, hi] in kNB buckets finds the
  // bucket holding the k-th key; keys of lower buckets are kept as they are, the bucket's keys are
  // resolved with nth_element (few, unless many distances are equal).
  const int64_t n = count + nc;
  std::memcpy(tmp, list, sizeof(uint64_t) * count);
  std::memcpy(tmp + count, c, sizeof(uint64_t) * nc);
  uint32_t lo = ~0u, hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t h = static_cast<uint32_t>(tmp[i] >> 32);
    lo = h < lo ? h : lo;
    hi = h > hi ? h : hi;
  }
  constexpr int kNB = 1024;
  int shift = 0;
  while (((hi - lo) >> shift) >= static_cast<uint32_t>(kNB)) ++shift;
  uint32_t hist[kNB];
  const int nb = static_cast<int>(((hi - lo) >> shift) + 1);
  std::memset(hist, 0, sizeof(uint32_t) * nb);
  for (int64_t i = 0; i < n; ++i) ++hist[(static_cast<uint32_t>(tmp[i] >> 32) - lo) >> shift];
  int64_t below = 0;
  int bk = 0;
  while (below + hist[bk] < static_cast<uint64_t>(k)) below += hist[bk++];
  int64_t nl = 0, ne = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t v = tmp[i];
    const int bv = static_cast<int>((static_cast<uint32_t>(v >> 32) - lo) >> shift);
    list[nl] = v;  // branch-free: nl <= below < k, ne <= i
    nl += bv < bk;
    tmp[ne] = v;
    ne += bv == bk;
  }
  const int64_t need = k - below;
  std::nth_element(tmp, tmp + (need - 1), tmp + ne);
  std::memcpy(list + nl, tmp, sizeof(uint64_t) * need);
  *kth = tmp[need - 1];
  return k;
}

// Completes a list shorter than k (possible only when rows had +inf or NaN distances, which the
// filters drop): appends (+inf, index) for the lowest bank indices not in the list, which is the
// reference's order (NaN counts as +inf; ties by index).
inline void fill_missing(float* ld, int64_t* li, int64_t count, int64_t k, std::vector<int64_t>& scratch) {
  if (count >= k) return;
  scratch.assign(li, li + count);
  std::sort(scratch.begin(), scratch.end());
  int64_t next = 0;
  size_t s = 0;
  for (int64_t o = count; o < k; ++o) {
    while (s < scratch.size() && scratch[s] == next) {
      ++s;
      ++next;
    }
    ld[o] = std::numeric_limits<float>::infinity();
    li[o] = next++;
  }
}

}  // namespace topk
}  // namespace ood_fast
