// Fused attention rollout on the CPU: the CPU bodies of the rollout_fast custom ops (schemas in ../ops.cpp)
//
//   rollout_fast::rollout(attentions (L, B, H, N, N) f16|bf16|f32|f64, head_fusion, discard_ratio,
//                         num_prefix_tokens, protect_prefix, readout, normalize, row_tolerance=None)
//       -> (B, N - P) float32 normalised maps for readout 'cls' | 'mean', (B, N, N) for 'full'
//   rollout_fast::fused_layers(attentions, head_fusion, discard_ratio, protect_first)
//       -> (L, B, N, N) float32 per-layer M_l = (discard(F_l) + I) / rowsum (steps 1-3)
//
// The input contract rides on the one read of the attention: NaN/inf and negative values raise (always),
// and with a row_tolerance so does a row of a head whose float32 sum is off 1 by more than it (summed in the
// head-fusion loop itself: one more add per loaded vector; rollout_fast/ops/rollout.py picks the tolerance).
//
// One pass per layer and sample fuses the H heads while reading the attention once (float32
// accumulation), selects the discard threshold on the fused N*N matrix (radix select, not a sort),
// applies discard + residual + row normalisation, and feeds the row-vector chain u^T M_L ... M_1 of the
// 'cls'/'mean' readouts (O(L N^2)): per sample when the batch fills the threads, else with the (layer,
// sample) matrices shared out among the threads (the split schedule: batch 1 on 2 threads); 'full' keeps
// every M_l and multiplies them with at::bmm. The kernel (rollout_cpu_impl.h) is compiled for the
// baseline ISA and, on x86-64, for AVX2+FMA+F16C, picked at run time (the AVX2 build also has AVX-512VL
// versions of the head fusion and the bracket gather, used where cpu_isa() says "avx512"); with
// -ffp-contract=off and fixed reduction orders all levels and schedules give the same bits.
// Per-element logic: common/rollout_common.h (shared with the CUDA kernels).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/rollout_common.h"
#include "common/rollout_op.h"

namespace rollout_fast {

// Schedules of the 'cls' / 'mean' readouts (rollout_cpu_impl.h).
enum Schedule : int { kSchedulePerSample = 0, kScheduleSplit = 1, kScheduleSplitHandoff = 2 };

struct Problem {
  int64_t L, B, H, N, k;
  int64_t sL, sB, sH, sI;  // element strides of the attention (the last stride is 1)
  int fusion;
  bool protect00;  // keep F[b, 0, 0] out of the discard
  bool avx512;     // the AVX2 build may use AVX-512VL for the head fusion and the threshold's bracket gather
  float row_tol;   // check |row sum - 1| <= row_tol for every row of every head; < 0: no row check
};

namespace cpu_base {
#include "rollout_cpu_impl.h"
}  // namespace cpu_base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__FLT16_MAX__)
#define ROLLOUT_FAST_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace cpu_avx2 {
#define ROLLOUT_CPU_F16C 1
#include "rollout_cpu_impl.h"
#undef ROLLOUT_CPU_F16C
}  // namespace cpu_avx2
#pragma GCC pop_options
#endif

// The instruction set the kernel runs with: "avx512" (the AVX2 build, plus AVX-512VL in the head fusion and
// the threshold's bracket gather) where the CPU also has AVX-512F/VL, "avx2" where it has AVX2, FMA and
// F16C, else "baseline". ROLLOUT_FAST_CPU_ISA=avx2 or =baseline caps it (tests compare the three: same bits); another
// value raises ValueError (a typo must not silently leave the kernel at a level nobody asked for).
const char* cpu_isa() {
  const char* env = std::getenv("ROLLOUT_FAST_CPU_ISA");
  const std::string_view forced = env != nullptr ? env : "";
  TORCH_CHECK_VALUE(forced.empty() || forced == "avx512" || forced == "avx2" || forced == "baseline",
                    "ROLLOUT_FAST_CPU_ISA: expected 'avx512', 'avx2' or 'baseline' (or unset), got '", forced, "'");
#if defined(ROLLOUT_FAST_HAVE_AVX2)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  if (avx512 && forced != "avx2" && forced != "baseline") return "avx512";
  if (avx2 && forced != "baseline") return "avx2";
#endif
  return "baseline";
}

// Calls of the CPU kernel per schedule since the library was loaded (rollout_fast._C.cpu_schedule_counts(),
// for tests: which schedule ran, and whether the split one shared its matrices out among threads).
namespace {
enum ScheduleCount : int { kCountPerSample = 0, kCountSplit = 1, kCountSplitShared = 2, kCountLayers = 3, kCounts = 4 };
std::atomic<int64_t> schedule_counts[kCounts];

void count_schedule(int which) { schedule_counts[which].fetch_add(1, std::memory_order_relaxed); }
}  // namespace

std::map<std::string, int64_t> cpu_schedule_counts() {
  // 'split': every call of the split schedule; 'split_shared': those in which more than one thread took part
  // (prepared a matrix or ran a chain: how many do depends on when the threads start)
  return {{"per_sample", schedule_counts[kCountPerSample].load()},
          {"split", schedule_counts[kCountSplit].load() + schedule_counts[kCountSplitShared].load()},
          {"split_shared", schedule_counts[kCountSplitShared].load()},
          {"layers", schedule_counts[kCountLayers].load()}};
}

// The schedule of the 'cls' / 'mean' readouts (a Schedule of rollout_cpu_impl.h): the per-sample one when the
// batch fills the threads, else the split one. ROLLOUT_FAST_CPU_SCHEDULE=per_sample, =split or =split_handoff
// (tests: the split schedule in which threads that run chains only wait for the matrices other threads
// prepare) forces one (all give the same bits for any batch and thread count); another value raises ValueError.
int cpu_schedule(int64_t batch) {
  const char* env = std::getenv("ROLLOUT_FAST_CPU_SCHEDULE");
  const std::string_view forced = env != nullptr ? env : "";
  TORCH_CHECK_VALUE(forced.empty() || forced == "per_sample" || forced == "split" || forced == "split_handoff",
                    "ROLLOUT_FAST_CPU_SCHEDULE: expected 'per_sample', 'split' or 'split_handoff' (or unset), got '",
                    forced, "'");
  if (forced == "per_sample") return kSchedulePerSample;
  if (forced == "split") return kScheduleSplit;
  if (forced == "split_handoff") return kScheduleSplitHandoff;
  return batch < at::get_num_threads() ? kScheduleSplit : kSchedulePerSample;
}

namespace {

// ROLLOUT_DISPATCH(status, att, fusion, FN, args...) sets status = cpu_{base,avx2}::FN<scalar_t, FUSION>(data, args...)
// for the attention's dtype, the head fusion and the ISA of cpu_isa().
#if defined(ROLLOUT_FAST_HAVE_AVX2)
#define ROLLOUT_ISA_CALL(FN, T, FUSION, ...)                                  \
  (std::string_view(cpu_isa()) != "baseline" ? cpu_avx2::FN<T, FUSION>(__VA_ARGS__) \
                                              : cpu_base::FN<T, FUSION>(__VA_ARGS__))
#else
#define ROLLOUT_ISA_CALL(FN, T, FUSION, ...) cpu_base::FN<T, FUSION>(__VA_ARGS__)
#endif

#define ROLLOUT_DISPATCH(status, att, fusion, FN, ...)                                                  \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (att).scalar_type(), "rollout_fast_cpu", [&] { \
    const scalar_t* data = (att).const_data_ptr<scalar_t>();                                           \
    switch (fusion) {                                                                                  \
      case kFusionMean: status = ROLLOUT_ISA_CALL(FN, scalar_t, kFusionMean, data, __VA_ARGS__); break; \
      case kFusionMax: status = ROLLOUT_ISA_CALL(FN, scalar_t, kFusionMax, data, __VA_ARGS__); break;   \
      default: status = ROLLOUT_ISA_CALL(FN, scalar_t, kFusionMin, data, __VA_ARGS__); break;          \
    }                                                                                                  \
  })

// The input contract (rollout_common.h, ValueStatus), checked during the kernel's one read of the attention.
// rollout_fast/ops/rollout.py recognises these messages by their common start.
void check_value_status(int status) {
  TORCH_CHECK(!(status & kValueNonFinite), "rollout_fast: attentions contains NaN or infinite values");
  TORCH_CHECK(!(status & kValueNegative), "rollout_fast: attentions contains negative values (attention "
              "probabilities are >= 0)");
  TORCH_CHECK(!(status & kValueRowSum), "rollout_fast: attentions contains a row that does not sum to 1 within "
              "row_tolerance");
}

Problem make_problem(const at::Tensor& att, const LayerShape& s, int fusion, bool protect00, float row_tol) {
  return {s.L, s.B, s.H, s.N, s.k, att.stride(0), att.stride(1), att.stride(2), att.stride(3), fusion,
          protect00, std::string_view(cpu_isa()) == "avx512", row_tol};
}

at::Tensor inner_contiguous(const at::Tensor& att) {
  return att.stride(4) == 1 ? att : att.contiguous();
}

void check_cpu(const at::Tensor& att) {
  TORCH_CHECK(att.device().is_cpu(), "rollout_fast: expected a CPU tensor, got ", att.device());
}

// ------------------------------------------------------------------------------ op bodies
at::Tensor fused_layers_impl(const at::Tensor& attentions, std::string_view head_fusion, double discard_ratio,
                             bool protect_first, float row_tol) {
  check_cpu(attentions);
  const LayerShape s = check_attentions(attentions, discard_ratio);
  const int fusion = parse_head_fusion(head_fusion);
  const at::Tensor att = inner_contiguous(attentions);
  at::Tensor M = at::empty({s.L, s.B, s.N, s.N}, att.options().dtype(at::kFloat));
  float* m = M.data_ptr<float>();
  const Problem p = make_problem(att, s, fusion, protect_first, row_tol);
  int status = kValuesOk;
  ROLLOUT_DISPATCH(status, att, fusion, run_layers, p, m);
  count_schedule(kCountLayers);
  check_value_status(status);
  return M;
}

at::Tensor fused_layers_cpu(const at::Tensor& attentions, std::string_view head_fusion, double discard_ratio,
                            bool protect_first) {
  return fused_layers_impl(attentions, head_fusion, discard_ratio, protect_first, -1.0f);
}

at::Tensor rollout_cpu(const at::Tensor& attentions, std::string_view head_fusion, double discard_ratio,
                       int64_t num_prefix_tokens, bool protect_prefix, std::string_view readout,
                       std::optional<std::string_view> normalize, std::optional<double> row_tolerance) {
  check_cpu(attentions);
  const LayerShape s = check_attentions(attentions, discard_ratio);
  const int fusion = parse_head_fusion(head_fusion);
  const int ro = parse_readout(readout);
  const int norm = parse_normalize(normalize);
  const float row_tol = parse_row_tolerance(row_tolerance);
  check_prefix(s.N, num_prefix_tokens, ro);
  const bool protect00 = protect_prefix && num_prefix_tokens >= 1;
  if (ro == kReadoutFull) {
    return rollout_matrix_chain(fused_layers_impl(attentions, head_fusion, discard_ratio, protect00, row_tol));
  }
  const at::Tensor att = inner_contiguous(attentions);
  const int64_t G = s.N - num_prefix_tokens;
  at::Tensor out = at::empty({s.B, G}, att.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const Problem p = make_problem(att, s, fusion, protect00, row_tol);
  const int schedule = cpu_schedule(s.B);
  int status = kValuesOk, threads_used = 1;
  ROLLOUT_DISPATCH(status, att, fusion, run_rollout, p, num_prefix_tokens, ro, norm, schedule, o, &threads_used);
  count_schedule(schedule == kSchedulePerSample ? kCountPerSample
                                                : (threads_used > 1 ? kCountSplitShared : kCountSplit));
  check_value_status(status);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rollout_fast, CPU, m) {
  m.impl("rollout", &rollout_cpu);
  m.impl("fused_layers", &fused_layers_cpu);
}

}  // namespace rollout_fast
