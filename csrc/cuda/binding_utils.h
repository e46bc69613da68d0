// Helpers of the CUDA bindings (host side, sees torch): the storage type a launcher
// takes for each torch scalar type, and the Perlin lattice tables of a batch.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "lattice_tables.h"
#include "launchers.h"

namespace medad_fast {

template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
typename CudaType<scalar_t>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename CudaType<scalar_t>::type*>(t.data_ptr<scalar_t>());
}

// The device-side view of the lattice tables for the launchers.
template <typename T>
cuda::LatticeArgs<T> lattice_args(const LatticeTables& tables) {
  return {tables.grad_cos.data_ptr<T>(), tables.grad_sin.data_ptr<T>(), tables.grad_cos.size(1),
          tables.grad_cos.size(2), tables.res.data_ptr<int64_t>(),
          tables.rotate() ? tables.rot_cos.data_ptr<T>() : nullptr,
          tables.rotate() ? tables.rot_sin.data_ptr<T>() : nullptr};
}

}  // namespace medad_fast
