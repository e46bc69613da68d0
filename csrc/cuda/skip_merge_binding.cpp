// CUDA entry points of skip_merge and skip_merge_backward: checks -> device guard ->
// allocate -> early return on empty -> contiguous -> dispatch -> launch on the current
// stream -> launch check. float32/float64/float16/bfloat16.
#include <torch/library.h>

#include "binding_utils.h"
#include "checks.h"

namespace medad_fast {
namespace {

at::Tensor skip_merge_cuda(const at::Tensor& encoder, const at::Tensor& decoder, double alpha) {
  check_skip_merge_inputs(encoder, decoder, alpha, /*allow_half=*/true);
  const c10::cuda::CUDAGuard device_guard(encoder.device());
  const int64_t B = encoder.size(0), C = encoder.size(1), H = encoder.size(2), W = encoder.size(3);
  auto out = at::empty({B, 2 * C, H, W}, encoder.options());
  if (out.numel() == 0) return out;
  const auto e = encoder.contiguous();
  const auto d = decoder.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, encoder.scalar_type(), "skip_merge_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_skip_merge_forward(cuda_ptr<scalar_t>(e), cuda_ptr<scalar_t>(d),
                                                   cuda_ptr<scalar_t>(out), B, C * H * W,
                                                   static_cast<float>(alpha), stream));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> skip_merge_backward_cuda(const at::Tensor& grad, double alpha) {
  check_skip_merge_grad(grad, alpha, /*allow_half=*/true);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  const int64_t B = grad.size(0), C = grad.size(1) / 2, H = grad.size(2), W = grad.size(3);
  auto grad_encoder = at::empty({B, C, H, W}, grad.options());
  auto grad_decoder = at::empty({B, C, H, W}, grad.options());
  if (grad_encoder.numel() == 0) return {grad_encoder, grad_decoder};
  const auto g = grad.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "skip_merge_backward_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_skip_merge_backward(cuda_ptr<scalar_t>(g), cuda_ptr<scalar_t>(grad_encoder),
                                                    cuda_ptr<scalar_t>(grad_decoder), B, C * H * W,
                                                    static_cast<float>(alpha), stream));
  });
  return {grad_encoder, grad_decoder};
}

}  // namespace

TORCH_LIBRARY_IMPL(medad_fast, CUDA, m) {
  m.impl("skip_merge", &skip_merge_cuda);
  m.impl("skip_merge_backward", &skip_merge_backward_cuda);
}

}  // namespace medad_fast
