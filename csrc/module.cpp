// The private pybind11 module rollout_fast._C. Importing it loads this shared library, whose static
// initialisers register the custom ops torch.ops.rollout_fast.{rollout, fused_layers} (schemas and
// CPU bodies in rollout_cpu.cpp, CUDA bodies in rollout_cuda.cpp when built with CUDA). The module
// itself only reports how it was built; the ops are the interface (see rollout_fast/kernels/_ext.py).

#include <pybind11/pybind11.h>

#include <string>

#ifndef ROLLOUT_FAST_WITH_CUDA
#define ROLLOUT_FAST_WITH_CUDA 0
#endif

namespace rollout_fast {
const char* cpu_isa();  // rollout_cpu.cpp
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "rollout_fast compiled kernels (private; use rollout_fast.attention_rollout)";
  m.def("cuda_built", []() { return ROLLOUT_FAST_WITH_CUDA != 0; },
        "True when the CUDA kernels were compiled into this extension.");
  m.def("cpu_isa", []() { return std::string(rollout_fast::cpu_isa()); },
        "Instruction set the CPU kernel runs with: 'avx2' (AVX2+FMA+F16C build) or 'baseline'; "
        "ROLLOUT_FAST_CPU_ISA=baseline forces the baseline build.");
}
