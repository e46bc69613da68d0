// CUDA kernels of skip_merge and its backward: one pass over the bytes, half/bfloat16
// computed in float. Both layouts are rows of merged values followed by rows of copied
// ones, out [rows, 2, row_len] for inputs [rows, row_len]: NCHW is rows = B, row_len =
// C*H*W; channels_last (NHWC) is rows = B*H*W pixels, row_len = C channels. Consecutive
// threads take consecutive elements of a row, so reads and writes coalesce in both.
#include "cuda_utils.cuh"
#include "launchers.h"
#include "medad_fast/skip_merge.h"

namespace medad_fast {
namespace cuda {

template <typename T>
__global__ void skip_merge_forward_kernel(const T* __restrict__ encoder, const T* __restrict__ decoder,
                                          T* __restrict__ out, int64_t rows, int64_t row_len, float alpha) {
  using acc_t = typename OpMath<T>::type;
  const acc_t a = static_cast<acc_t>(alpha);
  const int64_t total = rows * row_len;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / row_len, k = idx - r * row_len;
    const T d = decoder[idx];
    T* merged = out + 2 * r * row_len;
    merged[k] = from_opmath<T>(skip_merge_value(to_opmath(encoder[idx]), to_opmath(d), a));
    merged[row_len + k] = d;
  }
}

template <typename T>
__global__ void skip_merge_backward_kernel(const T* __restrict__ grad, T* __restrict__ grad_encoder,
                                           T* __restrict__ grad_decoder, int64_t rows, int64_t row_len,
                                           float alpha) {
  using acc_t = typename OpMath<T>::type;
  const acc_t a = static_cast<acc_t>(alpha);
  const acc_t one_minus_a = static_cast<acc_t>(1.0 - static_cast<double>(alpha));
  const int64_t total = rows * row_len;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / row_len, k = idx - r * row_len;
    const acc_t g = to_opmath(grad[2 * r * row_len + k]);  // the copy half is detached
    grad_encoder[idx] = from_opmath<T>(a * g);
    grad_decoder[idx] = from_opmath<T>(one_minus_a * g);
  }
}

template <typename T>
cudaError_t launch_skip_merge_forward(const T* encoder, const T* decoder, T* out, int64_t rows, int64_t row_len,
                                      float alpha, cudaStream_t stream) {
  if (rows * row_len == 0) return cudaSuccess;
  skip_merge_forward_kernel<T><<<blocks_for(rows * row_len), kThreads, 0, stream>>>(encoder, decoder, out, rows,
                                                                                    row_len, alpha);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_skip_merge_backward(const T* grad, T* grad_encoder, T* grad_decoder, int64_t rows,
                                       int64_t row_len, float alpha, cudaStream_t stream) {
  if (rows * row_len == 0) return cudaSuccess;
  skip_merge_backward_kernel<T><<<blocks_for(rows * row_len), kThreads, 0, stream>>>(
      grad, grad_encoder, grad_decoder, rows, row_len, alpha);
  return cudaGetLastError();
}

#define MEDAD_INSTANTIATE(T)                                                                                 \
  template cudaError_t launch_skip_merge_forward<T>(const T*, const T*, T*, int64_t, int64_t, float,          \
                                                    cudaStream_t);                                            \
  template cudaError_t launch_skip_merge_backward<T>(const T*, T*, T*, int64_t, int64_t, float, cudaStream_t);
MEDAD_INSTANTIATE(float)
MEDAD_INSTANTIATE(double)
MEDAD_INSTANTIATE(__half)
MEDAD_INSTANTIATE(__nv_bfloat16)
#undef MEDAD_INSTANTIATE

}  // namespace cuda
}  // namespace medad_fast
