// Launchers of the CUDA kernels: raw pointers and a cudaStream_t, no torch headers, so the
// .cu files compile with plain `nvcc -c` and the *_binding.cpp files (which see torch)
// only have to check tensors and pick the type. Each returns the launch's cudaError_t.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <stdint.h>

namespace medad_fast {
namespace cuda {

// Perlin lattice tables of a batch: grad_cos/grad_sin [B, lattice_h, lattice_w], res [B, 2]
// (int64 on the device), optional rotation cos/sin [B] (null: no rotation).
template <typename T>
struct LatticeArgs {
  const T* grad_cos;
  const T* grad_sin;
  int64_t lattice_h, lattice_w;
  const int64_t* res;
  const T* rot_cos;
  const T* rot_sin;
};

template <typename T>
cudaError_t launch_perlin_noise(const LatticeArgs<T>& lattice, int64_t batch, int64_t height, int64_t width,
                                T* out, cudaStream_t stream);

template <typename T>
cudaError_t launch_synthesize_anomalies(const LatticeArgs<T>& lattice, const T* images, const T* sources,
                                        const T* beta, const bool* anomalous, T threshold, T roi_threshold,
                                        int64_t batch, int64_t height, int64_t width, T* augmented, T* mask,
                                        cudaStream_t stream);

// Multiplies an rfft2 spectrum (interleaved re/im of type T, `rows` = batch * H rows of
// `half_width` bins) by the Butterworth gain, in place.
template <typename T>
cudaError_t launch_butterworth_gain(T* spectrum, int64_t rows, int64_t height, int64_t half_width, double d0,
                                    int64_t order, cudaStream_t stream);

// out [rows, 2, row_len] = (alpha e + (1 - alpha) d, d) for e, d [rows, row_len]. One
// kernel for both layouts: NCHW is rows = B, row_len = C*H*W; channels_last (NHWC) is
// rows = B*H*W, row_len = C.
template <typename T>
cudaError_t launch_skip_merge_forward(const T* encoder, const T* decoder, T* out, int64_t rows, int64_t row_len,
                                      float alpha, cudaStream_t stream);

// grad_encoder = alpha g[:, 0], grad_decoder = (1 - alpha) g[:, 0] for g [rows, 2, row_len]
// (rows and row_len as in launch_skip_merge_forward).
template <typename T>
cudaError_t launch_skip_merge_backward(const T* grad, T* grad_encoder, T* grad_decoder, int64_t rows,
                                       int64_t row_len, float alpha, cudaStream_t stream);

}  // namespace cuda
}  // namespace medad_fast
