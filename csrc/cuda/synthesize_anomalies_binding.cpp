// CUDA entry point of synthesize_anomalies: checks -> device guard -> allocate -> early
// return on empty -> contiguous -> dispatch -> launch on the current stream -> launch check.
#include <torch/library.h>

#include "binding_utils.h"
#include "checks.h"

namespace medad_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> synthesize_anomalies_cuda(
    const at::Tensor& images, const at::Tensor& sources, const at::Tensor& angles, const at::Tensor& res,
    const c10::optional<at::Tensor>& rotation, const at::Tensor& beta, const at::Tensor& anomalous,
    double threshold, double roi_threshold) {
  check_synthesis_inputs(images, sources, angles, res, rotation, beta, anomalous);
  const int64_t batch = images.size(0), height = images.size(2), width = images.size(3);
  const c10::cuda::CUDAGuard device_guard(images.device());
  auto augmented = at::empty(images.sizes(), images.options());
  auto mask = at::empty(images.sizes(), images.options());
  if (images.numel() == 0) return {augmented, mask};
  const auto images_c = images.contiguous();
  const auto sources_c = sources.contiguous();
  const auto beta_c = beta.contiguous();
  const auto anomalous_c = anomalous.contiguous();
  const LatticeTables tables(angles, res, rotation);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(images.scalar_type(), "synthesize_anomalies_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_synthesize_anomalies<scalar_t>(
        lattice_args<scalar_t>(tables), images_c.data_ptr<scalar_t>(), sources_c.data_ptr<scalar_t>(),
        beta_c.data_ptr<scalar_t>(), anomalous_c.data_ptr<bool>(), static_cast<scalar_t>(threshold),
        static_cast<scalar_t>(roi_threshold), batch, height, width, augmented.data_ptr<scalar_t>(),
        mask.data_ptr<scalar_t>(), stream));
  });
  return {augmented, mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(medad_fast, CUDA, m) { m.impl("synthesize_anomalies", &synthesize_anomalies_cuda); }

}  // namespace medad_fast
