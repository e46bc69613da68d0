// Qualifiers and small math helpers shared by the CPU (.cpp) and CUDA (.cu) kernels,
// so both compile the same formulas and cannot drift apart.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MEDAD_HOST_DEVICE __host__ __device__
#else
#define MEDAD_HOST_DEVICE
#endif

namespace medad_fast {

// floor() as an int from a truncating conversion and a compare (no libm call on
// baseline x86-64, which has no SSE4.1 round instruction); for |x| < 2^31.
template <typename T>
MEDAD_HOST_DEVICE inline int floor_to_int(T x) {
  const int truncated = static_cast<int>(x);
  return truncated - (x < static_cast<T>(truncated) ? 1 : 0);
}

MEDAD_HOST_DEVICE inline int clamp_index(int i, int lo, int hi) { return i < lo ? lo : (i > hi ? hi : i); }


}  // namespace medad_fast
