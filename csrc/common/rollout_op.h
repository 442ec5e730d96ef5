// Host-side argument checks of the rollout_fast custom ops, shared by the CPU and CUDA bindings.
// The public Python entry point (rollout_fast.ops.attention_rollout) validates first with friendly
// messages; these TORCH_CHECKs guard the ops' own invariants when they are called directly
// (torch.ops.rollout_fast.*), so a bad call raises a Python RuntimeError instead of reading garbage.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

#include "rollout_common.h"

namespace rollout_fast {

inline int parse_head_fusion(std::string_view s) {
  if (s == "mean") return kFusionMean;
  if (s == "max") return kFusionMax;
  if (s == "min") return kFusionMin;
  TORCH_CHECK(false, "rollout_fast: head_fusion must be 'mean', 'max' or 'min', got '", s, "'");
}

inline int parse_readout(std::string_view s) {
  if (s == "cls") return kReadoutCls;
  if (s == "mean") return kReadoutMean;
  if (s == "full") return kReadoutFull;
  TORCH_CHECK(false, "rollout_fast: readout must be 'cls', 'mean' or 'full', got '", s, "'");
}

inline int parse_normalize(const std::optional<std::string_view>& s) {
  if (!s.has_value()) return kNormalizeNone;
  if (*s == "max") return kNormalizeMax;
  if (*s == "minmax") return kNormalizeMinMax;
  TORCH_CHECK(false, "rollout_fast: normalize must be 'max', 'minmax' or None, got '", *s, "'");
}

// Sizes of a checked (L, B, H, N, N) attention tensor and the derived discard count k.
struct LayerShape {
  int64_t L, B, H, N;
  int64_t k;  // discard count floor(r N^2); the discard is active when k >= 1
};

inline LayerShape check_attentions(const at::Tensor& att, double discard_ratio) {
  TORCH_CHECK(att.dim() == 5, "rollout_fast: attentions must be (L, B, H, N, N), got ", att.dim(),
              " dimensions (sizes ", att.sizes(), ")");
  TORCH_CHECK(att.size(3) == att.size(4), "rollout_fast: attentions must be square in the last two "
              "dimensions, got sizes ", att.sizes());
  TORCH_CHECK(att.numel() > 0, "rollout_fast: attentions has an empty dimension, sizes ", att.sizes());
  const auto st = att.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "rollout_fast: attentions must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK(discard_ratio >= 0.0 && discard_ratio < 1.0,
              "rollout_fast: discard_ratio must be in [0, 1), got ", discard_ratio);
  const int64_t N = att.size(3);
  TORCH_CHECK(N * N < (int64_t(1) << 31), "rollout_fast: N * N must fit in 31 bits, got N = ", N);
  return {att.size(0), att.size(1), att.size(2), N, discard_count(discard_ratio, N)};
}

// The optional row tolerance of the rollout op: -1 (no row check) for None, else a finite value >= 0.
inline float parse_row_tolerance(const std::optional<double>& tol) {
  if (!tol.has_value()) return -1.0f;
  TORCH_CHECK(std::isfinite(*tol) && *tol >= 0.0, "rollout_fast: row_tolerance must be None or a finite number "
              ">= 0, got ", *tol);
  return static_cast<float>(*tol);
}

inline void check_prefix(int64_t N, int64_t num_prefix, int readout) {
  TORCH_CHECK(num_prefix >= 0 && num_prefix < N,
              "rollout_fast: num_prefix_tokens must satisfy 0 <= P < N = ", N, ", got ", num_prefix);
  TORCH_CHECK(readout != kReadoutCls || num_prefix >= 1,
              "rollout_fast: readout 'cls' needs num_prefix_tokens >= 1");
}

// Readout 'full': R = M_L @ ... @ M_1 from the stored per-layer (L, B, N, N) float32 M (at::bmm on the
// tensor's device: the CPU BLAS, or cuBLAS on the current stream).
inline at::Tensor rollout_matrix_chain(const at::Tensor& M) {
  at::Tensor R = M.select(0, 0);
  for (int64_t l = 1; l < M.size(0); ++l) R = at::bmm(M.select(0, l), R);
  return R.contiguous();
}

}  // namespace rollout_fast
