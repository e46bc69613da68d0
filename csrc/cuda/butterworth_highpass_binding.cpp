// CUDA entry point of butterworth_highpass: checks -> device guard -> early return on empty
// -> contiguous -> rfft2 (cuFFT) -> gain kernel on the current stream -> launch check -> irfft2.
#include <torch/library.h>

#include "binding_utils.h"
#include "checks.h"

namespace medad_fast {
namespace {

at::Tensor butterworth_highpass_cuda(const at::Tensor& x, double d0, int64_t order) {
  check_butterworth_inputs(x, d0, order);
  const c10::cuda::CUDAGuard device_guard(x.device());
  if (x.numel() == 0) return at::empty(x.sizes(), x.options());
  const int64_t height = x.size(-2), width = x.size(-1);
  auto spectrum = at::fft_rfft2(x.contiguous());
  const int64_t half_width = spectrum.size(-1);
  const int64_t rows = spectrum.numel() / half_width;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "butterworth_highpass_cuda", [&] {
    auto* data = reinterpret_cast<scalar_t*>(spectrum.data_ptr<c10::complex<scalar_t>>());
    C10_CUDA_CHECK(cuda::launch_butterworth_gain<scalar_t>(data, rows, height, half_width, d0, order, stream));
  });
  return at::fft_irfft2(spectrum, at::IntArrayRef({height, width}));
}

}  // namespace

TORCH_LIBRARY_IMPL(medad_fast, CUDA, m) { m.impl("butterworth_highpass", &butterworth_highpass_cuda); }

}  // namespace medad_fast
