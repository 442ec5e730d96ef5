// CUDA body of rollout_fast::topk_gather (schema in ../ops.cpp; semantics in common/gather_common.h and
// rollout_fast/reference/gather.py). Compiled only when the extension is built with CUDA (setup.py).
//
// One block of 256 threads per sample, on the current stream:
//   1. T = the k-th largest order key of the row: bitwise radix search from the most significant bit,
//      32 block-wide counting passes over the G scores (no sort, no extra memory);
//   2. winners = keys > T, plus the first k - #(keys > T) keys equal to T in index order; a block scan
//      (cub::BlockScan) over 256-index chunks ranks the ties and gives each winner its output slot, the
//      winners' indices are written in ascending order to `indices`;
//   3. the block copies the P prefix rows and the k winner rows of D elements to `kept`.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <tuple>

#include "common/gather_common.h"

namespace rollout_fast {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
topk_gather_kernel(const T* __restrict__ tokens, const float* __restrict__ scores, T* __restrict__ out,
                   int64_t* __restrict__ indices, int64_t G, int64_t k, int64_t P, int64_t D, int64_t t_b,
                   int64_t t_n, int64_t s_b) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ int shared_count;
  __shared__ int carry[2];

  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const float* sc = scores + b * s_b;

  // 1. the k-th largest key: the largest x with #(key >= x) >= k
  uint32_t t = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t cand = t | (1u << bit);
    int local = 0;
    for (int64_t i = tid; i < G; i += kThreads) local += gather::score_key(sc[i]) >= cand ? 1 : 0;
    const int total = Reduce(tmp.reduce).Sum(local);
    if (tid == 0) shared_count = total;
    __syncthreads();
    if (shared_count >= k) t = cand;
    __syncthreads();
  }
  int local_gt = 0;
  for (int64_t i = tid; i < G; i += kThreads) local_gt += gather::score_key(sc[i]) > t ? 1 : 0;
  const int total_gt = Reduce(tmp.reduce).Sum(local_gt);
  if (tid == 0) {
    shared_count = total_gt;
    carry[0] = 0;  // ties taken so far
    carry[1] = 0;  // winners written so far
  }
  __syncthreads();
  const int need = static_cast<int>(k) - shared_count;

  // 2. winners in index order
  int64_t* idx = indices + b * k;
  for (int64_t base = 0; base < G; base += kThreads) {
    const int64_t i = base + tid;
    uint32_t key = 0;
    if (i < G) key = gather::score_key(sc[i]);
    const int is_eq = (i < G && key == t) ? 1 : 0;
    int eq_before, eq_total;
    Scan(tmp.scan).ExclusiveSum(is_eq, eq_before, eq_total);
    __syncthreads();
    const int kept = (i < G && (key > t || (is_eq && carry[0] + eq_before < need))) ? 1 : 0;
    int pos, kept_total;
    Scan(tmp.scan).ExclusiveSum(kept, pos, kept_total);
    if (kept) idx[carry[1] + pos] = i;
    __syncthreads();
    if (tid == 0) {
      carry[0] += eq_total;
      carry[1] += kept_total;
    }
    __syncthreads();
  }
  // the indices written above are visible to the whole block after __syncthreads()

  // 3. copy the rows
  const T* tb = tokens + b * t_b;
  T* ob = out + b * (P + k) * D;
  const int64_t rows = P + k;
  for (int64_t e = tid; e < rows * D; e += kThreads) {
    const int64_t r = e / D;
    const int64_t d = e - r * D;
    const int64_t src = r < P ? r : P + idx[r - P];
    ob[e] = tb[src * t_n + d];
  }
}

std::tuple<at::Tensor, at::Tensor> topk_gather_cuda(const at::Tensor& tokens, const at::Tensor& scores, int64_t k,
                                                    int64_t num_prefix_tokens) {
  TORCH_CHECK(tokens.device().is_cuda(), "rollout_fast::topk_gather: expected CUDA tensors, got tokens on ",
              tokens.device());
  const GatherShape s = check_gather(tokens, scores, k, num_prefix_tokens);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const at::Tensor tok = tokens.stride(2) == 1 ? tokens : tokens.contiguous();
  const at::Tensor sc = scores.stride(1) == 1 ? scores : scores.contiguous();
  at::Tensor out = at::empty({s.B, s.P + s.k, s.D}, tok.options());
  at::Tensor idx = at::empty({s.B, s.k}, sc.options().dtype(at::kLong));
  if (s.B == 0) return {out, idx};
  TORCH_CHECK(s.B <= 2147483647LL, "rollout_fast::topk_gather: batch too large for one launch: ", s.B);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(tok.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tok.scalar_type(), "rollout_fast_topk_gather_cuda", [&] {
    topk_gather_kernel<scalar_t><<<static_cast<unsigned>(s.B), kThreads, 0, stream>>>(
        tok.const_data_ptr<scalar_t>(), sc.const_data_ptr<float>(), out.data_ptr<scalar_t>(),
        idx.data_ptr<int64_t>(), s.G, s.k, s.P, s.D, tok.stride(0), tok.stride(1), sc.stride(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(rollout_fast, CUDA, m) { m.impl("topk_gather", &topk_gather_cuda); }

}  // namespace rollout_fast
