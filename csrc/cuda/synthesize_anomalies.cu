// CUDA kernel of synthesize_anomalies: noise, rotation, threshold, liver mask and blend in
// one pass, one thread per pixel (grid-stride).
#include "cuda_utils.cuh"
#include "lattice.cuh"
#include "launchers.h"

namespace medad_fast {
namespace cuda {

template <typename T>
__global__ void synthesize_anomalies_kernel(LatticeArgs<T> args, const T* images, const T* sources, const T* beta,
                                            const bool* anomalous, T threshold, T roi_threshold, int64_t batch,
                                            int64_t height, int64_t width, T* augmented, T* mask) {
  const int64_t total = batch * height * width;
  const T H = static_cast<T>(height), W = static_cast<T>(width);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const PixelContext<T> p = pixel_context(args, idx, height, width);
    synthesize_pixel(p.lattice, p.i, p.j, p.c, p.s, H, W, anomalous[p.b], images[idx], sources[idx],
                     beta[p.b], threshold, roi_threshold, augmented[idx], mask[idx]);
  }
}

template <typename T>
cudaError_t launch_synthesize_anomalies(const LatticeArgs<T>& lattice, const T* images, const T* sources,
                                        const T* beta, const bool* anomalous, T threshold, T roi_threshold,
                                        int64_t batch, int64_t height, int64_t width, T* augmented, T* mask,
                                        cudaStream_t stream) {
  const int64_t total = batch * height * width;
  if (total == 0) return cudaSuccess;
  synthesize_anomalies_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
      lattice, images, sources, beta, anomalous, threshold, roi_threshold, batch, height, width, augmented, mask);
  return cudaGetLastError();
}

#define MEDAD_INSTANTIATE(T)                                                                                   \
  template cudaError_t launch_synthesize_anomalies<T>(const LatticeArgs<T>&, const T*, const T*, const T*,      \
                                                      const bool*, T, T, int64_t, int64_t, int64_t, T*, T*, \
                                                      cudaStream_t);
MEDAD_INSTANTIATE(float)
MEDAD_INSTANTIATE(double)
#undef MEDAD_INSTANTIATE

}  // namespace cuda
}  // namespace medad_fast
