// Launchers of the CUDA rollout kernels (rollout_cuda_kernels.cu), called by the op bodies in
// rollout_cuda.cpp. Plain C++ types only, so nvcc compiles the kernels without torch's headers.
// Every launcher enqueues on `stream` and returns the first launch error (cudaSuccess if none).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace rollout_fast {
namespace cuda {

enum InDtype : int { kInFloat32 = 0, kInFloat16 = 1, kInBFloat16 = 2, kInFloat64 = 3 };

struct Problem {
  int64_t L, B, H, N, k;   // k: discard count floor(r N^2), active when >= 1
  int64_t sL, sB, sH, sI;  // element strides of the (L, B, H, N, N) attention; the last stride is 1
  int fusion;              // HeadFusion of rollout_common.h
  bool protect00;          // keep F[b, 0, 0] out of the discard
};

// Step 1 (and pass 0 of the threshold selection): F (L*B, N, N) float32 = head fusion of the
// attention; when p.k >= 1 also adds the pass-0 radix histogram of each (l, b) to hist0
// (L*B, kRadixMaxBins) uint32, which must be zeroed before.
cudaError_t launch_fuse(const void* att, int dtype, const Problem& p, float* F, uint32_t* hist0,
                        cudaStream_t stream);

// Step 2, threshold: thresh[lb] = the (k+1)-th smallest entry of F[lb] (radix select, passes 1-2).
cudaError_t launch_select(const float* F, const uint32_t* hist0, const Problem& p, float* thresh,
                          cudaStream_t stream);

// Steps 2-3, in place: F[lb] <- (discard(F[lb], thresh[lb]) + I) / rowsum. thresh may be null (no
// discard).
cudaError_t launch_normalize(float* F, const float* thresh, const Problem& p, cudaStream_t stream);

// Steps 4-6 for readout 'cls'/'mean': the row-vector chain over M (L*B, N, N), then the
// normalised maps out (B, N - P). v_a, v_b: (B, N) float32 scratch.
cudaError_t launch_chain(const float* M, const Problem& p, int64_t num_prefix, int readout,
                         int normalize, float* v_a, float* v_b, float* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace rollout_fast
