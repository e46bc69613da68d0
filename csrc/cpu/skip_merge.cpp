// CPU kernels of skip_merge (forward) and skip_merge_backward: one pass over the bytes, in
// the layout of the inputs. NCHW: per sample, the C*H*W merged values then the C*H*W copied
// ones. channels_last (NHWC): per pixel, the C merged values then the C copied ones. The
// layout rule (skip_merge_memory_format / skip_merge_grad_memory_format in checks.h) is the
// one of the fake kernels in medad_fast/_registrations.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "huge_pages.h"
#include "medad_fast/skip_merge.h"

namespace medad_fast {
namespace {

constexpr int64_t kGrain = 32768;  // elements of one input per parallel chunk

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

// Pixels per parallel chunk of the channels_last kernels (C elements per pixel).
int64_t pixel_grain(int64_t channels) { return std::max<int64_t>(1, kGrain / channels); }

// NCHW: out[b] = (merged [C, H, W], copy [C, H, W]); parallel over the flat elements, so a
// batch of 1 still uses every thread.
template <typename scalar_t>
void merge_nchw(const scalar_t* ep, const scalar_t* dp, scalar_t* op, int64_t batch, int64_t plane, scalar_t a) {
  at::parallel_for(0, batch * plane, kGrain, [&](int64_t begin, int64_t end) {
    for_each_sample_piece(begin, end, plane, [&](int64_t b, int64_t lo, int64_t hi) {
      const scalar_t* es = ep + b * plane;
      const scalar_t* ds = dp + b * plane;
      scalar_t* merged = op + 2 * b * plane;
      scalar_t* copy = merged + plane;
      for (int64_t k = lo; k < hi; ++k) merged[k] = skip_merge_value(es[k], ds[k], a);
      std::copy(ds + lo, ds + hi, copy + lo);
    });
  });
}

// channels_last: out[p] = (merged [C], copy [C]) for every pixel p of B*H*W; parallel over
// pixels, the inner loops run over the C contiguous channels (vectorised).
template <typename scalar_t>
void merge_nhwc(const scalar_t* ep, const scalar_t* dp, scalar_t* op, int64_t pixels, int64_t channels,
                scalar_t a) {
  at::parallel_for(0, pixels, pixel_grain(channels), [&](int64_t begin, int64_t end) {
    const scalar_t* __restrict__ es = ep + begin * channels;
    const scalar_t* __restrict__ ds = dp + begin * channels;
    scalar_t* __restrict__ o = op + 2 * begin * channels;
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t k = 0; k < channels; ++k) o[k] = skip_merge_value(es[k], ds[k], a);
      std::copy(ds, ds + channels, o + channels);
      es += channels;
      ds += channels;
      o += 2 * channels;
    }
  });
}

at::Tensor skip_merge_cpu(const at::Tensor& encoder, const at::Tensor& decoder, double alpha) {
  check_skip_merge_inputs(encoder, decoder, alpha, /*allow_half=*/false);
  const int64_t B = encoder.size(0), C = encoder.size(1), H = encoder.size(2), W = encoder.size(3);
  const auto format = skip_merge_memory_format(encoder, decoder);
  auto out = at::empty({B, 2 * C, H, W}, encoder.options().memory_format(format));
  if (out.numel() == 0) return out;
  advise_huge_pages(out);
  const auto e = encoder.contiguous(format);
  const auto d = decoder.contiguous(format);
  AT_DISPATCH_FLOATING_TYPES(encoder.scalar_type(), "skip_merge_cpu", [&] {
    const scalar_t a = static_cast<scalar_t>(alpha);
    if (format == at::MemoryFormat::ChannelsLast) {
      merge_nhwc(e.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B * H * W, C, a);
    } else {
      merge_nchw(e.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, C * H * W, a);
    }
  });
  return out;
}

// NCHW backward: only the merged half g[b, :C] of each sample carries gradient.
template <typename scalar_t>
void merge_backward_nchw(const scalar_t* gp, scalar_t* ge, scalar_t* gd, int64_t batch, int64_t plane, scalar_t a,
                         scalar_t one_minus_a) {
  at::parallel_for(0, batch * plane, kGrain, [&](int64_t begin, int64_t end) {
    for_each_sample_piece(begin, end, plane, [&](int64_t b, int64_t lo, int64_t hi) {
      const scalar_t* gs = gp + 2 * b * plane;
      scalar_t* es = ge + b * plane;
      scalar_t* ds = gd + b * plane;
      for (int64_t k = lo; k < hi; ++k) {
        es[k] = a * gs[k];
        ds[k] = one_minus_a * gs[k];
      }
    });
  });
}

// channels_last backward: only the first C of the 2C values of each pixel carry gradient.
template <typename scalar_t>
void merge_backward_nhwc(const scalar_t* gp, scalar_t* ge, scalar_t* gd, int64_t pixels, int64_t channels,
                         scalar_t a, scalar_t one_minus_a) {
  at::parallel_for(0, pixels, pixel_grain(channels), [&](int64_t begin, int64_t end) {
    const scalar_t* __restrict__ g = gp + 2 * begin * channels;
    scalar_t* __restrict__ es = ge + begin * channels;
    scalar_t* __restrict__ ds = gd + begin * channels;
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t k = 0; k < channels; ++k) {
        es[k] = a * g[k];
        ds[k] = one_minus_a * g[k];
      }
      g += 2 * channels;
      es += channels;
      ds += channels;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> skip_merge_backward_cpu(const at::Tensor& grad, double alpha) {
  check_skip_merge_grad(grad, alpha, /*allow_half=*/false);
  const int64_t B = grad.size(0), C = grad.size(1) / 2, H = grad.size(2), W = grad.size(3);
  const auto format = skip_merge_grad_memory_format(grad);
  const auto options = grad.options().memory_format(format);
  auto grad_encoder = at::empty({B, C, H, W}, options);
  auto grad_decoder = at::empty({B, C, H, W}, options);
  if (grad_encoder.numel() == 0) return {grad_encoder, grad_decoder};
  advise_huge_pages(grad_encoder);
  advise_huge_pages(grad_decoder);
  const auto g = grad.contiguous(format);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "skip_merge_backward_cpu", [&] {
    const scalar_t a = static_cast<scalar_t>(alpha), one_minus_a = static_cast<scalar_t>(1.0 - alpha);
    scalar_t* ge = grad_encoder.data_ptr<scalar_t>();
    scalar_t* gd = grad_decoder.data_ptr<scalar_t>();
    if (format == at::MemoryFormat::ChannelsLast) {
      merge_backward_nhwc(g.data_ptr<scalar_t>(), ge, gd, B * H * W, C, a, one_minus_a);
    } else {
      merge_backward_nchw(g.data_ptr<scalar_t>(), ge, gd, B, C * H * W, a, one_minus_a);
    }
  });
  return {grad_encoder, grad_decoder};
}

}  // namespace

TORCH_LIBRARY_IMPL(medad_fast, CPU, m) {
  m.impl("skip_merge", &skip_merge_cpu);
  m.impl("skip_merge_backward", &skip_merge_backward_cpu);
}

}  // namespace medad_fast
