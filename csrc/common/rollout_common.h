// Per-element logic of the fused attention rollout, shared by the C++ CPU kernel (cpu/rollout_cpu.cpp)
// and the CUDA kernels (cuda/rollout_cuda_kernels.cu): head fusion, the discard count and threshold
// selection (radix select over order-preserving float keys), discard + residual, readout vector and
// per-sample map normalisation. Every function is `__host__ __device__` inline, so the CPU tests
// exercise exactly the code the GPU runs. Semantics: section 1 of docs/REFERENCE.md, implemented in
// plain PyTorch by rollout_fast/reference.py.
//
// Only <cstdint>/<cmath>/<cstring> here: the header must compile under g++ and nvcc without torch.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define RF_HD __host__ __device__ __forceinline__
#else
#define RF_HD inline
#endif

namespace rollout_fast {

// ------------------------------------------------------------------------------------ modes
enum HeadFusion : int { kFusionMean = 0, kFusionMax = 1, kFusionMin = 2 };
enum Readout : int { kReadoutCls = 0, kReadoutMean = 1, kReadoutFull = 2 };
enum Normalize : int { kNormalizeNone = 0, kNormalizeMax = 1, kNormalizeMinMax = 2 };

// ------------------------------------------------------------------------------ head fusion
// F[i, j] = fusion over h of A[h, i, j], accumulated in float32 in head order h = 0..H-1:
//   acc = fusion_first(A[0]); acc = fusion_combine(acc, A[h]) for h >= 1; F = fusion_finish(acc, H).
// 'mean' sums and then divides by H (torch's CPU mean: sum, then true division).
RF_HD float fusion_first(float x) { return x; }

RF_HD float fusion_combine(int fusion, float acc, float x) {
  if (fusion == kFusionMean) return acc + x;
  if (fusion == kFusionMax) return x > acc ? x : acc;
  return x < acc ? x : acc;  // kFusionMin
}

RF_HD float fusion_finish(int fusion, float acc, int64_t heads) {
  return fusion == kFusionMean ? acc / static_cast<float>(heads) : acc;
}

// ------------------------------------------------------------------------------ input values
// The input contract on attention values (rollout_fast/reference/rollout_args.py): finite and >= 0
// (then rowsum(F + I) >= 1 and the row normalisation is well defined). A kernel ORs value_status over
// every value it reads and raises when the result is not kValuesOk, so the check rides on the one read.
// The CPU kernel also checks that every row of every head sums to 1 (kValueRowSum, row_sum_status) when
// the op passes a row tolerance.
enum ValueStatus : int { kValuesOk = 0, kValueNonFinite = 1, kValueNegative = 2, kValueRowSum = 4 };

// kValueNonFinite for NaN and +-inf (also for a float64 input beyond the float32 range, which the
// float32 computation could not represent); kValueNegative for x < 0 (-inf too; -0.0 is not negative).
RF_HD int value_status(float x) {
  return (fabsf(x) <= 3.40282346638528859812e+38f ? kValuesOk : kValueNonFinite) |
         (x < 0.0f ? kValueNegative : kValuesOk);
}

// kValueRowSum when a row's sum is off 1 by more than tol (or is NaN).
RF_HD int row_sum_status(float sum, float tol) { return fabsf(sum - 1.0f) <= tol ? kValuesOk : kValueRowSum; }

// ------------------------------------------------------------------------------- discard
// k = floor(r * N * N), evaluated left to right in double precision exactly like the reference's
// Python `int(math.floor(discard_ratio * N * N))`. The discard is active when k >= 1.
RF_HD int64_t discard_count(double ratio, int64_t n_tokens) {
  return static_cast<int64_t>(floor(ratio * static_cast<double>(n_tokens) * static_cast<double>(n_tokens)));
}

// Entries strictly below the threshold t become 0 (ties at t survive); a protected entry keeps its
// value. With no discard the caller passes t = -inf, which keeps every finite entry.
RF_HD float discard_apply(float v, float t, bool is_protected) {
  return (v < t && !is_protected) ? 0.0f : v;
}

// Residual: M_unnormalised = F + I.
RF_HD float residual_add(float v, int64_t i, int64_t j) { return i == j ? v + 1.0f : v; }

// Row normalisation: M[i, j] = m[i, j] * (1 / rowsum_i). The reference divides (`m / m.sum`); one
// reciprocal per row instead of a division per entry is within 1 ulp of it (the tests allow 1e-5).
RF_HD float row_inverse_sum(float row_sum) { return 1.0f / row_sum; }
RF_HD float row_normalize(float m, float inv_row_sum) { return m * inv_row_sum; }

// -------------------------------------------------------------- threshold selection (radix)
// The (k+1)-th smallest float (0-based rank k) is found by a most-significant-digit radix select over
// 32-bit keys that order like the floats: key(a) < key(b) iff a < b, for all non-NaN floats except
// that -0 orders just below +0 (both compare equal as floats, so the threshold's float value, and
// hence the `v < t` mask, is the same as with a float sort). Three digits: bits 31..21 (2048 bins:
// sign, exponent and 2 mantissa bits), 20..10 (2048 bins), 9..0 (1024 bins). Each pass histograms
// the digit of the keys that share the prefix chosen so far, then picks the bin holding the rank.
// The CUDA kernels use this digit schedule; the CPU kernel uses the same keys and radix_find_bin with
// digits fitted to a sampled bracket around the rank (rollout_cpu_impl.h, select_kth).
constexpr int kRadixPasses = 3;
constexpr uint32_t kRadixMaxBins = 2048;

RF_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
#endif
}

RF_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float v;
  memcpy(&v, &u, sizeof(v));
  return v;
#endif
}

RF_HD uint32_t float_to_key(float v) {
  const uint32_t u = float_bits(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

RF_HD float key_to_float(uint32_t key) {
  return bits_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

RF_HD int radix_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }
RF_HD uint32_t radix_bins(int pass) { return pass == 2 ? 1024u : 2048u; }
RF_HD uint32_t radix_digit(uint32_t key, int pass) {
  return (key >> radix_shift(pass)) & (radix_bins(pass) - 1u);
}

// True when `key` has the bits above this pass's digit equal to those of `prefix` (every key
// matches in pass 0).
RF_HD bool radix_prefix_match(uint32_t key, uint32_t prefix, int pass) {
  if (pass == 0) return true;
  const int above = radix_shift(pass - 1);  // lowest bit of the previous digit
  return (key >> above) == (prefix >> above);
}

RF_HD uint32_t radix_extend_prefix(uint32_t prefix, uint32_t bin, int pass) {
  return prefix | (bin << radix_shift(pass));
}

// Bin of `hist[0..nbins)` holding the 0-based `*rank`; `*rank` becomes the rank inside that bin.
// Requires sum(hist) > *rank (then the loop always returns inside).
RF_HD uint32_t radix_find_bin(const uint32_t* hist, uint32_t nbins, uint32_t* rank) {
  uint32_t below = 0;
  for (uint32_t b = 0; b < nbins; ++b) {
    if (below + hist[b] > *rank) {
      *rank -= below;
      return b;
    }
    below += hist[b];
  }
  return nbins - 1u;  // unreachable when the precondition holds
}

// ---------------------------------------------------------------------- readout and maps
// Readout row vector u with u^T R = the wanted row of R: 'cls' e_0; 'mean' the indicator of the
// patch rows i >= P (the division by G = N - P comes at the end, as the reference's mean does).
RF_HD float readout_init(int readout, int64_t i, int64_t num_prefix) {
  if (readout == kReadoutCls) return i == 0 ? 1.0f : 0.0f;
  return i >= num_prefix ? 1.0f : 0.0f;
}

RF_HD float readout_finish(int readout, float v, int64_t num_patches) {
  return readout == kReadoutMean ? v / static_cast<float>(num_patches) : v;
}

// Per-sample map normalisation given the map's min `lo` and max `hi`: 'max' m / hi, 'minmax'
// (m - lo) / (hi - lo), none m; an all-zero (or flat, for minmax) map gives 0, never NaN.
RF_HD float normalize_value(int mode, float x, float lo, float hi) {
  if (mode == kNormalizeMax) return hi > 0.0f ? x / hi : 0.0f;
  if (mode == kNormalizeMinMax) {
    const float span = hi - lo;
    return span > 0.0f ? (x - lo) / span : 0.0f;
  }
  return x;
}

}  // namespace rollout_fast
