// CPU kernel of perlin_noise: one pass per pixel, rows in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "huge_pages.h"
#include "lattice.h"
#include "perlin_row.h"

namespace medad_fast {
namespace {

at::Tensor perlin_noise_cpu(const at::Tensor& angles, const at::Tensor& res, int64_t height, int64_t width,
                            const c10::optional<at::Tensor>& rotation) {
  check_perlin_inputs(angles, res, height, width, rotation);
  const int64_t batch = angles.size(0);
  auto out = at::empty({batch, height, width}, angles.options());
  if (out.numel() == 0) return out;
  advise_huge_pages(out);
  const auto res_c = res.contiguous();
  check_res_values(res_c, angles);
  const LatticeTables tables(angles, res_c, rotation);
  AT_DISPATCH_FLOATING_TYPES(angles.scalar_type(), "perlin_noise_cpu", [&] {
    const auto samples = prepare_samples<scalar_t>(tables, height, width);
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const scalar_t H = static_cast<scalar_t>(height), W = static_cast<scalar_t>(width);
    at::parallel_for(0, batch * height, rows_per_task(width), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const auto& sample = samples[row / height];
        const int64_t i = row % height;
        perlin_row(sample.lattice, i, width, sample.c, sample.s, H, W, out_ptr + row * width);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(medad_fast, CPU, m) { m.impl("perlin_noise", &perlin_noise_cpu); }

}  // namespace medad_fast
