// The private extension module rollout_fast._C and the schemas of every compiled rollout_fast custom op.
//
// Importing rollout_fast._C loads this shared library, whose static initialisers register the ops: the
// schemas here (one TORCH_LIBRARY, one Python module for their fake kernels), the bodies per device with
// TORCH_LIBRARY_IMPL in cpu/ (always) and cuda/ (when built with CUDA):
//
//   rollout(attentions (L, B, H, N, N), head_fusion, discard_ratio, num_prefix_tokens, protect_prefix,
//           readout, normalize, row_tolerance=None) -> (B, N - P) float32 maps ('cls' | 'mean'), (B, N, N)
//           ('full'); row_tolerance: check |sum_j A[l, b, h, i, j] - 1| <= it for every row during the read
//           (CPU only; None: no row check)                         cpu/rollout_cpu.cpp, cuda/rollout_cuda.cpp
//   fused_layers(attentions, head_fusion, discard_ratio, protect_first) -> (L, B, N, N) float32 M_l
//                                                                  cpu/rollout_cpu.cpp, cuda/rollout_cuda.cpp
//   topk_gather(tokens (B, N, D), scores (B, G) float32, k, num_prefix_tokens)
//       -> (kept (B, P + k, D), indices (B, k) int64)                cpu/gather_cpu.cpp, cuda/gather_cuda.cu
//
// Host and device logic shared by both devices: common/. The fake (meta) kernels and autograd formulas
// live in rollout_fast/ops/meta.py, named below with set_python_module so torch imports it when it needs
// them. The pybind11 module itself only reports how it was built; the ops are the interface
// (rollout_fast/ops/_ext.py loads it).

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <cstdint>
#include <map>
#include <string>

#ifndef ROLLOUT_FAST_WITH_CUDA
#define ROLLOUT_FAST_WITH_CUDA 0
#endif

namespace rollout_fast {
const char* cpu_isa();                                 // cpu/rollout_cpu.cpp
std::map<std::string, int64_t> cpu_schedule_counts();  // cpu/rollout_cpu.cpp
}

TORCH_LIBRARY(rollout_fast, m) {
  m.set_python_module("rollout_fast.ops.meta");  // holds the fake (meta) kernels and autograd formulas
  m.def("rollout(Tensor attentions, str head_fusion, float discard_ratio, int num_prefix_tokens, "
        "bool protect_prefix, str readout, str? normalize, float? row_tolerance=None) -> Tensor");
  m.def("fused_layers(Tensor attentions, str head_fusion, float discard_ratio, bool protect_first) "
        "-> Tensor");
  m.def("topk_gather(Tensor tokens, Tensor scores, int k, int num_prefix_tokens) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "rollout_fast compiled kernels (private; use rollout_fast.attention_rollout)";
  m.def("cuda_built", []() { return ROLLOUT_FAST_WITH_CUDA != 0; },
        "True when the CUDA kernels were compiled into this extension.");
  m.def("cpu_isa", []() { return std::string(rollout_fast::cpu_isa()); },
        "Instruction set the CPU kernel runs with: 'avx512', 'avx2' (AVX2+FMA+F16C build) or 'baseline'; "
        "ROLLOUT_FAST_CPU_ISA=avx2|baseline caps it.");
  m.def("cpu_schedule_counts", []() { return rollout_fast::cpu_schedule_counts(); },
        "Calls of the CPU rollout kernel per schedule since loading: 'per_sample' (batch >= threads), 'split' "
        "(fewer samples than threads: the matrices shared out among the threads), 'split_shared' (split calls in "
        "which more than one thread took part), 'layers' (stored per-layer matrices: readout 'full', "
        "fused_layers). For tests.");
}
