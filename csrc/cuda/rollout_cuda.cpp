// CUDA bodies of the rollout_fast custom ops (schemas in ../ops.cpp): argument checks,
// allocation, launches on the current stream (rollout_cuda_kernels.cu) and launch-error checks, so a
// failed launch raises a Python RuntimeError instead of returning garbage. Compiled only when the
// extension is built with CUDA (setup.py).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "rollout_cuda.h"
#include "common/rollout_op.h"

namespace rollout_fast {
namespace {

int in_dtype(const at::Tensor& att) {
  switch (att.scalar_type()) {
    case at::kHalf: return cuda::kInFloat16;
    case at::kBFloat16: return cuda::kInBFloat16;
    case at::kDouble: return cuda::kInFloat64;
    default: return cuda::kInFloat32;
  }
}

void check_cuda(const at::Tensor& att) {
  TORCH_CHECK(att.device().is_cuda(), "rollout_fast: expected a CUDA tensor, got ", att.device());
}

cuda::Problem make_problem(const at::Tensor& att, const LayerShape& s, int fusion, bool protect00) {
  return {s.L, s.B, s.H, s.N, s.k, att.stride(0), att.stride(1), att.stride(2), att.stride(3), fusion,
          protect00};
}

// Steps 1-3: (L, B, N, N) float32 M_l on the attention's device.
at::Tensor layers_cuda(const at::Tensor& attentions, const LayerShape& s, int fusion, bool protect00) {
  const at::Tensor att = attentions.stride(4) == 1 ? attentions : attentions.contiguous();
  const cuda::Problem p = make_problem(att, s, fusion, protect00);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(att.device().index()).stream();
  const auto f32 = att.options().dtype(at::kFloat);
  at::Tensor M = at::empty({s.L, s.B, s.N, s.N}, f32);
  at::Tensor hist0, thresh;
  if (s.k >= 1) {
    hist0 = at::zeros({s.L * s.B, static_cast<int64_t>(kRadixMaxBins)}, att.options().dtype(at::kInt));
    thresh = at::empty({s.L * s.B}, f32);
  }
  uint32_t* hist_ptr = s.k >= 1 ? reinterpret_cast<uint32_t*>(hist0.data_ptr<int32_t>()) : nullptr;
  float* thresh_ptr = s.k >= 1 ? thresh.data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(cuda::launch_fuse(att.const_data_ptr(), in_dtype(att), p, M.data_ptr<float>(), hist_ptr, stream));
  if (s.k >= 1) C10_CUDA_CHECK(cuda::launch_select(M.data_ptr<float>(), hist_ptr, p, thresh_ptr, stream));
  C10_CUDA_CHECK(cuda::launch_normalize(M.data_ptr<float>(), thresh_ptr, p, stream));
  return M;
}

at::Tensor fused_layers_cuda(const at::Tensor& attentions, std::string_view head_fusion, double discard_ratio,
                             bool protect_first) {
  check_cuda(attentions);
  const LayerShape s = check_attentions(attentions, discard_ratio);
  const int fusion = parse_head_fusion(head_fusion);
  const c10::cuda::CUDAGuard guard(attentions.device());
  return layers_cuda(attentions, s, fusion, protect_first);
}

at::Tensor rollout_cuda(const at::Tensor& attentions, std::string_view head_fusion, double discard_ratio,
                        int64_t num_prefix_tokens, bool protect_prefix, std::string_view readout,
                        std::optional<std::string_view> normalize, std::optional<double> row_tolerance) {
  check_cuda(attentions);
  TORCH_CHECK(!row_tolerance.has_value(), "rollout_fast: the CUDA rollout kernels do not check row sums "
              "(row_tolerance must be None; rollout_fast.attention_rollout checks them before the launch)");
  const LayerShape s = check_attentions(attentions, discard_ratio);
  const int fusion = parse_head_fusion(head_fusion);
  const int ro = parse_readout(readout);
  const int norm = parse_normalize(normalize);
  check_prefix(s.N, num_prefix_tokens, ro);
  const bool protect00 = protect_prefix && num_prefix_tokens >= 1;
  const c10::cuda::CUDAGuard guard(attentions.device());
  at::Tensor M = layers_cuda(attentions, s, fusion, protect00);
  if (ro == kReadoutFull) {
    return rollout_matrix_chain(M);
  }
  const cuda::Problem p = make_problem(attentions, s, fusion, protect00);
  const auto f32 = attentions.options().dtype(at::kFloat);
  at::Tensor v = at::empty({2, s.B, s.N}, f32);
  at::Tensor out = at::empty({s.B, s.N - num_prefix_tokens}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(attentions.device().index()).stream();
  C10_CUDA_CHECK(cuda::launch_chain(M.data_ptr<float>(), p, num_prefix_tokens, ro, norm, v[0].data_ptr<float>(),
                                    v[1].data_ptr<float>(), out.data_ptr<float>(), stream));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rollout_fast, CUDA, m) {
  m.impl("rollout", &rollout_cuda);
  m.impl("fused_layers", &fused_layers_cuda);
}

}  // namespace rollout_fast
