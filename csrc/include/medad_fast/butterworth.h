// Butterworth high-pass gain on the (wrapped, integer) frequency grid of an rfft2 spectrum.
#pragma once

#include "medad_fast/macros.h"

namespace medad_fast {

// Signed frequency of DFT index u on an axis of length n: u < n/2 -> u, else u - n.
MEDAD_HOST_DEVICE inline int64_t wrapped_frequency(int64_t u, int64_t n) {
  return 2 * u < n ? u : u - n;
}

// H = 1 / (1 + (D0 / D)^(2 order)) with D^2 = distance_sq; H = 0 at D = 0.
// Computed in double whatever the data type: the gain costs nothing next to the FFT.
MEDAD_HOST_DEVICE inline double butterworth_gain(double distance_sq, double d0, int64_t order) {
  if (distance_sq <= 0.0) return 0.0;
  const double ratio = d0 * d0 / distance_sq;
  double power = 1.0;
  for (int64_t k = 0; k < order; ++k) power *= ratio;
  return 1.0 / (1.0 + power);
}

// Gain of rfft2 bin (u, v) of an H x W image (v in [0, W/2]).
MEDAD_HOST_DEVICE inline double butterworth_gain_at(int64_t u, int64_t v, int64_t height, double d0,
                                                    int64_t order) {
  const double fu = static_cast<double>(wrapped_frequency(u, height));
  const double fv = static_cast<double>(v);
  return butterworth_gain(fu * fu + fv * fv, d0, order);
}

}  // namespace medad_fast
