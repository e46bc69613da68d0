// CUDA kernel of the Butterworth gain, applied in place to an rfft2 spectrum (the FFTs are
// cuFFT, called from the binding). One thread per complex bin.
#include "cuda_utils.cuh"
#include "launchers.h"
#include "medad_fast/butterworth.h"

namespace medad_fast {
namespace cuda {

template <typename T>
__global__ void butterworth_gain_kernel(T* spectrum, int64_t rows, int64_t height, int64_t half_width, double d0,
                                        int64_t order) {
  const int64_t total = rows * half_width;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = idx % half_width;
    const int64_t u = (idx / half_width) % height;
    const T gain = static_cast<T>(butterworth_gain_at(u, v, height, d0, order));
    spectrum[2 * idx] *= gain;
    spectrum[2 * idx + 1] *= gain;
  }
}

template <typename T>
cudaError_t launch_butterworth_gain(T* spectrum, int64_t rows, int64_t height, int64_t half_width, double d0,
                                    int64_t order, cudaStream_t stream) {
  const int64_t total = rows * half_width;
  if (total == 0) return cudaSuccess;
  butterworth_gain_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(spectrum, rows, height, half_width, d0,
                                                                         order);
  return cudaGetLastError();
}

template cudaError_t launch_butterworth_gain<float>(float*, int64_t, int64_t, int64_t, double, int64_t,
                                                    cudaStream_t);
template cudaError_t launch_butterworth_gain<double>(double*, int64_t, int64_t, int64_t, double, int64_t,
                                                     cudaStream_t);

}  // namespace cuda
}  // namespace medad_fast
