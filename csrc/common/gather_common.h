// Selection order of the fused top-k gather (rollout_fast::topk_gather), shared by the C++ CPU kernel
// (cpu/gather_cpu.cpp) and the CUDA kernel (cuda/gather_cuda.cu); the Triton kernel
// (rollout_fast/triton/gather.py) and the reference (rollout_fast/reference/gather.py: topk_gather_reference)
// implement the same order.
//
// Order: scores are float32 and compared through a 32-bit key that orders like the floats
// (key(a) > key(b) iff a > b), with -0 mapped to +0 first so that equal floats get equal keys. NaN
// orders by its bit pattern (a positive NaN above +inf, a negative one below -inf); the public Python
// API rejects non-finite scores before calling the op. Among equal keys the LOWER patch index wins.
// The k winners are returned in ascending patch-index order, so k = G is the identity.
//
// Also the host-side argument checks shared by the CPU and CUDA bindings (check_gather): the public entry
// point (rollout_fast.gather.topk_gather) validates first with friendlier messages; these TORCH_CHECKs guard
// the op when it is called directly (torch.ops.rollout_fast.topk_gather).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "rollout_common.h"

namespace rollout_fast {
namespace gather {

// Order-preserving key of a float32 score (rollout_common.h's float_to_key; -0 counts as +0).
RF_HD uint32_t score_key(float v) {
  return float_to_key(v == 0.0f ? 0.0f : v);  // NaN compares false and keeps its bits
}

// True when patch a (key ka) is ranked before patch b (key kb): larger key, or equal key and lower index.
RF_HD bool ranks_before(uint32_t ka, int64_t a, uint32_t kb, int64_t b) {
  return ka > kb || (ka == kb && a < b);
}

}  // namespace gather


struct GatherShape {
  int64_t B, N, D, P, G, k;
};

inline GatherShape check_gather(const at::Tensor& tokens, const at::Tensor& scores, int64_t k, int64_t P) {
  TORCH_CHECK(tokens.dim() == 3, "rollout_fast::topk_gather: tokens must be (B, N, D), got sizes ", tokens.sizes());
  TORCH_CHECK(scores.dim() == 2, "rollout_fast::topk_gather: scores must be (B, G), got sizes ", scores.sizes());
  const auto st = tokens.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "rollout_fast::topk_gather: tokens must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK(scores.scalar_type() == at::kFloat, "rollout_fast::topk_gather: scores must be float32, got ",
              scores.scalar_type());
  TORCH_CHECK(tokens.device() == scores.device(), "rollout_fast::topk_gather: tokens on ", tokens.device(),
              " but scores on ", scores.device());
  const int64_t B = tokens.size(0), N = tokens.size(1), D = tokens.size(2);
  TORCH_CHECK(P >= 0 && P < N, "rollout_fast::topk_gather: num_prefix_tokens must satisfy 0 <= P < N = ", N,
              ", got ", P);
  const int64_t G = N - P;
  TORCH_CHECK(scores.size(0) == B && scores.size(1) == G, "rollout_fast::topk_gather: scores must be (B, N - P) = (",
              B, ", ", G, "), got sizes ", scores.sizes());
  TORCH_CHECK(k >= 1 && k <= G, "rollout_fast::topk_gather: k must satisfy 1 <= k <= G = ", G, ", got ", k);
  TORCH_CHECK(G < (int64_t(1) << 31), "rollout_fast::topk_gather: G must fit in 31 bits, got ", G);
  return {B, N, D, P, G, k};
}

}  // namespace rollout_fast
