// CPU kernel of synthesize_anomalies: noise, rotation, threshold, liver mask and blend
// in one pass per pixel, rows in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "huge_pages.h"
#include "lattice.h"
#include "perlin_row.h"

namespace medad_fast {
namespace {

// M = [I > roi] * [P > threshold]; I_a = I + (M beta) (A - I): synthesize_pixel's rule
// written without branches so it vectorises (M = 0 adds an exact zero: I_a == I bit for bit).
template <typename T>
void blend_row(const T* __restrict noise, const T* __restrict image, const T* __restrict source, T beta,
               T threshold, T roi_threshold, int64_t width, T* __restrict augmented, T* __restrict mask) {
  for (int64_t j = 0; j < width; ++j) {
    const T pixel = image[j];
    const T m = (pixel > roi_threshold ? T(1) : T(0)) * (noise[j] > threshold ? T(1) : T(0));
    mask[j] = m;
    augmented[j] = pixel + (m * beta) * (source[j] - pixel);
  }
}

std::tuple<at::Tensor, at::Tensor> synthesize_anomalies_cpu(
    const at::Tensor& images, const at::Tensor& sources, const at::Tensor& angles, const at::Tensor& res,
    const c10::optional<at::Tensor>& rotation, const at::Tensor& beta, const at::Tensor& anomalous,
    double threshold, double roi_threshold) {
  check_synthesis_inputs(images, sources, angles, res, rotation, beta, anomalous);
  const int64_t batch = images.size(0), height = images.size(2), width = images.size(3);
  auto augmented = at::empty(images.sizes(), images.options());
  auto mask = at::empty(images.sizes(), images.options());
  if (images.numel() == 0) return {augmented, mask};
  advise_huge_pages(augmented);
  advise_huge_pages(mask);

  const auto res_c = res.contiguous();
  check_res_values(res_c, angles);
  const auto images_c = images.contiguous();
  const auto sources_c = sources.contiguous();
  const auto beta_c = beta.contiguous();
  const auto anomalous_c = anomalous.contiguous();
  const LatticeTables tables(angles, res_c, rotation);
  AT_DISPATCH_FLOATING_TYPES(images.scalar_type(), "synthesize_anomalies_cpu", [&] {
    const auto samples = prepare_samples<scalar_t>(tables, height, width);
    const scalar_t* img = images_c.data_ptr<scalar_t>();
    const scalar_t* src = sources_c.data_ptr<scalar_t>();
    const scalar_t* beta_ptr = beta_c.data_ptr<scalar_t>();
    const bool* anomalous_ptr = anomalous_c.data_ptr<bool>();
    scalar_t* aug = augmented.data_ptr<scalar_t>();
    scalar_t* msk = mask.data_ptr<scalar_t>();
    const scalar_t H = static_cast<scalar_t>(height), W = static_cast<scalar_t>(width);
    const scalar_t thr = static_cast<scalar_t>(threshold), roi = static_cast<scalar_t>(roi_threshold);
    at::parallel_for(0, batch * height, rows_per_task(width), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> noise(width);  // one row of noise per task
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / height, i = row % height;
        const auto& sample = samples[b];
        const int64_t offset = row * width;
        const scalar_t* image = img + offset;
        // normal sample, or a row with no liver pixel: copy, empty mask
        if (!anomalous_ptr[b] || std::none_of(image, image + width, [&](scalar_t v) { return v > roi; })) {
          std::copy(image, image + width, aug + offset);
          std::fill(msk + offset, msk + offset + width, scalar_t(0));
          continue;
        }
        perlin_row(sample.lattice, i, width, sample.c, sample.s, H, W, noise.data());
        blend_row(noise.data(), image, src + offset, beta_ptr[b], thr, roi, width, aug + offset, msk + offset);
      }
    });
  });
  return {augmented, mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(medad_fast, CPU, m) { m.impl("synthesize_anomalies", &synthesize_anomalies_cpu); }

}  // namespace medad_fast
