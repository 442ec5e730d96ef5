// CUDA kernels of the fused attention rollout. Per-element logic comes from rollout_common.h, the
// header the CPU kernel uses too; the op bodies that allocate and check are in rollout_cuda.cpp.
//
//   fuse_kernel       grid (L*B, blocks per (l, b)): head fusion, F in float32, pass-0 histogram
//   select_kernel     grid (L*B): radix select of the (k+1)-th smallest entry of F[l, b]
//   normalize_kernel  grid (L*B, N): discard + residual + row normalisation of one row, in place
//   init_kernel / vecmat_kernel (one launch per layer, last to first) / finalize_kernel: the
//                     'cls'/'mean' row-vector chain and the per-sample map normalisation

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/rollout_common.h"
#include "rollout_cuda.h"

namespace rollout_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kSelectThreads = 1024;

__device__ __forceinline__ float load_float(const float* p) { return *p; }
__device__ __forceinline__ float load_float(const double* p) { return static_cast<float>(*p); }
__device__ __forceinline__ float load_float(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// ------------------------------------------------------------------------ block reductions
enum ReduceOp : int { kSum = 0, kMin = 1, kMax = 2 };

template <int OP>
__device__ __forceinline__ float reduce_identity() {
  return OP == kSum ? 0.0f : (OP == kMin ? INFINITY : -INFINITY);
}

template <int OP>
__device__ __forceinline__ float reduce_pair(float a, float b) {
  if (OP == kSum) return a + b;
  if (OP == kMin) return b < a ? b : a;
  return b > a ? b : a;
}

// All threads of the block get the reduction of x; `scratch` holds >= 32 floats.
template <int OP>
__device__ float block_reduce(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  for (int o = 16; o > 0; o >>= 1) x = reduce_pair<OP>(x, __shfl_xor_sync(0xffffffffu, x, o));
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    float y = lane < nwarps ? scratch[lane] : reduce_identity<OP>();
    for (int o = 16; o > 0; o >>= 1) y = reduce_pair<OP>(y, __shfl_xor_sync(0xffffffffu, y, o));
    if (lane == 0) scratch[0] = y;
  }
  __syncthreads();
  return scratch[0];
}

// Exclusive prefix sum of x over the block (blockDim.x a multiple of 32); `scratch` >= 32 uints.
__device__ uint32_t block_exclusive_scan(uint32_t x, uint32_t* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  uint32_t incl = x;
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    uint32_t w = lane < nwarps ? scratch[lane] : 0u;
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    scratch[lane] = w;  // inclusive sums of the warp totals
  }
  __syncthreads();
  return (warp > 0 ? scratch[warp - 1] : 0u) + incl - x;
}

// ---------------------------------------------------------------------------------- kernels
template <typename T, int FUSION>
__global__ void fuse_kernel(const T* __restrict__ att, Problem p, float* __restrict__ F,
                            uint32_t* __restrict__ hist0) {
  __shared__ uint32_t hist[kRadixMaxBins];
  const bool with_hist = p.k >= 1;
  const int64_t lb = blockIdx.x, NN = p.N * p.N;
  const T* base = att + (lb / p.B) * p.sL + (lb % p.B) * p.sB;
  float* Fl = F + lb * NN;
  if (with_hist) {
    for (int b = threadIdx.x; b < static_cast<int>(kRadixMaxBins); b += blockDim.x) hist[b] = 0u;
    __syncthreads();
  }
  const int n = static_cast<int>(p.N);  // N * N < 2^31 (checked on the host): 32-bit index math
  for (int64_t e = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < NN;
       e += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const int i = static_cast<int>(e) / n, j = static_cast<int>(e) - i * n;
    const T* a = base + i * p.sI + j;
    float acc = fusion_first(load_float(a));
    for (int64_t h = 1; h < p.H; ++h) acc = fusion_combine(FUSION, acc, load_float(a + h * p.sH));
    const float f = fusion_finish(FUSION, acc, p.H);
    Fl[e] = f;
    if (with_hist) atomicAdd(&hist[radix_digit(float_to_key(f), 0)], 1u);
  }
  if (with_hist) {
    __syncthreads();
    uint32_t* g = hist0 + lb * kRadixMaxBins;
    for (int b = threadIdx.x; b < static_cast<int>(kRadixMaxBins); b += blockDim.x)
      if (hist[b] != 0u) atomicAdd(&g[b], hist[b]);
  }
}

__global__ void select_kernel(const float* __restrict__ F, const uint32_t* __restrict__ hist0, Problem p,
                              float* __restrict__ thresh) {
  __shared__ uint32_t hist[kRadixMaxBins];
  __shared__ uint32_t scan_scratch[32];
  __shared__ uint32_t s_prefix, s_rank;
  const int64_t lb = blockIdx.x, NN = p.N * p.N;
  const float* Fl = F + lb * NN;
  uint32_t prefix = 0u, rank = static_cast<uint32_t>(p.k);
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    const uint32_t bins = radix_bins(pass);
    if (pass == 0) {
      for (uint32_t b = threadIdx.x; b < bins; b += blockDim.x) hist[b] = hist0[lb * kRadixMaxBins + b];
    } else {
      for (uint32_t b = threadIdx.x; b < bins; b += blockDim.x) hist[b] = 0u;
      __syncthreads();
      for (int64_t e = threadIdx.x; e < NN; e += blockDim.x) {
        const uint32_t key = float_to_key(Fl[e]);
        if (radix_prefix_match(key, prefix, pass)) atomicAdd(&hist[radix_digit(key, pass)], 1u);
      }
    }
    __syncthreads();
    // each thread owns a contiguous chunk of bins; the block scan gives the chunk's offset
    const uint32_t per = (bins + blockDim.x - 1) / blockDim.x;
    const uint32_t lo = min(bins, threadIdx.x * per), hi = min(bins, lo + per);
    uint32_t count = 0u;
    for (uint32_t b = lo; b < hi; ++b) count += hist[b];
    const uint32_t below = block_exclusive_scan(count, scan_scratch);
    if (below <= rank && rank < below + count) {
      uint32_t local = rank - below;
      const uint32_t bin = lo + radix_find_bin(hist + lo, hi - lo, &local);
      s_prefix = radix_extend_prefix(prefix, bin, pass);
      s_rank = local;
    }
    __syncthreads();
    prefix = s_prefix;
    rank = s_rank;
    __syncthreads();
  }
  if (threadIdx.x == 0) thresh[lb] = key_to_float(prefix);
}

__global__ void normalize_kernel(float* __restrict__ F, const float* __restrict__ thresh, Problem p) {
  __shared__ float scratch[32];
  const int64_t lb = blockIdx.x, i = blockIdx.y, N = p.N;
  float* row = F + lb * N * N + i * N;
  const float t = thresh != nullptr ? thresh[lb] : -INFINITY;
  float partial = 0.0f;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const float m = residual_add(discard_apply(row[j], t, p.protect00 && i == 0 && j == 0), i, j);
    row[j] = m;
    partial += m;
  }
  const float inv = row_inverse_sum(block_reduce<kSum>(partial, scratch));
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) row[j] = row_normalize(row[j], inv);
}

__global__ void init_kernel(float* __restrict__ v, int64_t B, int64_t N, int64_t num_prefix, int readout) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e < B * N) v[e] = readout_init(readout, e % N, num_prefix);
}

// v_out[b, j] = sum_i v_in[b, i] * M[l, b, i, j]
__global__ void vecmat_kernel(const float* __restrict__ M, int64_t l, Problem p, const float* __restrict__ v_in,
                              float* __restrict__ v_out) {
  const int64_t b = blockIdx.x, N = p.N;
  const int64_t j = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= N) return;
  const float* Ml = M + (l * p.B + b) * N * N;
  const float* v = v_in + b * N;
  float acc = 0.0f;
  for (int64_t i = 0; i < N; ++i) {
    const float vi = v[i];  // the same for the whole block: no divergence
    if (vi != 0.0f) acc += vi * Ml[i * N + j];
  }
  v_out[b * N + j] = acc;
}

__global__ void finalize_kernel(const float* __restrict__ v, int64_t N, int64_t num_prefix, int readout,
                                int normalize, float* __restrict__ out) {
  __shared__ float scratch[32];
  const int64_t b = blockIdx.x, G = N - num_prefix;
  float lo = INFINITY, hi = -INFINITY;
  for (int64_t j = threadIdx.x; j < G; j += blockDim.x) {
    const float x = readout_finish(readout, v[b * N + num_prefix + j], G);
    lo = fminf(lo, x);
    hi = fmaxf(hi, x);
  }
  lo = block_reduce<kMin>(lo, scratch);
  hi = block_reduce<kMax>(hi, scratch);
  for (int64_t j = threadIdx.x; j < G; j += blockDim.x) {
    const float x = readout_finish(readout, v[b * N + num_prefix + j], G);
    out[b * G + j] = normalize_value(normalize, x, lo, hi);
  }
}

template <typename T>
void fuse_typed(const T* att, const Problem& p, float* F, uint32_t* hist0, cudaStream_t stream) {
  const int64_t NN = p.N * p.N;
  // >= 8 elements per thread, so the 2048-bin histogram flush stays small against the work
  const int64_t blocks = (NN + kThreads * 8 - 1) / (kThreads * 8);
  // (l, b) on grid x (up to 2^31 - 1); the <= 65535 blocks per (l, b) on y (N * N < 2^31)
  const dim3 grid(static_cast<unsigned>(p.L * p.B), static_cast<unsigned>(blocks < 1 ? 1 : blocks));
  switch (p.fusion) {
    case kFusionMean: fuse_kernel<T, kFusionMean><<<grid, kThreads, 0, stream>>>(att, p, F, hist0); break;
    case kFusionMax: fuse_kernel<T, kFusionMax><<<grid, kThreads, 0, stream>>>(att, p, F, hist0); break;
    default: fuse_kernel<T, kFusionMin><<<grid, kThreads, 0, stream>>>(att, p, F, hist0); break;
  }
}

}  // namespace

cudaError_t launch_fuse(const void* att, int dtype, const Problem& p, float* F, uint32_t* hist0,
                        cudaStream_t stream) {
  switch (dtype) {
    case kInFloat16: fuse_typed(static_cast<const __half*>(att), p, F, hist0, stream); break;
    case kInBFloat16: fuse_typed(static_cast<const __nv_bfloat16*>(att), p, F, hist0, stream); break;
    case kInFloat64: fuse_typed(static_cast<const double*>(att), p, F, hist0, stream); break;
    default: fuse_typed(static_cast<const float*>(att), p, F, hist0, stream); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_select(const float* F, const uint32_t* hist0, const Problem& p, float* thresh,
                          cudaStream_t stream) {
  select_kernel<<<static_cast<unsigned>(p.L * p.B), kSelectThreads, 0, stream>>>(F, hist0, p, thresh);
  return cudaGetLastError();
}

cudaError_t launch_normalize(float* F, const float* thresh, const Problem& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.L * p.B), static_cast<unsigned>(p.N));  // N <= 46340 on y
  const int threads = p.N <= 128 ? 128 : kThreads;
  normalize_kernel<<<grid, threads, 0, stream>>>(F, thresh, p);
  return cudaGetLastError();
}

cudaError_t launch_chain(const float* M, const Problem& p, int64_t num_prefix, int readout, int normalize,
                         float* v_a, float* v_b, float* out, cudaStream_t stream) {
  const int64_t BN = p.B * p.N;
  init_kernel<<<static_cast<unsigned>((BN + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      v_a, p.B, p.N, num_prefix, readout);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(p.B), static_cast<unsigned>((p.N + kThreads - 1) / kThreads));
  for (int64_t l = p.L - 1; l >= 0; --l) {
    vecmat_kernel<<<grid, kThreads, 0, stream>>>(M, l, p, v_a, v_b);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    float* tmp = v_a;
    v_a = v_b;
    v_b = tmp;
  }
  finalize_kernel<<<static_cast<unsigned>(p.B), kThreads, 0, stream>>>(v_a, p.N, num_prefix, readout,
                                                                       normalize, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace rollout_fast
