// CUDA entry points of skip_merge and skip_merge_backward: checks -> device guard ->
// allocate (in the layout of the inputs) -> early return on empty -> contiguous (in that
// layout) -> dispatch -> launch on the current stream -> launch check.
// float32/float64/float16/bfloat16. The layout rules are in checks.h: channels_last inputs
// give a channels_last output and the kernel runs over NHWC memory (rows = pixels).
#include <torch/library.h>

#include "binding_utils.h"
#include "checks.h"

namespace medad_fast {
namespace {

// The launchers see a [B, C, H, W] tensor in `format` as [rows, row_len]: NCHW is B rows
// of C*H*W, channels_last is B*H*W pixels of C channels.
int64_t rows_of(at::MemoryFormat format, int64_t B, int64_t H, int64_t W) {
  return format == at::MemoryFormat::ChannelsLast ? B * H * W : B;
}
int64_t row_len_of(at::MemoryFormat format, int64_t C, int64_t H, int64_t W) {
  return format == at::MemoryFormat::ChannelsLast ? C : C * H * W;
}

at::Tensor skip_merge_cuda(const at::Tensor& encoder, const at::Tensor& decoder, double alpha) {
  check_skip_merge_inputs(encoder, decoder, alpha, /*allow_half=*/true);
  const c10::cuda::CUDAGuard device_guard(encoder.device());
  const int64_t B = encoder.size(0), C = encoder.size(1), H = encoder.size(2), W = encoder.size(3);
  const auto format = skip_merge_memory_format(encoder, decoder);
  auto out = at::empty({B, 2 * C, H, W}, encoder.options().memory_format(format));
  if (out.numel() == 0) return out;
  const auto e = encoder.contiguous(format);
  const auto d = decoder.contiguous(format);
  const int64_t rows = rows_of(format, B, H, W), row_len = row_len_of(format, C, H, W);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, encoder.scalar_type(), "skip_merge_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_skip_merge_forward(cuda_ptr<scalar_t>(e), cuda_ptr<scalar_t>(d),
                                                   cuda_ptr<scalar_t>(out), rows, row_len,
                                                   static_cast<float>(alpha), stream));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> skip_merge_backward_cuda(const at::Tensor& grad, double alpha) {
  check_skip_merge_grad(grad, alpha, /*allow_half=*/true);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  const int64_t B = grad.size(0), C = grad.size(1) / 2, H = grad.size(2), W = grad.size(3);
  const auto format = skip_merge_grad_memory_format(grad);
  const auto options = grad.options().memory_format(format);
  auto grad_encoder = at::empty({B, C, H, W}, options);
  auto grad_decoder = at::empty({B, C, H, W}, options);
  if (grad_encoder.numel() == 0) return {grad_encoder, grad_decoder};
  const auto g = grad.contiguous(format);
  const int64_t rows = rows_of(format, B, H, W), row_len = row_len_of(format, C, H, W);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "skip_merge_backward_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_skip_merge_backward(cuda_ptr<scalar_t>(g), cuda_ptr<scalar_t>(grad_encoder),
                                                    cuda_ptr<scalar_t>(grad_decoder), rows, row_len,
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
