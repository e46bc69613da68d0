// CUDA kernel of perlin_noise: one thread per output pixel (grid-stride).
#include "cuda_utils.cuh"
#include "launchers.h"
#include "lattice.cuh"

namespace medad_fast {
namespace cuda {

template <typename T>
__global__ void perlin_noise_kernel(LatticeArgs<T> args, int64_t batch, int64_t height, int64_t width, T* out) {
  const int64_t total = batch * height * width;
  const T H = static_cast<T>(height), W = static_cast<T>(width);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const PixelContext<T> p = pixel_context(args, idx, height, width);
    out[idx] = perlin_pixel(p.lattice, p.i, p.j, p.c, p.s, H, W);
  }
}

template <typename T>
cudaError_t launch_perlin_noise(const LatticeArgs<T>& lattice, int64_t batch, int64_t height, int64_t width,
                                T* out, cudaStream_t stream) {
  const int64_t total = batch * height * width;
  if (total == 0) return cudaSuccess;
  perlin_noise_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(lattice, batch, height, width, out);
  return cudaGetLastError();
}

template cudaError_t launch_perlin_noise<float>(const LatticeArgs<float>&, int64_t, int64_t, int64_t, float*,
                                                cudaStream_t);
template cudaError_t launch_perlin_noise<double>(const LatticeArgs<double>&, int64_t, int64_t, int64_t, double*,
                                                 cudaStream_t);

}  // namespace cuda
}  // namespace medad_fast
