// CPU kernels of skip_merge (forward) and skip_merge_backward: one pass over the bytes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "huge_pages.h"
#include "medad_fast/skip_merge.h"

namespace medad_fast {
namespace {

constexpr int64_t kGrain = 32768;

// Calls fn(b, begin_in_sample, end_in_sample) for the pieces of the flat range
// [begin, end) over B samples of `plane` elements each (no division per element).
template <typename Fn>
void for_each_sample_piece(int64_t begin, int64_t end, int64_t plane, const Fn& fn) {
  while (begin < end) {
    const int64_t b = begin / plane, offset = begin % plane;
    const int64_t stop = std::min(end - b * plane, plane);
    fn(b, offset, stop);
    begin = b * plane + stop;
  }
}

at::Tensor skip_merge_cpu(const at::Tensor& encoder, const at::Tensor& decoder, double alpha) {
  check_skip_merge_inputs(encoder, decoder, alpha, /*allow_half=*/false);
  const int64_t B = encoder.size(0), C = encoder.size(1), H = encoder.size(2), W = encoder.size(3);
  auto out = at::empty({B, 2 * C, H, W}, encoder.options());
  if (out.numel() == 0) return out;
  advise_huge_pages(out);
  const auto e = encoder.contiguous();
  const auto d = decoder.contiguous();
  const int64_t plane = C * H * W;
  AT_DISPATCH_FLOATING_TYPES(encoder.scalar_type(), "skip_merge_cpu", [&] {
    const scalar_t* ep = e.data_ptr<scalar_t>();
    const scalar_t* dp = d.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t a = static_cast<scalar_t>(alpha);
    at::parallel_for(0, B * plane, kGrain, [&](int64_t begin, int64_t end) {
      for_each_sample_piece(begin, end, plane, [&](int64_t b, int64_t lo, int64_t hi) {
        const scalar_t* es = ep + b * plane;
        const scalar_t* ds = dp + b * plane;
        scalar_t* merged = op + 2 * b * plane;
        scalar_t* copy = merged + plane;
        for (int64_t k = lo; k < hi; ++k) merged[k] = skip_merge_value(es[k], ds[k], a);
        std::copy(ds + lo, ds + hi, copy + lo);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> skip_merge_backward_cpu(const at::Tensor& grad, double alpha) {
  check_skip_merge_grad(grad, alpha, /*allow_half=*/false);
  const int64_t B = grad.size(0), C = grad.size(1) / 2, H = grad.size(2), W = grad.size(3);
  auto grad_encoder = at::empty({B, C, H, W}, grad.options());
  auto grad_decoder = at::empty({B, C, H, W}, grad.options());
  if (grad_encoder.numel() == 0) return {grad_encoder, grad_decoder};
  advise_huge_pages(grad_encoder);
  advise_huge_pages(grad_decoder);
  const auto g = grad.contiguous();
  const int64_t plane = C * H * W;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "skip_merge_backward_cpu", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* ge = grad_encoder.data_ptr<scalar_t>();
    scalar_t* gd = grad_decoder.data_ptr<scalar_t>();
    const scalar_t a = static_cast<scalar_t>(alpha), one_minus_a = static_cast<scalar_t>(1.0 - alpha);
    at::parallel_for(0, B * plane, kGrain, [&](int64_t begin, int64_t end) {
      for_each_sample_piece(begin, end, plane, [&](int64_t b, int64_t lo, int64_t hi) {
        const scalar_t* gs = gp + 2 * b * plane;  // only the merged half carries gradient
        scalar_t* es = ge + b * plane;
        scalar_t* ds = gd + b * plane;
        for (int64_t k = lo; k < hi; ++k) {
          es[k] = a * gs[k];
          ds[k] = one_minus_a * gs[k];
        }
      });
    });
  });
  return {grad_encoder, grad_decoder};
}

}  // namespace

TORCH_LIBRARY_IMPL(medad_fast, CPU, m) {
  m.impl("skip_merge", &skip_merge_cpu);
  m.impl("skip_merge_backward", &skip_merge_backward_cpu);
}

}  // namespace medad_fast
