// Fused top-k token gather on the CPU: the CPU body of rollout_fast::topk_gather (schema in ../ops.cpp).
//
//   rollout_fast::topk_gather(tokens (B, N, D) f16|bf16|f32|f64, scores (B, G) f32, k, num_prefix_tokens P)
//       -> (kept (B, P + k, D) tokens' dtype, indices (B, k) int64)
//
// with G = N - P and 1 <= k <= G. Row b of `kept` is the P prefix tokens of tokens[b] followed by the
// k patch tokens tokens[b, P + i] whose scores[b, i] are largest, in ascending patch index i;
// `indices[b]` holds those i (ascending). Ties: the lower index wins; order of scores and NaN:
// common/gather_common.h. One pass per sample (parallel over the batch): keys, std::nth_element on
// (key desc, index asc), sort the k winners by index, copy the rows (memcpy of D elements each).
// Python side: rollout_fast/ops/gather.py; reference: rollout_fast/reference/gather.py; fake: rollout_fast/ops/meta.py.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "common/gather_common.h"

namespace rollout_fast {
namespace {

template <typename T>
void gather_rows(const T* tokens, const float* scores, T* out, int64_t* idx, const GatherShape& s,
                 int64_t st_b, int64_t st_n, int64_t ss_b) {
  at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> keys(static_cast<size_t>(s.G));
    std::vector<int64_t> order(static_cast<size_t>(s.G));
    for (int64_t b = begin; b < end; ++b) {
      const float* sc = scores + b * ss_b;
      for (int64_t i = 0; i < s.G; ++i) {
        keys[i] = gather::score_key(sc[i]);
        order[i] = i;
      }
      auto before = [&](int64_t a, int64_t c) { return gather::ranks_before(keys[a], a, keys[c], c); };
      if (s.k < s.G) std::nth_element(order.begin(), order.begin() + s.k, order.end(), before);
      std::sort(order.begin(), order.begin() + s.k);
      int64_t* ib = idx + b * s.k;
      const T* tb = tokens + b * st_b;
      T* ob = out + b * (s.P + s.k) * s.D;
      for (int64_t r = 0; r < s.P; ++r) std::memcpy(ob + r * s.D, tb + r * st_n, sizeof(T) * s.D);
      for (int64_t j = 0; j < s.k; ++j) {
        ib[j] = order[j];
        std::memcpy(ob + (s.P + j) * s.D, tb + (s.P + order[j]) * st_n, sizeof(T) * s.D);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> topk_gather_cpu(const at::Tensor& tokens, const at::Tensor& scores, int64_t k,
                                                   int64_t num_prefix_tokens) {
  TORCH_CHECK(tokens.device().is_cpu() && scores.device().is_cpu(),
              "rollout_fast::topk_gather: expected CPU tensors, got tokens on ", tokens.device(), " and scores on ",
              scores.device());
  const GatherShape s = check_gather(tokens, scores, k, num_prefix_tokens);
  const at::Tensor tok = tokens.stride(2) == 1 ? tokens : tokens.contiguous();
  const at::Tensor sc = scores.stride(1) == 1 ? scores : scores.contiguous();
  at::Tensor out = at::empty({s.B, s.P + s.k, s.D}, tok.options());
  at::Tensor idx = at::empty({s.B, s.k}, sc.options().dtype(at::kLong));
  if (s.B == 0) return {out, idx};  // D == 0 still selects: the indices are an output too
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tok.scalar_type(), "rollout_fast_topk_gather_cpu", [&] {
    gather_rows<scalar_t>(tok.const_data_ptr<scalar_t>(), sc.const_data_ptr<float>(), out.data_ptr<scalar_t>(),
                          idx.data_ptr<int64_t>(), s, tok.stride(0), tok.stride(1), sc.stride(0));
  });
  return {out, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(rollout_fast, CPU, m) { m.impl("topk_gather", &topk_gather_cpu); }

}  // namespace rollout_fast
