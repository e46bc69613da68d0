// The weight-decay skip connection: merged = alpha E + (1 - alpha) D.
#pragma once

#include "medad_fast/macros.h"

namespace medad_fast {

template <typename T>
MEDAD_HOST_DEVICE inline T skip_merge_value(T encoder, T decoder, T alpha) {
  return alpha * encoder + (T(1) - alpha) * decoder;
}

}  // namespace medad_fast
