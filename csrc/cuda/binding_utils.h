// Helpers of the CUDA bindings (host side, sees torch): the storage type a launcher
// takes for each torch scalar type, and the Perlin lattice tables of a batch.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

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

// Gradient tables (cos/sin of the node angles) and rotation cos/sin, computed once per
// call by ATen on the device; the tensors are kept alive in this struct.
struct LatticeTables {
  at::Tensor grad_cos, grad_sin, res, rot_cos, rot_sin;

  LatticeTables(const at::Tensor& angles, const at::Tensor& res_in, const c10::optional<at::Tensor>& rotation)
      : grad_cos(angles.cos().contiguous()), grad_sin(angles.sin().contiguous()), res(res_in.contiguous()) {
    if (rotation.has_value()) {
      rot_cos = rotation->cos().contiguous();
      rot_sin = rotation->sin().contiguous();
    }
  }

  template <typename T>
  cuda::LatticeArgs<T> args() const {
    return {grad_cos.data_ptr<T>(), grad_sin.data_ptr<T>(), grad_cos.size(1), grad_cos.size(2),
            res.data_ptr<int64_t>(), rot_cos.defined() ? rot_cos.data_ptr<T>() : nullptr,
            rot_sin.defined() ? rot_sin.data_ptr<T>() : nullptr};
  }
};

}  // namespace medad_fast
