// CUDA entry point of perlin_noise: checks -> device guard -> allocate -> early return on
// empty -> contiguous -> dispatch -> launch on the current stream -> launch check.
#include <torch/library.h>

#include "binding_utils.h"
#include "checks.h"

namespace medad_fast {
namespace {

at::Tensor perlin_noise_cuda(const at::Tensor& angles, const at::Tensor& res, int64_t height, int64_t width,
                             const c10::optional<at::Tensor>& rotation) {
  check_perlin_inputs(angles, res, height, width, rotation);
  const int64_t batch = angles.size(0);
  const c10::cuda::CUDAGuard device_guard(angles.device());
  auto out = at::empty({batch, height, width}, angles.options());
  if (out.numel() == 0) return out;
  const LatticeTables tables(angles, res, rotation);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(angles.scalar_type(), "perlin_noise_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_perlin_noise<scalar_t>(lattice_args<scalar_t>(tables), batch, height, width,
                                                       out.data_ptr<scalar_t>(), stream));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(medad_fast, CUDA, m) { m.impl("perlin_noise", &perlin_noise_cuda); }

}  // namespace medad_fast
