// Per-sample Perlin set-up shared by the CPU perlin_noise and synthesize_anomalies kernels.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "lattice_tables.h"
#include "medad_fast/perlin.h"

namespace medad_fast {

// Lattice and rotation of one sample, prepared once per call.
template <typename T>
struct SampleSetup {
  PerlinLattice<T> lattice;
  T c, s;  // cos, sin of the rotation (1, 0 without)
};

template <typename T>
inline std::vector<SampleSetup<T>> prepare_samples(const LatticeTables& tables, int64_t height, int64_t width) {
  const int64_t batch = tables.grad_cos.size(0);
  const int64_t plane = tables.grad_cos.size(1) * tables.grad_cos.size(2);
  const auto r = tables.res.accessor<int64_t, 2>();
  std::vector<SampleSetup<T>> samples(batch);
  for (int64_t b = 0; b < batch; ++b) {
    auto& sample = samples[b];
    sample.lattice = {tables.grad_cos.data_ptr<T>() + b * plane, tables.grad_sin.data_ptr<T>() + b * plane,
                      static_cast<int>(tables.grad_cos.size(2)), static_cast<int>(r[b][0]),
                      static_cast<int>(r[b][1]),
                      static_cast<T>(r[b][0]) / static_cast<T>(height),
                      static_cast<T>(r[b][1]) / static_cast<T>(width)};
    sample.c = tables.rotate() ? tables.rot_cos.data_ptr<T>()[b] : T(1);
    sample.s = tables.rotate() ? tables.rot_sin.data_ptr<T>()[b] : T(0);
  }
  return samples;
}

// Grain: about 16k pixels per task, so small images do not pay for threads.
inline int64_t rows_per_task(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

}  // namespace medad_fast
