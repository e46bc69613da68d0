// Argument checks shared by the CPU kernels and the CUDA bindings (tensor-level, no kernels),
// and the output layout rules they share.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

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

// Full argument checks of each op, shared by the CPU and CUDA entry points.
inline void check_perlin_inputs(const at::Tensor& angles, const at::Tensor& res, int64_t height, int64_t width,
                                const c10::optional<at::Tensor>& rotation) {
  check_floating(angles, "angles");
  TORCH_CHECK(height >= 1 && width >= 1, "height and width must be >= 1; got ", height, " x ", width);
  check_lattice(angles, res, rotation, angles.dim() == 3 ? angles.size(0) : -1);
}

inline void check_synthesis_inputs(const at::Tensor& images, const at::Tensor& sources, const at::Tensor& angles,
                                   const at::Tensor& res, const c10::optional<at::Tensor>& rotation,
                                   const at::Tensor& beta, const at::Tensor& anomalous) {
  check_floating(images, "images");
  TORCH_CHECK(images.dim() == 4 && images.size(1) == 1, "images must have shape [B, 1, H, W]; got ",
              images.sizes());
  const int64_t batch = images.size(0);
  check_same(sources, images, "sources", "images");
  TORCH_CHECK(sources.sizes() == images.sizes(), "sources must have the shape of images ", images.sizes(),
              "; got ", sources.sizes());
  check_same(angles, images, "angles", "images");
  check_lattice(angles, res, rotation, batch);
  check_same(beta, images, "beta", "images");
  TORCH_CHECK(beta.dim() == 1 && beta.size(0) == batch, "beta must have shape [B=", batch, "]; got ",
              beta.sizes());
  TORCH_CHECK(anomalous.scalar_type() == at::kBool, "anomalous must be bool; got ", anomalous.scalar_type());
  check_same(anomalous, images, "anomalous", "images", /*same_dtype=*/false);
  TORCH_CHECK(anomalous.dim() == 1 && anomalous.size(0) == batch, "anomalous must have shape [B=", batch,
              "]; got ", anomalous.sizes());
}

inline void check_butterworth_inputs(const at::Tensor& x, double d0, int64_t order) {
  check_floating(x, "x");
  TORCH_CHECK(x.dim() >= 2, "x must have at least 2 dims [..., H, W]; got ", x.sizes());
  TORCH_CHECK(d0 > 0 && std::isfinite(d0), "d0 must be a finite number > 0; got ", d0);
  TORCH_CHECK(order >= 1, "order must be >= 1; got ", order);
}

inline void check_alpha(double alpha) {
  TORCH_CHECK(alpha >= 0.0 && alpha <= 1.0, "alpha must be in [0, 1]; got ", alpha);
}

inline void check_skip_merge_inputs(const at::Tensor& encoder, const at::Tensor& decoder, double alpha,
                                    bool allow_half) {
  check_floating(encoder, "encoder", allow_half);
  check_same(decoder, encoder, "decoder", "encoder");
  TORCH_CHECK(encoder.dim() == 4, "encoder must have shape [B, C, H, W]; got ", encoder.sizes());
  TORCH_CHECK(decoder.sizes() == encoder.sizes(), "decoder must have the shape of encoder ", encoder.sizes(),
              "; got ", decoder.sizes());
  check_alpha(alpha);
}

inline void check_skip_merge_grad(const at::Tensor& grad, double alpha, bool allow_half) {
  check_floating(grad, "grad", allow_half);
  TORCH_CHECK(grad.dim() == 4 && grad.size(1) % 2 == 0, "grad must have shape [B, 2C, H, W]; got ", grad.sizes());
  check_alpha(alpha);
}

// Layout of skip_merge's output: channels_last when both inputs are channels_last (by
// suggest_memory_format, the rule torch.cat applies to its inputs, so the reference
// concat(alpha E + (1 - alpha) D, D) has the same layout), NCHW-contiguous otherwise
// (mixed layouts included). The fake kernel in medad_fast/_registrations.py mirrors it.
inline at::MemoryFormat skip_merge_memory_format(const at::Tensor& encoder, const at::Tensor& decoder) {
  return encoder.suggest_memory_format() == at::MemoryFormat::ChannelsLast &&
                 decoder.suggest_memory_format() == at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// Layout of skip_merge_backward's gradients: the layout of the incoming gradient, so a
// channels_last gradient is read and written without a conversion.
inline at::MemoryFormat skip_merge_grad_memory_format(const at::Tensor& grad) {
  return grad.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                        : at::MemoryFormat::Contiguous;
}

}  // namespace medad_fast
