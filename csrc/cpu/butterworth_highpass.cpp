// CPU kernel of butterworth_highpass: rfft2, gain applied in place on the half spectrum
// (computed on the fly: no filter tensor, no fftshift), irfft2.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <complex>

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
  const int64_t rows = spectrum.numel() / half_width;  // (batch * H) rows of the half spectrum
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "butterworth_highpass_cpu", [&] {
    auto* data = reinterpret_cast<std::complex<scalar_t>*>(spectrum.data_ptr<c10::complex<scalar_t>>());
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / half_width), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t u = row % height;
        std::complex<scalar_t>* line = data + row * half_width;
        for (int64_t v = 0; v < half_width; ++v) {
          line[v] *= static_cast<scalar_t>(butterworth_gain_at(u, v, height, d0, order));
        }
      }
    });
  });
  return at::fft_irfft2(spectrum, at::IntArrayRef({height, width}));
}

}  // namespace

TORCH_LIBRARY_IMPL(medad_fast, CPU, m) { m.impl("butterworth_highpass", &butterworth_highpass_cpu); }

}  // namespace medad_fast
