// Argument checks shared by the CPU kernels and the CUDA bindings (tensor-level, no kernels).
#pragma once

#include <ATen/ATen.h>

namespace medad_fast {

inline void check_floating(const at::Tensor& t, const char* name, bool allow_half = false) {
  const auto s = t.scalar_type();
  const bool ok = s == at::kFloat || s == at::kDouble ||
                  (allow_half && (s == at::kHalf || s == at::kBFloat16));
  TORCH_CHECK(ok, name, " must be float32 or float64", allow_half ? " (or float16/bfloat16)" : "",
              "; got ", s);
}

inline void check_same(const at::Tensor& t, const at::Tensor& like, const char* name,
                       const char* like_name, bool same_dtype = true) {
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but ", like_name, " is on ",
              like.device());
  TORCH_CHECK(!same_dtype || t.scalar_type() == like.scalar_type(), name, " must have the dtype of ",
              like_name, " (", like.scalar_type(), "); got ", t.scalar_type());
}

// Shape checks of the Perlin lattice tensors against batch size B.
inline void check_lattice(const at::Tensor& angles, const at::Tensor& res,
                          const c10::optional<at::Tensor>& rotation, int64_t batch) {
  TORCH_CHECK(angles.dim() == 3 && angles.size(0) == batch && angles.size(1) >= 2 && angles.size(2) >= 2,
              "angles must have shape [B=", batch, ", Ry+1 >= 2, Rx+1 >= 2]; got ", angles.sizes());
  TORCH_CHECK(res.scalar_type() == at::kLong, "res must be int64; got ", res.scalar_type());
  TORCH_CHECK(res.dim() == 2 && res.size(0) == batch && res.size(1) == 2,
              "res must have shape [B=", batch, ", 2]; got ", res.sizes());
  check_same(res, angles, "res", "angles", /*same_dtype=*/false);
  if (rotation.has_value()) {
    check_same(*rotation, angles, "rotation", "angles");
    TORCH_CHECK(rotation->dim() == 1 && rotation->size(0) == batch,
                "rotation must have shape [B=", batch, "]; got ", rotation->sizes());
  }
}

// Host-side value check of res (CPU tensors only: on CUDA it would synchronise; the
// Python wrapper checks there and the kernel clamps).
inline void check_res_values(const at::Tensor& res_cpu, const at::Tensor& angles) {
  const auto r = res_cpu.accessor<int64_t, 2>();
  for (int64_t b = 0; b < res_cpu.size(0); ++b) {
    TORCH_CHECK(r[b][0] >= 1 && r[b][1] >= 1, "res must be >= 1; got (", r[b][0], ", ", r[b][1],
                ") for sample ", b);
    TORCH_CHECK(r[b][0] + 1 <= angles.size(1) && r[b][1] + 1 <= angles.size(2), "res (", r[b][0], ", ",
                r[b][1], ") of sample ", b, " needs more lattice nodes than angles has: ", angles.sizes());
  }
}

}  // namespace medad_fast
