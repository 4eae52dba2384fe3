// The block programs' view of a CUDA block (thread index, block size, barrier), shared by the CUDA
// kernels whose programs are host-device templates (attention_tiles.h, decoder_tiles.h). The
// members are host-device so that those templates may call them; only the device side ever runs,
// the host emulations (csrc/cpu/tile_emulation.cpp) bring blocks of their own.
#pragma once

#include "dreamportrait/common.h"

namespace dreamportrait {

struct CudaBlock {
  DP_HOST_DEVICE int thread() const {
#ifdef __CUDA_ARCH__
    return threadIdx.x;
#else
    return 0;
#endif
  }
  DP_HOST_DEVICE int threads() const {
#ifdef __CUDA_ARCH__
    return blockDim.x;
#else
    return 1;
#endif
  }
  DP_HOST_DEVICE void sync() const {
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
  }
};

}  // namespace dreamportrait
