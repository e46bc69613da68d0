// Small device helpers shared by the .cu files: launch geometry and the compute type of
// each storage type (half/bfloat16 compute in float; torch builds with the implicit half
// conversions switched off, so the conversions are spelled out).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace medad_fast {
namespace cuda {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  // grid-stride loops cover the rest; 65535 * 16 blocks is plenty for any device
  return static_cast<unsigned int>(blocks < 1048560 ? (blocks > 0 ? blocks : 1) : 1048560);
}

template <typename T>
struct OpMath {
  using type = T;
};
template <>
struct OpMath<__half> {
  using type = float;
};
template <>
struct OpMath<__nv_bfloat16> {
  using type = float;
};

__device__ __forceinline__ float to_opmath(float x) { return x; }
__device__ __forceinline__ double to_opmath(double x) { return x; }
__device__ __forceinline__ float to_opmath(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_opmath(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_opmath(typename OpMath<T>::type x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_opmath<__half>(float x) {
  return __float2half(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_opmath<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

}  // namespace cuda
}  // namespace medad_fast
