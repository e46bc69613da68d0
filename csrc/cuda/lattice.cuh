// The per-sample Perlin lattice of a batch on the device, shared by the perlin_noise and
// synthesize_anomalies kernels.
#pragma once

#include "launchers.h"
#include "medad_fast/perlin.h"

namespace medad_fast {
namespace cuda {

// The lattice of sample b; res is clamped to the table so a bad value cannot read out of
// bounds (the Python wrapper reports it before launch).
template <typename T>
__device__ __forceinline__ PerlinLattice<T> sample_lattice(const LatticeArgs<T>& args, int64_t b, int64_t height,
                                                           int64_t width) {
  const int64_t res_y = args.res[2 * b], res_x = args.res[2 * b + 1];
  const int ry = static_cast<int>(res_y < 1 ? 1 : (res_y > args.lattice_h - 1 ? args.lattice_h - 1 : res_y));
  const int rx = static_cast<int>(res_x < 1 ? 1 : (res_x > args.lattice_w - 1 ? args.lattice_w - 1 : res_x));
  const int64_t plane = args.lattice_h * args.lattice_w;
  return {args.grad_cos + b * plane, args.grad_sin + b * plane, static_cast<int>(args.lattice_w), ry, rx,
          static_cast<T>(ry) / static_cast<T>(height), static_cast<T>(rx) / static_cast<T>(width)};
}

// Where flat output index idx of a [B, H, W] batch falls, with its sample's lattice and rotation.
template <typename T>
struct PixelContext {
  int64_t b, i, j;
  PerlinLattice<T> lattice;
  T c, s;  // cos, sin of the rotation (1, 0 without)
};

template <typename T>
__device__ __forceinline__ PixelContext<T> pixel_context(const LatticeArgs<T>& args, int64_t idx, int64_t height,
                                                         int64_t width) {
  PixelContext<T> ctx;
  ctx.j = idx % width;
  ctx.i = (idx / width) % height;
  ctx.b = idx / (width * height);
  ctx.lattice = sample_lattice(args, ctx.b, height, width);
  const bool rotate = args.rot_cos != nullptr;
  ctx.c = rotate ? args.rot_cos[ctx.b] : T(1);
  ctx.s = rotate ? args.rot_sin[ctx.b] : T(0);
  return ctx;
}

}  // namespace cuda
}  // namespace medad_fast
