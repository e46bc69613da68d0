// The extension module medad_fast._C: every op schema (TORCH_LIBRARY) and build facts
// (PYBIND11_MODULE). The kernels register themselves per device in cpu/ and cuda/.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#ifndef MEDAD_FAST_CUDA_ARCH_LIST
#define MEDAD_FAST_CUDA_ARCH_LIST ""
#endif

TORCH_LIBRARY(medad_fast, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def("perlin_noise(Tensor angles, Tensor res, int height, int width, Tensor? rotation) -> Tensor", tags);
  m.def("synthesize_anomalies(Tensor images, Tensor sources, Tensor angles, Tensor res, Tensor? rotation, "
        "Tensor beta, Tensor anomalous, float threshold=0.5, float roi_threshold=0.0) -> (Tensor, Tensor)",
        tags);
  m.def("butterworth_highpass(Tensor x, float d0, int order=2) -> Tensor", tags);
  m.def("skip_merge(Tensor encoder, Tensor decoder, float alpha) -> Tensor", tags);
  m.def("skip_merge_backward(Tensor grad, float alpha) -> (Tensor, Tensor)", tags);
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef MEDAD_FAST_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_arch_list"] = std::string(MEDAD_FAST_CUDA_ARCH_LIST);
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["torch_version"] = std::string(TORCH_VERSION);
  info["parallel_info"] = at::get_parallel_info();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "medad_fast compiled ops (registered under torch.ops.medad_fast)";
  m.def("build_info", &build_info, "What this extension was built with.");
}
