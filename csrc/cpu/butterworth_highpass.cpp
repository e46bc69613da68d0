// CPU kernel of butterworth_highpass: rfft2, gain applied in place on the half spectrum
// (computed on the fly, one row at a time: no filter tensor, no fftshift), irfft2.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <complex>
#include <vector>

#include "checks.h"
#include "medad_fast/butterworth.h"

namespace medad_fast {
namespace {

at::Tensor butterworth_highpass_cpu(const at::Tensor& x, double d0, int64_t order) {
  check_butterworth_inputs(x, d0, order);
  const int64_t height = x.size(-2), width = x.size(-1);
  if (x.numel() == 0) return at::empty(x.sizes(), x.options());

  auto spectrum = at::fft_rfft2(x.contiguous());  // [..., H, W/2+1], contiguous
  const int64_t half_width = spectrum.size(-1);
  const int64_t planes = spectrum.numel() / (height * half_width);
  // The gain depends on the frequency row u, not on the plane: each task computes the gain
  // row of its u once and applies it to row u of every plane.
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "butterworth_highpass_cpu", [&] {
    auto* data = reinterpret_cast<std::complex<scalar_t>*>(spectrum.data_ptr<c10::complex<scalar_t>>());
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(planes * half_width, 1));
    at::parallel_for(0, height, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> gain(half_width);
      for (int64_t u = begin; u < end; ++u) {
        for (int64_t v = 0; v < half_width; ++v) {
          gain[v] = static_cast<scalar_t>(butterworth_gain_at(u, v, height, d0, order));
        }
        for (int64_t p = 0; p < planes; ++p) {
          std::complex<scalar_t>* line = data + (p * height + u) * half_width;
          for (int64_t v = 0; v < half_width; ++v) line[v] *= gain[v];
        }
      }
    });
  });
  return at::fft_irfft2(spectrum, at::IntArrayRef({height, width}));
}

}  // namespace

TORCH_LIBRARY_IMPL(medad_fast, CPU, m) { m.impl("butterworth_highpass", &butterworth_highpass_cpu); }

}  // namespace medad_fast
