// Perlin noise at continuous coordinates and the fused synthesis rule (the paper's liver-aware synthesis).
// The formulas mirror medad_fast/reference.py line for line.
#pragma once

#include "medad_fast/macros.h"

namespace medad_fast {

// DRAEM's quintic fade 6t^5 - 15t^4 + 10t^3.
template <typename T>
MEDAD_HOST_DEVICE inline T perlin_fade(T t) {
  return t * t * t * (t * (t * T(6) - T(15)) + T(10));
}

template <typename T>
MEDAD_HOST_DEVICE inline T lerp(T a, T b, T w) {
  return a + w * (b - a);
}

// The lattice of one sample: gradient tables (cos, sin of the node angles) with row
// stride `stride` (= Rx + 1 of the batch tensor), ry x rx cells, and the pixel->lattice
// scales ry / H, rx / W.
template <typename T>
struct PerlinLattice {
  const T* grad_cos;
  const T* grad_sin;
  int stride;  // lattices are small (at most 33 x 33 nodes)
  int ry, rx;
  T scale_y, scale_x;
};

// Lattice coordinate of the pixel coordinate p (scale = r / size), clamped into [0, r].
// The field covers the pixel squares [-0.5, size - 0.5], half a pixel (r / (2 size) cells,
// up to 16 cells at r = 32 on one pixel) beyond the lattice [0, r] at the near edge. The
// quintic fade is only bounded on [0, 1]; evaluated at the edge cell's t < 0 it grows like
// t^5 (|noise| of 20-80 at r = 32 on 17 x 31 pixels). Clamping projects such points onto
// the lattice edge, so the border repeats the edge noise and |noise| <= sqrt(2) everywhere;
// every coordinate already in [0, r] is returned unchanged, bit for bit.
template <typename T>
MEDAD_HOST_DEVICE inline T lattice_coordinate(T p, T scale, int r) {
  const T u = p * scale;
  const T hi = static_cast<T>(r);
  return u < T(0) ? T(0) : (u > hi ? hi : u);
}

// Cell of a lattice coordinate in [0, r]: r itself (the far edge) is in the last cell. The
// clamp also keeps a NaN coordinate's table reads in bounds.
template <typename T>
MEDAD_HOST_DEVICE inline int lattice_cell(T u, int r) {
  return clamp_index(floor_to_int(u), 0, r - 1);
}

// Noise at the continuous pixel coordinate (y, x) of the unrotated field.
template <typename T>
MEDAD_HOST_DEVICE inline T perlin_at(const PerlinLattice<T>& lattice, T y, T x) {
  const T u = lattice_coordinate(y, lattice.scale_y, lattice.ry);
  const T v = lattice_coordinate(x, lattice.scale_x, lattice.rx);
  const int cell_y = lattice_cell(u, lattice.ry);
  const int cell_x = lattice_cell(v, lattice.rx);
  const T ty = u - static_cast<T>(cell_y);
  const T tx = v - static_cast<T>(cell_x);
  const int k00 = cell_y * lattice.stride + cell_x;
  const int k10 = k00 + lattice.stride;
  const T* gc = lattice.grad_cos;
  const T* gs = lattice.grad_sin;
  const T n00 = gc[k00] * ty + gs[k00] * tx;
  const T n10 = gc[k10] * (ty - T(1)) + gs[k10] * tx;
  const T n01 = gc[k00 + 1] * ty + gs[k00 + 1] * (tx - T(1));
  const T n11 = gc[k10 + 1] * (ty - T(1)) + gs[k10 + 1] * (tx - T(1));
  const T fy = perlin_fade(ty);
  const T fx = perlin_fade(tx);
  return T(1.4142135623730951) * lerp(lerp(n00, n10, fy), lerp(n01, n11, fy), fx);
}

// Pre-image (y, x) of output pixel (i, j) when the field is rotated by an angle with
// cosine c and sine s about the centre (cy, cx). False when it falls outside the field
// [-0.5, H-0.5] x [-0.5, W-0.5] (the noise there is 0, as resampling with zero fill gives).
template <typename T>
MEDAD_HOST_DEVICE inline bool rotate_into_field(T i, T j, T cy, T cx, T c, T s, T height, T width,
                                                T& y, T& x) {
  const T dy = i - cy;
  const T dx = j - cx;
  y = cy + (c * dy - s * dx);
  x = cx + (s * dy + c * dx);
  return y >= T(-0.5) && y <= height - T(0.5) && x >= T(-0.5) && x <= width - T(0.5);
}

// Noise of output pixel (i, j) with the field rotated by (c, s) = (cos, sin) of the angle
// (c = 1, s = 0 without rotation: the pre-image is then (i, j) exactly).
template <typename T>
MEDAD_HOST_DEVICE inline T perlin_pixel(const PerlinLattice<T>& lattice, int64_t i, int64_t j, T c, T s, T height,
                                        T width) {
  T y, x;
  const bool inside = rotate_into_field(static_cast<T>(i), static_cast<T>(j), (height - T(1)) / T(2),
                                        (width - T(1)) / T(2), c, s, height, width, y, x);
  return inside ? perlin_at(lattice, y, x) : T(0);
}

// One pixel of the fused synthesis: M = anomalous * [I > roi] * [P > threshold],
// I_a = I + beta M (A - I). The noise is only evaluated where it can matter (inside the
// liver of an anomalous sample: about half the pixels of a liver slice).
template <typename T>
MEDAD_HOST_DEVICE inline void synthesize_pixel(const PerlinLattice<T>& lattice, int64_t i, int64_t j, T c, T s,
                                               T height, T width,
                                               bool anomalous, T image, T source, T beta,
                                               T threshold, T roi_threshold, T& augmented, T& mask) {
  const bool inside =
      anomalous && image > roi_threshold && perlin_pixel(lattice, i, j, c, s, height, width) > threshold;
  mask = inside ? T(1) : T(0);
  augmented = inside ? image + beta * (source - image) : image;
}

}  // namespace medad_fast
