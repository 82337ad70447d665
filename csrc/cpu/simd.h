// Runtime instruction-set detection. Kernels are compiled per ISA with function-level target
// attributes and picked at run time, so one binary runs on any x86-64 (never -march=native).
#pragma once

namespace ood_fast {

#if defined(__x86_64__) || defined(__i386__)
inline bool cpu_has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
inline bool cpu_has_avx512f() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
inline bool cpu_has_avx512bf16() { return cpu_has_avx512f() && __builtin_cpu_supports("avx512bf16"); }
inline bool cpu_has_avx512vnni() { return cpu_has_avx512f() && __builtin_cpu_supports("avx512vnni"); }
#else
inline bool cpu_has_avx2() { return false; }
inline bool cpu_has_avx512f() { return false; }
inline bool cpu_has_avx512bf16() { return false; }
inline bool cpu_has_avx512vnni() { return false; }
#endif

}  // namespace ood_fast
