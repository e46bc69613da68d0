// First touch of a large fresh output costs a page fault per 4 KiB page, which for
// memory-bound kernels (skip_merge moves each byte once) costs more than the kernel itself.
// Asking for transparent huge pages on the output before writing it cuts the faults 512x;
// PyTorch's own allocator does the same under THP_MEM_ALLOC_ENABLE=1. A hint only: where
// THP is off or the call fails nothing changes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace medad_fast {

inline void advise_huge_pages(const at::Tensor& fresh_output) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = fresh_output.numel() * fresh_output.element_size();
  if (bytes < 4 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(fresh_output.data_ptr());
  const uintptr_t aligned_begin = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t aligned_end = (begin + bytes) & ~(kHuge - 1);
  if (aligned_end > aligned_begin) {
    madvise(reinterpret_cast<void*>(aligned_begin), aligned_end - aligned_begin, MADV_HUGEPAGE);
  }
#else
  (void)fresh_output;
#endif
}

}  // namespace medad_fast
