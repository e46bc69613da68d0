// One output row of the (rotated) Perlin field on the CPU, arranged so the compiler
// vectorises it. The values are those of perlin_pixel() in medad_fast/perlin.h, bit for bit:
// the same expressions per pixel, only the control flow moves out of the inner loop.
//
// Along an output row the pre-image moves on a straight line, so
//  * each of the four "inside the field" half-plane tests is monotone in j: the pixels
//    whose pre-image lies in the field form one interval [begin, end) of the row, found
//    with the exact per-pixel test by bisection (4 x log2(W) tests per row);
//  * the lattice cell (floor of the lattice coordinate, clamped) is monotone in j: the row
//    splits into runs of pixels in one cell. Within a run the cell's four gradients are
//    loop constants, so the inner loop has no gathers, no comparisons and no branches;
//  * the lattice coordinates are monotone in j too: the pixels whose coordinates lie in
//    the lattice [0, r] form one interval of [begin, end). The rest, a prefix and/or a
//    suffix, is the half-pixel border where lattice_coordinate() clamps: in about a third
//    of the rotated rows, a pixel or two, found by galloping from the row's ends and
//    evaluated one by one with perlin_at(). The runs, and so the inner loop, only ever
//    see pixels inside the lattice, where the clamp is the identity.
#pragma once

#include <algorithm>
#include <cstdint>

#include "medad_fast/perlin.h"

// The per-pixel helpers must inline into the run loop whatever the compiler's size budget
// for the translation unit; the rare border path must not inflate perlin_row.
#if defined(_MSC_VER)
#define MEDAD_ALWAYS_INLINE __forceinline
#define MEDAD_NOINLINE __declspec(noinline)
#else
#define MEDAD_ALWAYS_INLINE inline __attribute__((always_inline))
#define MEDAD_NOINLINE __attribute__((noinline))
#endif

namespace medad_fast {

template <typename T>
struct PerlinRow {
  const PerlinLattice<T>& lattice;
  T c, s, height, width;  // rotation (1, 0 without) and image size
  int64_t i;              // output row

  // pre-image (y, x) of pixel (i, j): the arithmetic of perlin_pixel / rotate_into_field
  MEDAD_ALWAYS_INLINE bool preimage(int64_t j, T& y, T& x) const {
    return rotate_into_field(static_cast<T>(i), static_cast<T>(j), (height - T(1)) / T(2), (width - T(1)) / T(2),
                             c, s, height, width, y, x);
  }

  int cell_y(int64_t j) const {
    T y, x;
    preimage(j, y, x);
    return clamp_index(floor_to_int(y * lattice.scale_y), 0, lattice.ry - 1);
  }

  int cell_x(int64_t j) const {
    T y, x;
    preimage(j, y, x);
    return clamp_index(floor_to_int(x * lattice.scale_x), 0, lattice.rx - 1);
  }

  // unclamped lattice coordinates of pixel j
  T u_of(int64_t j) const {
    T y, x;
    preimage(j, y, x);
    return y * lattice.scale_y;
  }

  T v_of(int64_t j) const {
    T y, x;
    preimage(j, y, x);
    return x * lattice.scale_x;
  }

  // whether the pre-image (y, x) lies in the lattice [0, ry] x [0, rx], where
  // lattice_coordinate() leaves it as it is
  bool in_lattice(T y, T x) const {
    const T u = y * lattice.scale_y, v = x * lattice.scale_x;
    return u >= T(0) && u <= static_cast<T>(lattice.ry) && v >= T(0) && v <= static_cast<T>(lattice.rx);
  }

  // noise of pixel j, whose pre-image lies in the field: perlin_pixel() without the field test
  T pixel(int64_t j) const {
    T y, x;
    preimage(j, y, x);
    return perlin_at(lattice, y, x);
  }
};

// Narrows [begin, end) of a row of `width` pixels to where `holds(j)` is true, for a test
// that is monotone along the row (true on a prefix, a suffix, everywhere or nowhere).
template <typename Test>
inline void narrow_to_monotone_run(int64_t width, const Test& holds, int64_t& begin, int64_t& end) {
  const bool first = holds(0), last = holds(width - 1);
  if (first == last) {
    if (!first) begin = end = 0;
    return;
  }
  int64_t a = 0, b = width - 1;  // holds(a) == first, holds(b) == last
  while (b - a > 1) {
    const int64_t m = a + (b - a) / 2;
    (holds(m) == first ? a : b) = m;
  }
  if (first) {
    end = std::min(end, b);  // true on [0, b)
  } else {
    begin = std::max(begin, b);  // true on [b, width)
  }
}

// For a test monotone along the row that fails at pixel `from` and holds at pixel `to`: the
// pixel nearest to `from` where it holds, galloping from `from` (1, 2, 4, ... pixels, then
// bisection), so a border of k pixels costs about 2 log2(k + 1) tests.
template <typename Test>
inline int64_t nearest_holding(int64_t from, int64_t to, const Test& holds) {
  const int64_t dir = to > from ? 1 : -1;
  int64_t a = from, b = to;  // holds(a) false, holds(b) true
  for (int64_t step = 1; step < (b - a) * dir; step *= 2) {
    const int64_t m = a + dir * step;
    if (holds(m)) {
      b = m;
      break;
    }
    a = m;
  }
  while ((b - a) * dir > 1) {
    const int64_t m = a + (b - a) / 2;
    (holds(m) ? b : a) = m;
  }
  return b;
}

struct PixelSpan {
  int64_t begin, end;
};

// For a row whose pixels [begin, end) lie in the field and whose first or last pixel lies
// outside the lattice: noise of the border pixels outside the lattice (a prefix and/or a
// suffix, clamped by perlin_at()), and the span of those inside, left for the runs. Out of
// line, so that perlin_row's hot code stays as compact as without the border.
template <typename T>
MEDAD_NOINLINE PixelSpan perlin_border(const PerlinRow<T>& row, int64_t begin, int64_t end, T* __restrict noise) {
  const T ry = static_cast<T>(row.lattice.ry), rx = static_cast<T>(row.lattice.rx);
  const T u0 = row.u_of(begin), v0 = row.v_of(begin), u1 = row.u_of(end - 1), v1 = row.v_of(end - 1);
  int64_t in_begin = begin, in_end = end;
  bool none_inside = false;
  auto cut = [&](bool first, bool last, auto holds) {
    if (first == last) {
      none_inside = none_inside || !first;
    } else if (first) {
      in_end = std::min(in_end, nearest_holding(end - 1, begin, holds) + 1);
    } else {
      in_begin = std::max(in_begin, nearest_holding(begin, end - 1, holds));
    }
  };
  cut(u0 >= T(0), u1 >= T(0), [&](int64_t j) { return row.u_of(j) >= T(0); });
  cut(u0 <= ry, u1 <= ry, [&](int64_t j) { return row.u_of(j) <= ry; });
  cut(v0 >= T(0), v1 >= T(0), [&](int64_t j) { return row.v_of(j) >= T(0); });
  cut(v0 <= rx, v1 <= rx, [&](int64_t j) { return row.v_of(j) <= rx; });
  if (none_inside || in_end < in_begin) in_end = in_begin;  // no pixel inside: all border
  for (int64_t j = begin; j < in_begin; ++j) noise[j] = row.pixel(j);
  for (int64_t j = in_end; j < end; ++j) noise[j] = row.pixel(j);
  return {in_begin, in_end};
}

// Noise of pixels [j0, j1) of the row, all in lattice cell (ky, kx).
template <typename T>
inline void perlin_cell_run(const PerlinRow<T>& row, int ky, int kx, int64_t j0, int64_t j1, T* __restrict noise) {
  const PerlinLattice<T>& lattice = row.lattice;
  const int k00 = ky * lattice.stride + kx, k10 = k00 + lattice.stride;
  const T c00 = lattice.grad_cos[k00], s00 = lattice.grad_sin[k00];
  const T c10 = lattice.grad_cos[k10], s10 = lattice.grad_sin[k10];
  const T c01 = lattice.grad_cos[k00 + 1], s01 = lattice.grad_sin[k00 + 1];
  const T c11 = lattice.grad_cos[k10 + 1], s11 = lattice.grad_sin[k10 + 1];
  const T cell_y = static_cast<T>(ky), cell_x = static_cast<T>(kx);
  const T scale_y = lattice.scale_y, scale_x = lattice.scale_x;
  const T cy = (row.height - T(1)) / T(2), cx = (row.width - T(1)) / T(2);
  const T dy = static_cast<T>(row.i) - cy, c = row.c, s = row.s;
  // 32-bit index: int32 -> float converts in SIMD registers, int64 -> float does not (SSE2/AVX2)
  for (int32_t j = static_cast<int32_t>(j0); j < static_cast<int32_t>(j1); ++j) {
    const T dx = static_cast<T>(j) - cx;
    const T y = cy + (c * dy - s * dx);
    const T x = cx + (s * dy + c * dx);
    const T ty = y * scale_y - cell_y;
    const T tx = x * scale_x - cell_x;
    const T n00 = c00 * ty + s00 * tx;
    const T n10 = c10 * (ty - T(1)) + s10 * tx;
    const T n01 = c01 * ty + s01 * (tx - T(1));
    const T n11 = c11 * (ty - T(1)) + s11 * (tx - T(1));
    const T fy = perlin_fade(ty);
    const T fx = perlin_fade(tx);
    noise[j] = T(1.4142135623730951) * lerp(lerp(n00, n10, fy), lerp(n01, n11, fy), fx);
  }
}

// noise[0, width) of output row i of one sample: perlin_pixel(lattice, i, j, c, s, H, W) for every j.
template <typename T>
inline void perlin_row(const PerlinLattice<T>& lattice, int64_t i, int64_t width, T c, T s, T height_f, T width_f,
                       T* __restrict noise) {
  const PerlinRow<T> row{lattice, c, s, height_f, width_f, i};
  int64_t begin = 0, end = width;
  const T lo = T(-0.5), y_hi = height_f - T(0.5), x_hi = width_f - T(0.5);
  auto y_of = [&](int64_t j) { T y, x; row.preimage(j, y, x); return y; };
  auto x_of = [&](int64_t j) { T y, x; row.preimage(j, y, x); return x; };
  narrow_to_monotone_run(width, [&](int64_t j) { return y_of(j) >= lo; }, begin, end);
  narrow_to_monotone_run(width, [&](int64_t j) { return y_of(j) <= y_hi; }, begin, end);
  narrow_to_monotone_run(width, [&](int64_t j) { return x_of(j) >= lo; }, begin, end);
  narrow_to_monotone_run(width, [&](int64_t j) { return x_of(j) <= x_hi; }, begin, end);
  if (end < begin) end = begin;
  std::fill(noise, noise + begin, T(0));
  std::fill(noise + end, noise + width, T(0));
  // the half-pixel border, if the row reaches it: evaluated out of line (a third of the
  // rotated rows, none without rotation); the runs below get the pixels inside the lattice
  if (end > begin) {
    T y0, x0, y1, x1;
    row.preimage(begin, y0, x0);
    row.preimage(end - 1, y1, x1);
    if (!(row.in_lattice(y0, x0) && row.in_lattice(y1, x1))) {
      const PixelSpan inside = perlin_border(row, begin, end, noise);
      begin = inside.begin;
      end = inside.end;
    }
  }
  // slope of the lattice coordinates along the row (for the guess of where a run ends)
  const T du = -s * lattice.scale_y, dv = c * lattice.scale_x;
  int64_t j = begin;
  while (j < end) {
    const int ky = row.cell_y(j), kx = row.cell_x(j);
    // guess the run's end from the line, then settle it with the exact per-pixel cells
    T y, x;
    row.preimage(j, y, x);
    const T u = y * lattice.scale_y, v = x * lattice.scale_x;
    T steps = static_cast<T>(end - j);
    if (du > 0 && ky < lattice.ry - 1) steps = std::min(steps, (static_cast<T>(ky + 1) - u) / du);
    if (du < 0 && ky > 0) steps = std::min(steps, (static_cast<T>(ky) - u) / du);
    if (dv > 0 && kx < lattice.rx - 1) steps = std::min(steps, (static_cast<T>(kx + 1) - v) / dv);
    if (dv < 0 && kx > 0) steps = std::min(steps, (static_cast<T>(kx) - v) / dv);
    int64_t stop = std::min<int64_t>(end, j + std::max<int64_t>(1, static_cast<int64_t>(steps)));
    auto same_cell = [&](int64_t k) { return row.cell_y(k) == ky && row.cell_x(k) == kx; };
    while (stop < end && same_cell(stop)) ++stop;
    while (stop > j + 1 && !same_cell(stop - 1)) --stop;
    perlin_cell_run(row, ky, kx, j, stop, noise);
    j = stop;
  }
}

}  // namespace medad_fast
