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

MEDAD_HOST_DEVICE inline float floor_of(float x) { return floorf(x); }
MEDAD_HOST_DEVICE inline double floor_of(double x) { return floor(x); }

MEDAD_HOST_DEVICE inline int64_t clamp_index(int64_t i, int64_t lo, int64_t hi) {
  return i < lo ? lo : (i > hi ? hi : i);
}

}  // namespace medad_fast
