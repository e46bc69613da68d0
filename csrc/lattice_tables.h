// The Perlin lattice tables of a batch, computed once per call by ATen on the inputs'
// device: gradient tables (cos/sin of the node angles, so kernels do no transcendental
// math per pixel), res, and the rotation's cos/sin. Shared by the CPU kernels and the
// CUDA bindings; the tensors are kept alive by this struct.
#pragma once

#include <ATen/ATen.h>

namespace medad_fast {

struct LatticeTables {
  at::Tensor grad_cos, grad_sin, res, rot_cos, rot_sin;  // rot_* undefined: no rotation

  LatticeTables(const at::Tensor& angles, const at::Tensor& res_in, const c10::optional<at::Tensor>& rotation)
      : grad_cos(angles.cos().contiguous()), grad_sin(angles.sin().contiguous()), res(res_in.contiguous()) {
    if (rotation.has_value()) {
      rot_cos = rotation->cos().contiguous();
      rot_sin = rotation->sin().contiguous();
    }
  }

  bool rotate() const { return rot_cos.defined(); }
};

}  // namespace medad_fast
