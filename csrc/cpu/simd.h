// Runtime instruction-set detection. Kernels are compiled per ISA with function-level target
// attributes and picked at run time, so one binary runs on any x86-64 (never -march=native).
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ood_fast {

#if defined(__x86_64__) || defined(__i386__)
inline bool cpu_has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
inline bool cpu_has_avx512f() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
inline bool cpu_has_avx512bf16() { return cpu_has_avx512f() && __builtin_cpu_supports("avx512bf16"); }
inline bool cpu_has_avx512vnni() { return cpu_has_avx512f() && __builtin_cpu_supports("avx512vnni"); }
// AMX-BF16 usable by this process: CPUID.(7,0):EDX bits 22 (amx-bf16) and 24 (amx-tile), the OS
// enabling tile state in XCR0 (bits 17, 18), and Linux granting this process the tile data
// feature (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). Checked once; any failure: false.
inline bool cpu_has_amx_bf16() {
#if defined(__linux__) && defined(__x86_64__)
  static const bool ok = [] {
    if (!cpu_has_avx512bf16()) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;
    unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
    if (!__get_cpuid(1, &a1, &b1, &c1, &d1) || !((c1 >> 27) & 1u)) return false;  // OSXSAVE
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if (((lo >> 17) & 3u) != 3u) return false;  // XTILECFG, XTILEDATA enabled by the OS
    // ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 (idempotent; 0 on success).
    if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return false;
    return true;
  }();
  return ok;
#else
  return false;
#endif
}
#else
inline bool cpu_has_avx2() { return false; }
inline bool cpu_has_avx512f() { return false; }
inline bool cpu_has_avx512bf16() { return false; }
inline bool cpu_has_avx512vnni() { return false; }
inline bool cpu_has_amx_bf16() { return false; }
#endif

}  // namespace ood_fast
