// The CPU rollout kernel, written once and compiled twice by rollout_cpu.cpp: for the baseline ISA and,
// on x86-64, for AVX2 + FMA + F16C (chosen at run time), by including this file inside
// `namespace rollout_fast::cpu_<isa>` under `#pragma GCC target`. No #include here: everything it uses
// (ATen parallel_for, <atomic>, <memory>, <thread>, <vector>, <limits>, <algorithm>, <type_traits>,
// rollout_common.h) is included before.
// ROLLOUT_CPU_F16C selects the vectorisable hardware float16 conversion.
//
// Schedules of the 'cls' / 'mean' readouts (both compute every entry, sum and product in the same order, so
// the result is bitwise the same for any thread count and either schedule):
//   per_sample: parallel over samples (batch >= threads); each sample runs its layers last to first with two
//               N*N scratches that stay in cache: select the threshold of the fused matrix, then normalise
//               each row the chain reads (v[i] != 0) on the fly and add it to the row-vector chain; with
//               contiguous rows the next matrix's heads are fused into the other scratch in slices between
//               these steps (FuseAhead: its read overlaps this compute).
//   split:      fewer samples than threads (batch 1 on 2 threads): every thread prepares (layer, sample)
//               matrices -- fusion, threshold, row scales -- claimed one at a time in the order the chains
//               consume them, into stored F; each sample's chain runs on as they become ready.
// `layers` (the 'full' readout and the fused_layers op): parallel over (layer, sample, run of whole rows) into
// a stored (L, B, N, N) M, then thresholds per matrix and row normalisation.
// All return a ValueStatus (rollout_common.h): the values' checks ride on the head fusion's read, and with a
// row tolerance (Problem::row_tol >= 0) so does the sum of every row of every head (fuse_span: one more add per
// loaded vector, one horizontal sum per row).

// ----------------------------------------------------------------------------- element loads
// Loads go through the raw storage type (uint16_t for float16/bfloat16), which the vectoriser handles
// (it does not vectorise loads of the c10::Half struct).
template <typename T>
struct Raw {
  using type = T;
};
template <>
struct Raw<c10::Half> {
  using type = uint16_t;
};
template <>
struct Raw<c10::BFloat16> {
  using type = uint16_t;
};

template <typename T>
inline float raw_to_float(typename Raw<T>::type x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return bits_float(static_cast<uint32_t>(x) << 16);  // exact: bfloat16 is a float32's top half
  } else if constexpr (std::is_same_v<T, c10::Half>) {
#if defined(ROLLOUT_CPU_F16C)
    _Float16 h;  // vectorises to vcvtph2ps
    memcpy(&h, &x, sizeof(h));
    return static_cast<float>(h);
#else
    return c10::detail::fp16_ieee_to_fp32_value(x);
#endif
  } else {
    return static_cast<float>(x);
  }
}

// ------------------------------------------------------------------------------ head fusion
// One read of the attention fuses the heads (step 1) and checks the input contract on the way: the values
// (finite, >= 0) always, and with a row tolerance (Problem::row_tol >= 0) the sum of every row of every head.
#if defined(ROLLOUT_CPU_F16C)  // the AVX2 build: 8 elements of a row as float32
template <typename T>
inline __m256 load8(const typename Raw<T>::type* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same_v<T, c10::Half>) return _mm256_cvtph_ps(h);
    else return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // bfloat16
  }
}

// fusion_combine / fusion_finish of rollout_common.h, 8 lanes (max/min keep acc on ties, as there)
template <int FUSION>
inline __m256 fusion_combine8(__m256 acc, __m256 x) {
  if (FUSION == kFusionMean) return _mm256_add_ps(acc, x);
  if (FUSION == kFusionMax) return _mm256_max_ps(x, acc);  // x > acc ? x : acc
  return _mm256_min_ps(x, acc);                            // x < acc ? x : acc
}

// Lanes [n, 8) set (0 <= n <= 8).
inline __m256 lanes_from(int64_t n) {
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                                _mm256_set1_epi32(static_cast<int32_t>(n - 1))));
}

// The value check in one instruction per loaded vector: the unsigned maximum of the values' bits. A float
// is finite and >= 0 (or +0.0) iff its bits are below 0x7f800000 as an unsigned integer: NaN and +inf
// reach it, and so does every value with its sign bit set (x < 0, -inf, -NaN, and -0.0, which is allowed:
// a maximum at or above 0x7f800000 sends the caller to value_scan for the exact status).
inline bool values_suspect(__m256i bits_max) {
  const __m256i limit = _mm256_set1_epi32(0x7f800000);
  return _mm256_movemask_epi8(_mm256_cmpeq_epi32(_mm256_max_epu32(bits_max, limit), bits_max)) != 0;
}

// The totals of the 8 lanes of each of s[0..8) (lane h: the total of s[h]), any summation order.
__attribute__((always_inline)) inline __m256 lane_totals8(const __m256* s) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// kValueRowSum when a lane total of s[0..8) is off 1 by more than tol, or NaN: row_sum_status of
// rollout_common.h for 8 row sums at once.
__attribute__((always_inline)) inline int row_sums_status8(const __m256* s, float tol) {
  const __m256 dev = _mm256_and_ps(_mm256_sub_ps(lane_totals8(s), _mm256_set1_ps(1.0f)),
                                   _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
  // not (|sum - 1| <= tol): NaN too
  return _mm256_movemask_ps(_mm256_cmp_ps(dev, _mm256_set1_ps(tol), _CMP_NLE_UQ)) != 0 ? kValueRowSum : kValuesOk;
}

// One step of the fusion over heads H0 <= h < H1 of HEADS: f[j .. j + 8) from the head streams at
// a + h * sH + j, side by side, the accumulator in a register. The first pass (H0 = 0) starts from head 0,
// a later one from the partial result the one before left in f; the last (H1 = HEADS) finishes it.
// bits_max takes the values' bits (the value check) and, with SUMS, s[h - H0] adds head h's values. TAIL: the
// last step of a row, overlapping the one before it: only the lanes of `keep` are new and added to the sums.
template <typename T, int FUSION, int H0, int H1, int HEADS, bool SUMS, bool TAIL>
__attribute__((always_inline)) inline void fuse_step8(const typename Raw<T>::type* __restrict__ a, int64_t sH,
                                                      int64_t j, float* __restrict__ f, __m256i& bits_max,
                                                      __m256* s, __m256 keep) {
  const __m256 partial = H0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(f + j);
  __m256 acc = partial;
#pragma GCC unroll 16
  for (int h = H0; h < H1; ++h) {
    const __m256 x = load8<T>(a + h * sH + j);
    acc = h == 0 ? x : fusion_combine8<FUSION>(acc, x);
    bits_max = _mm256_max_epu32(bits_max, _mm256_castps_si256(x));
    if constexpr (SUMS) s[h - H0] = _mm256_add_ps(s[h - H0], TAIL ? _mm256_and_ps(x, keep) : x);
  }
  if (FUSION == kFusionMean && H1 == HEADS) acc = _mm256_div_ps(acc, _mm256_set1_ps(static_cast<float>(HEADS)));
  // a first pass's overlapping lanes store the same values again; a later pass's keep this pass's results
  if constexpr (TAIL && H0 > 0) acc = _mm256_blendv_ps(partial, acc, keep);
  _mm256_storeu_ps(f + j, acc);
}

// One pass of fuse_span_body over heads H0 <= h < H1 of a span of n >= 8 elements; with SUMS, returns
// kValueRowSum when a head's row sum is off (s: the sums, padded to groups of 8 with vectors summing to 1).
template <typename T, int FUSION, int H0, int H1, int HEADS, bool SUMS>
__attribute__((always_inline)) inline int fuse_pass(const typename Raw<T>::type* __restrict__ a, int64_t sH,
                                                    int64_t n, float* __restrict__ f, __m256i& bits_max, float tol) {
  using R = typename Raw<T>::type;
  constexpr int64_t kAhead = 512 / sizeof(R) * 4;  // prefetch distance: 2 KiB of each head's stream
  constexpr int kS = SUMS ? (H1 - H0 + 7) / 8 * 8 : 8;
  __m256 s[kS];  // head H0 + q
#pragma GCC unroll 16
  for (int q = 0; q < kS; ++q) s[q] = q < H1 - H0 ? _mm256_setzero_ps() : _mm256_setr_ps(1, 0, 0, 0, 0, 0, 0, 0);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    if ((j & (64 / sizeof(R) - 1)) == 0)
      for (int64_t h = H0; h < H1; ++h) __builtin_prefetch(a + h * sH + j + kAhead, 0, 3);
    fuse_step8<T, FUSION, H0, H1, HEADS, SUMS, false>(a, sH, j, f, bits_max, s, _mm256_setzero_ps());
  }
  if (j < n) fuse_step8<T, FUSION, H0, H1, HEADS, SUMS, true>(a, sH, n - 8, f, bits_max, s, lanes_from(j - (n - 8)));
  int status = kValuesOk;
  if constexpr (SUMS)
    for (int g = 0; g < kS; g += 8) status |= row_sums_status8(s + g, tol);
  return status;
}
#endif

// The exact ValueStatus of a[h * sH + j], h < H, j < n (value_status of rollout_common.h ORed): the closer
// look behind the AVX2 build's one-instruction check, which also flags -0.0 (rare in attention).
template <typename T>
int value_scan(const typename Raw<T>::type* a, int64_t sH, int64_t H, int64_t n) {
  int status = kValuesOk;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t j = 0; j < n; ++j) status |= value_status(raw_to_float<T>(a[h * sH + j]));
  return status;
}

// f[0..n) = head fusion over h of a[h * sH + j], float32, heads combined in order h = 0..H-1 (every loop
// order and ISA gives the same bits): a row, or with tol < 0 any run of n elements. Returns the ValueStatus
// of the values read: the value checks, and with tol >= 0 the row check (each head's n values summed in
// float32, in any order: the op's tolerance leaves room for it, ops/rollout.py). Heads outermost with f in
// cache (the baseline build, float64, and the AVX2 build's rows of an uncommon head count); 8 partial sums.
template <typename T, int FUSION>
int fuse_span_generic(const typename Raw<T>::type* __restrict__ a, int64_t sH, int64_t H, int64_t n,
                      float* __restrict__ f, float tol, int64_t rows = 1, int64_t sI = 0) {
  if (rows != 1) {
    int status = kValuesOk;
    for (int64_t r = 0; r < rows; ++r) status |= fuse_span_generic<T, FUSION>(a + r * sI, sH, H, n, f + r * n, tol);
    return status;
  }
  int status = kValuesOk;  // integer OR reduction: vectorises
  for (int64_t h = 0; h < H; ++h) {
    const typename Raw<T>::type* __restrict__ ah = a + h * sH;
    float part[8] = {};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      for (int q = 0; q < 8; ++q) {
        const float x = raw_to_float<T>(ah[j + q]);
        f[j + q] = h == 0 ? fusion_first(x) : fusion_combine(FUSION, f[j + q], x);
        status |= value_status(x);
        part[q] += x;
      }
    }
    for (int q = 0; j < n; ++j, ++q) {
      const float x = raw_to_float<T>(ah[j]);
      f[j] = h == 0 ? fusion_first(x) : fusion_combine(FUSION, f[j], x);
      status |= value_status(x);
      part[q] += x;
    }
    if (tol >= 0.0f)
      status |= row_sum_status(
          ((part[0] + part[4]) + (part[2] + part[6])) + ((part[1] + part[5]) + (part[3] + part[7])), tol);
  }
  if (FUSION == kFusionMean) {
    for (int64_t j = 0; j < n; ++j) f[j] = fusion_finish(FUSION, f[j], H);
  }
  return status;
}

#if defined(ROLLOUT_CPU_F16C)
// fuse_span_generic's contract, AVX2, n >= 8: the H head streams side by side, 8 elements per step (the
// last step ends at n, overlapping the one before), each stream prefetched 2 KiB ahead. HEADS: the head
// count as a compile-time constant (0: the runtime H, without sums), so the heads unroll into straight-line
// loads and, with SUMS, the per-head sums live in registers: one add per loaded vector and one horizontal
// sum per row and head. With SUMS, more than PER_PASS heads go in two passes over the row (the second
// continues from the partial result in f, which stays in L1: the same bits), so that the sums fit in the
// vector registers.
template <typename T, int FUSION, int HEADS, bool SUMS, int PER_PASS>
__attribute__((always_inline)) inline int fuse_span_body(const typename Raw<T>::type* __restrict__ a, int64_t sH,
                                                         int64_t H_runtime, int64_t n, float* __restrict__ f,
                                                         float tol, int64_t rows, int64_t sI) {
  using R = typename Raw<T>::type;
  __m256i bits_max = _mm256_setzero_si256();
  int status = kValuesOk;
  for (int64_t r = 0; r < rows; ++r) {
    const R* __restrict__ ar = a + r * sI;
    float* __restrict__ fr = f + r * n;
    if constexpr (HEADS > 0 && (!SUMS || HEADS <= PER_PASS)) {
      status |= fuse_pass<T, FUSION, 0, HEADS, HEADS, SUMS>(ar, sH, n, fr, bits_max, tol);
    } else if constexpr (HEADS > 0) {
      constexpr int kHalf = (HEADS + 1) / 2;
      status |= fuse_pass<T, FUSION, 0, kHalf, HEADS, SUMS>(ar, sH, n, fr, bits_max, tol) |
                fuse_pass<T, FUSION, kHalf, HEADS, HEADS, SUMS>(ar, sH, n, fr, bits_max, tol);
    } else {  // a runtime head count (no sums): the same steps with a head loop
      constexpr int64_t kAhead = 512 / sizeof(R) * 4;
      const int64_t H = H_runtime;
      const __m256 heads = _mm256_set1_ps(static_cast<float>(H));
      for (int64_t j = 0;; j += 8) {
        if (j + 8 > n) {
          if (j >= n) break;
          j = n - 8;  // the overlapping last step: its first lanes store the same values again
        }
        if ((j & (64 / sizeof(R) - 1)) == 0)
          for (int64_t h = 0; h < H; ++h) __builtin_prefetch(ar + h * sH + j + kAhead, 0, 3);
        __m256 x = load8<T>(ar + j);
        __m256 acc = x;
        bits_max = _mm256_max_epu32(bits_max, _mm256_castps_si256(x));
        for (int64_t h = 1; h < H; ++h) {
          x = load8<T>(ar + h * sH + j);
          acc = fusion_combine8<FUSION>(acc, x);
          bits_max = _mm256_max_epu32(bits_max, _mm256_castps_si256(x));
        }
        if (FUSION == kFusionMean) acc = _mm256_div_ps(acc, heads);
        _mm256_storeu_ps(fr + j, acc);
      }
    }
  }
  if (values_suspect(bits_max))
    for (int64_t r = 0; r < rows; ++r) status |= value_scan<T>(a + r * sI, sH, HEADS > 0 ? HEADS : H_runtime, n);
  return status;
}

// The AVX2 registers (16) hold the sums of up to 8 heads beside the fusion's, so more heads take two passes
// with bfloat16/float16 input (~7% faster with the row check at ViT-B's 12 heads on this project's CPU); with
// float32 one pass spilling some sums to L1 measured faster (two passes: ~25% slower).
template <typename T, int FUSION, int HEADS, bool SUMS>
int fuse_span_avx2(const typename Raw<T>::type* a, int64_t sH, int64_t H, int64_t n, float* f, float tol,
                   int64_t rows, int64_t sI) {
  return fuse_span_body<T, FUSION, HEADS, SUMS, std::is_same_v<T, float> ? 16 : 8>(a, sH, H, n, f, tol, rows, sI);
}

// The same loop where the CPU has AVX-512VL (Problem::avx512): 32 vector registers hold 16 heads' sums in one
// pass; still 256-bit vectors, the same instructions otherwise, the same bits.
template <typename T, int FUSION, int HEADS, bool SUMS>
__attribute__((target("avx2,fma,f16c,avx512f,avx512vl"))) int fuse_span_avx512(
    const typename Raw<T>::type* a, int64_t sH, int64_t H, int64_t n, float* f, float tol, int64_t rows, int64_t sI) {
  return fuse_span_body<T, FUSION, HEADS, SUMS, 16>(a, sH, H, n, f, tol, rows, sI);
}

template <typename T, int FUSION, bool SUMS, bool AVX512>
int fuse_span_heads(const typename Raw<T>::type* a, int64_t sH, int64_t H, int64_t n, float* f, float tol,
                    int64_t rows, int64_t sI) {
#define RF_FUSE_SPAN(HEADS)                                                             \
  (AVX512 ? fuse_span_avx512<T, FUSION, HEADS, SUMS>(a, sH, H, n, f, tol, rows, sI) \
          : fuse_span_avx2<T, FUSION, HEADS, SUMS>(a, sH, H, n, f, tol, rows, sI))
  switch (H) {
    case 1: return RF_FUSE_SPAN(1);
    case 3: return RF_FUSE_SPAN(3);
    case 4: return RF_FUSE_SPAN(4);
    case 6: return RF_FUSE_SPAN(6);
    case 8: return RF_FUSE_SPAN(8);
    case 12: return RF_FUSE_SPAN(12);
    case 16: return RF_FUSE_SPAN(16);
    default:
      if constexpr (SUMS) return fuse_span_generic<T, FUSION>(a, sH, H, n, f, tol, rows, sI);
      else return RF_FUSE_SPAN(0);
  }
#undef RF_FUSE_SPAN
}
#endif

// Head fusion of `rows` spans of n elements (the r-th at a + r * sI, into f + r * n), dispatched: the AVX2 loop
// with the head count compiled in for the common ViT head counts 1, 3, 4, 6, 8, 12, 16 (measured on DeiT-S
// shapes, 2 threads: with a runtime head loop per 8 elements the pipelined op ran at ~1.8x the memory floor,
// with the constant ~1.45x), its AVX-512VL build where `avx512`, the generic loop for float64, the baseline
// build and spans shorter than 8. tol >= 0: each span is a row and its sums are checked.
template <typename T, int FUSION>
int fuse_span(const T* a_typed, int64_t sH, int64_t H, int64_t n, float* __restrict__ f, float tol, bool avx512,
              int64_t rows = 1, int64_t sI = 0) {
  using R = typename Raw<T>::type;
  const R* a = reinterpret_cast<const R*>(a_typed);
#if defined(ROLLOUT_CPU_F16C)
  if constexpr (!std::is_same_v<T, double>) {
    if (n >= 8) {
      if (avx512) {
        return tol >= 0.0f ? fuse_span_heads<T, FUSION, true, true>(a, sH, H, n, f, tol, rows, sI)
                           : fuse_span_heads<T, FUSION, false, true>(a, sH, H, n, f, tol, rows, sI);
      }
      return tol >= 0.0f ? fuse_span_heads<T, FUSION, true, false>(a, sH, H, n, f, tol, rows, sI)
                         : fuse_span_heads<T, FUSION, false, false>(a, sH, H, n, f, tol, rows, sI);
    }
  }
#endif
  (void)avx512;
  return fuse_span_generic<T, FUSION>(a, sH, H, n, f, tol, rows, sI);
}

// Head fusion of a contiguous run of n elements without the row check (e.g. a whole (N, N) matrix with
// unit row stride). The AVX2 build reads the whole run in one go (H streams side by side, prefetched); the
// generic loop goes in chunks of kFuseChunk elements, heads outermost, so each head's chunk is one
// sequential read and the chunk of f stays in L1. Every split gives the same bits.
constexpr int64_t kFuseChunk = 2048;

template <typename T, int FUSION>
int fuse_run(const T* a, int64_t sH, int64_t H, int64_t n, float* __restrict__ f, bool avx512) {
#if defined(ROLLOUT_CPU_F16C)
  if constexpr (!std::is_same_v<T, double>) return fuse_span<T, FUSION>(a, sH, H, n, f, -1.0f, avx512);
#endif
  int status = kValuesOk;
  for (int64_t c0 = 0; c0 < n; c0 += kFuseChunk)
    status |= fuse_span<T, FUSION>(a + c0, sH, H, std::min(kFuseChunk, n - c0), f + c0, -1.0f, avx512);
  return status;
}

// Row i of the unnormalised M: m_ij = discard(F_ij) + [i == j], F[0, 0] kept when protect00 (t = -inf
// when nothing is discarded), as in rollout_common.h (discard_apply, residual_add).
inline float m_entry(float f, int64_t i, int64_t j, float t, bool protect00) {
  return residual_add(discard_apply(f, t, protect00 && i == 0 && j == 0), i, j);
}

#if defined(ROLLOUT_CPU_F16C)  // the AVX2 build: m_entry for 8 consecutive j = j0 .. j0 + 7
struct RowEntries {
  __m256 t, one, keep_lane0;
  __m256i diag, iota;
  int64_t diag_block;  // j0 of the 8 entries holding j = i (and j = 0 when i = 0)
  bool keep00;
  RowEntries(int64_t i, float thresh, bool protect00)
      : t(_mm256_set1_ps(thresh)), one(_mm256_set1_ps(1.0f)),
        keep_lane0(_mm256_castsi256_ps(_mm256_setr_epi32(0, -1, -1, -1, -1, -1, -1, -1))),
        diag(_mm256_set1_epi32(static_cast<int32_t>(i))), iota(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
        diag_block(i / 8 * 8), keep00(protect00 && i == 0) {}
  __m256 operator()(const float* row, int64_t j0) const { return entries(_mm256_loadu_ps(row + j0), j0); }
  // lanes [0, valid) of row[j0 ..] (the rest read as 0): the end of a row
  __m256 operator()(const float* row, int64_t j0, __m256i valid) const {
    return entries(_mm256_maskload_ps(row + j0, valid), j0);
  }
  __m256 entries(__m256 f, int64_t j0) const {
    __m256 drop = _mm256_cmp_ps(f, t, _CMP_LT_OQ);
    if (j0 != diag_block) return _mm256_andnot_ps(drop, f);  // 8 ordinary entries: discard only
    if (keep00) drop = _mm256_and_ps(drop, keep_lane0);      // the block of the diagonal (and of (0, 0))
    const __m256 d = _mm256_andnot_ps(drop, f);
    const __m256i j = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(j0)), iota);
    return _mm256_blendv_ps(d, _mm256_add_ps(d, one), _mm256_castsi256_ps(_mm256_cmpeq_epi32(j, diag)));
  }
};

// Lanes [0, n) of 8 set (n <= 8).
inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

// 1 / sum_j m_ij for the fused row F_i (row_normalize's scale), the sum in a fixed order: 32 interleaved
// partial sums (lane q takes j = q mod 32; four 8-lane accumulators, not one latency-bound chain),
// then a fixed tree. Every ISA build gives the same bits. Reads the row only.
inline float row_scale(const float* __restrict__ row, int64_t N, int64_t i, float t, bool protect00) {
  int64_t j = 0;
#if defined(ROLLOUT_CPU_F16C)  // the same sums, the 32 lanes in four registers, the tree in registers
  const RowEntries m(i, t, protect00);
  __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (; j + 32 <= N; j += 32)
    for (int u = 0; u < 4; ++u) a[u] = _mm256_add_ps(a[u], m(row, j + 8 * u));
  for (int u = 0; u < 4 && j + 8 * u < N; ++u) {  // the last N mod 32 entries go to lanes 0, 1, ...
    const __m256i valid = first_lanes(std::min<int64_t>(8, N - j - 8 * u));
    a[u] = _mm256_blendv_ps(a[u], _mm256_add_ps(a[u], m(row, j + 8 * u, valid)), _mm256_castsi256_ps(valid));
  }
  const __m256 a01 = _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[1], a[3]));  // w = 16, then 8
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(a01), _mm256_extractf128_ps(a01, 1));        // w = 4
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));                                                    // w = 2
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));                                                // w = 1
  return row_inverse_sum(_mm_cvtss_f32(x));
#else
  float acc[32] = {};
  for (; j + 32 <= N; j += 32)
    for (int q = 0; q < 32; ++q) acc[q] += m_entry(row[j + q], i, j + q, t, protect00);
  for (int q = 0; j < N; ++j, ++q) acc[q] += m_entry(row[j], i, j, t, protect00);
  for (int w = 16; w >= 1; w /= 2)
    for (int q = 0; q < w; ++q) acc[q] += acc[q + w];
  return row_inverse_sum(acc[0]);
#endif
}

// Row i of M = (discard(F) + I) / rowsum, in place.
inline void normalize_row(float* __restrict__ row, int64_t N, int64_t i, float t, bool protect00) {
  const float inv = row_scale(row, N, i, t, protect00);
  int64_t j = 0;
#if defined(ROLLOUT_CPU_F16C)
  const RowEntries m(i, t, protect00);
  const __m256 vinv = _mm256_set1_ps(inv);
  for (; j + 8 <= N; j += 8) _mm256_storeu_ps(row + j, _mm256_mul_ps(m(row, j), vinv));
#endif
  for (; j < N; ++j) row[j] = row_normalize(m_entry(row[j], i, j, t, protect00), inv);
}

// One step of the row-vector chain over a block of 4 rows: y += (w_0 m_0 + w_1 m_1) + (w_2 m_2 + w_3 m_3),
// m_q the unnormalised row i_q of M (m_entry of the fused row at rows[q], computed on the fly) and
// w_q = v[i_q] * row_scale(row i_q) (0 for a row the chain does not read: it adds exactly 0). Summed in this
// fixed grouping by every build and schedule (the same bits); one load and store of y per 4 rows. The last
// block of a matrix may repeat a row with w = 0.
inline void axpy_rows4(float* __restrict__ y, const float* w, const float* const* rows, const int64_t* i, int64_t N,
                       float t, bool protect00) {
  int64_t j = 0;
#if defined(ROLLOUT_CPU_F16C)
  const RowEntries m0(i[0], t, protect00), m1(i[1], t, protect00), m2(i[2], t, protect00), m3(i[3], t, protect00);
  const __m256 w0 = _mm256_set1_ps(w[0]), w1 = _mm256_set1_ps(w[1]);
  const __m256 w2 = _mm256_set1_ps(w[2]), w3 = _mm256_set1_ps(w[3]);
  for (; j + 8 <= N; j += 8) {
    const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(w0, m0(rows[0], j)), _mm256_mul_ps(w1, m1(rows[1], j))),
                                   _mm256_add_ps(_mm256_mul_ps(w2, m2(rows[2], j)), _mm256_mul_ps(w3, m3(rows[3], j))));
    _mm256_storeu_ps(y + j, _mm256_add_ps(_mm256_loadu_ps(y + j), s));
  }
  if (j < N) {
    const __m256i valid = first_lanes(N - j);
    const __m256 s = _mm256_add_ps(
        _mm256_add_ps(_mm256_mul_ps(w0, m0(rows[0], j, valid)), _mm256_mul_ps(w1, m1(rows[1], j, valid))),
        _mm256_add_ps(_mm256_mul_ps(w2, m2(rows[2], j, valid)), _mm256_mul_ps(w3, m3(rows[3], j, valid))));
    _mm256_maskstore_ps(y + j, valid, _mm256_add_ps(_mm256_maskload_ps(y + j, valid), s));
    j = N;
  }
#endif
  for (; j < N; ++j) {
    float m[4];
    for (int q = 0; q < 4; ++q) m[q] = w[q] * m_entry(rows[q][j], i[q], j, t, protect00);
    y[j] += (m[0] + m[1]) + (m[2] + m[3]);
  }
}

// vn += v^T M for the fused matrix F (threshold t): the chain's step, in blocks of 4 rows (axpy_rows4), rows
// with v[i] = 0 skipped. scale(i) gives row i's row_scale (computed here, or stored by the split schedule);
// before(i) runs before row i is used (FuseAhead's slices).
template <typename Scale, typename Before>
inline void chain_step(float* __restrict__ vn, const float* __restrict__ v, const float* F, int64_t N, float t,
                       bool protect00, Scale&& scale, Before&& before) {
  std::fill(vn, vn + N, 0.f);
  for (int64_t i0 = 0; i0 < N; i0 += 4) {
    float w[4];
    const float* rows[4];
    int64_t idx[4];
    bool any = false;
    for (int q = 0; q < 4; ++q) {
      const int64_t i = std::min(i0 + q, N - 1);
      if (i0 + q < N) before(i);
      w[q] = i0 + q < N && v[i] != 0.f ? v[i] * scale(i) : 0.f;  // rows the chain does not read: no scale
      rows[q] = F + i * N;
      idx[q] = i;
      any |= w[q] != 0.f;
    }
    if (any) axpy_rows4(vn, w, rows, idx, N, t, protect00);
  }
}

// ------------------------------------------------------------------------------ radix select
// Exact selection over the order-preserving keys of rollout_common.h (float_to_key), CPU flavour: an
// MSD radix select over the keys' offsets from a known lower bound, whose digits cover only the bits
// in which the keys can differ, so the narrow bracket of select_kth spreads over the bins and is
// resolved in one or two passes. Histograms of many keys use kSubHists interleaved copies
// (consecutive keys go to different copies, so runs of one bin do not serialise on one counter).
constexpr int kDigitBits = 11;
constexpr int kSubHists = 4;
constexpr int64_t kHistWords = kSubHists * (int64_t{1} << kDigitBits);

// Bin of h[0..bins) holding the 0-based *rank (then the rank inside it): 64-bin block sums first.
inline uint32_t find_bin(const uint32_t* __restrict__ h, uint32_t bins, uint32_t* rank) {
  uint32_t b0 = 0, below = 0;
  if (bins > 64) {
    for (; b0 + 64 < bins; b0 += 64) {
      uint32_t block = 0;
      for (uint32_t q = 0; q < 64; ++q) block += h[b0 + q];
      if (below + block > *rank) break;
      below += block;
    }
  }
  *rank -= below;
  return b0 + radix_find_bin(h + b0, bins - b0, rank);
}

// The key of rank r (0-based, duplicates counted) among keys[0..m) (reordered: scratch), all of which
// lie in [base, base + span]. The offset bits in which keys can differ are split into digits of at most
// digit_bits bits, as even as possible (23 bits: 12 + 11, not 11 + 11 + 1); once at most kSmallSelect keys
// share the prefix, std::nth_element picks among them. h holds kHistWords counters.
constexpr int64_t kSmallSelect = 32;

inline uint32_t select_key(uint32_t* __restrict__ keys, int64_t m, int64_t r, uint32_t base, uint32_t span,
                           int digit_bits, uint32_t* __restrict__ h) {
  int remaining = span == 0 ? 0 : 32 - __builtin_clz(span);  // offset bits in which keys can differ
  uint32_t prefix = 0, rank = static_cast<uint32_t>(r);
  while (remaining > 0) {
    if (m <= kSmallSelect) {
      std::nth_element(keys, keys + rank, keys + m);
      return keys[rank];
    }
    const int passes = (remaining + digit_bits - 1) / digit_bits;
    const int bits = (remaining + passes - 1) / passes, shift = remaining - bits;
    const uint32_t bins = 1u << bits, mask = bins - 1u;
    const int copies = m >= 8 * static_cast<int64_t>(bins) ? kSubHists : 1;
    std::fill(h, h + copies * bins, 0u);
    int64_t e = 0;
    if (copies == kSubHists) {
      for (; e + kSubHists <= m; e += kSubHists)
        for (int q = 0; q < kSubHists; ++q) ++h[q * bins + (((keys[e + q] - base) >> shift) & mask)];
      for (uint32_t b = 0; b < bins; ++b) h[b] += h[bins + b] + h[2 * bins + b] + h[3 * bins + b];
    }
    for (; e < m; ++e) ++h[((keys[e] - base) >> shift) & mask];
    prefix |= find_bin(h, bins, &rank) << shift;
    remaining = shift;
    if (remaining > 0) {  // keep the keys that agree with the prefix (branch-free compaction, in place)
      int64_t m2 = 0;
      for (int64_t q = 0; q < m; ++q) {
        const uint32_t key = keys[q];
        keys[m2] = key;
        m2 += ((key - base) >> shift) == (prefix >> shift) ? 1 : 0;
      }
      m = m2;
    }
  }
  return base + prefix;
}

// One pass over x[0..n): *below = #(key < lo); the keys in [lo, hi] go to cand (in order; cand holds
// n + 16 entries); returns their number. The scalar pass is the baseline build's and the SIMD passes'
// tail.
inline int64_t gather_bracket_scalar(const float* __restrict__ x, int64_t n, uint32_t lo, uint32_t hi,
                                     uint32_t* __restrict__ cand, int64_t* below_out) {
  int64_t below = 0, m = 0;
  for (int64_t e = 0; e < n; ++e) {
    const uint32_t key = float_to_key(x[e]);
    below += key < lo ? 1 : 0;
    cand[m] = key;
    m += (key >= lo && key <= hi) ? 1 : 0;
  }
  *below_out = below;
  return m;
}

#if defined(ROLLOUT_CPU_F16C)  // the AVX2 build: 8 values per step, left-packed with a permutation
struct LeftPack {
  uint32_t idx[256][8];
  constexpr LeftPack() : idx() {
    for (int mask = 0; mask < 256; ++mask) {
      int c = 0;
      for (int q = 0; q < 8; ++q)
        if ((mask >> q) & 1) idx[mask][c++] = static_cast<uint32_t>(q);
    }
  }
};
constexpr LeftPack kLeftPack{};

inline int64_t gather_bracket(const float* __restrict__ x, int64_t n, uint32_t lo, uint32_t hi,
                              uint32_t* __restrict__ cand, int64_t* below_out) {
  // signed-order keys: s = key ^ sign, so that signed compares order like the unsigned keys
  const __m256i slo = _mm256_set1_epi32(static_cast<int32_t>(lo ^ 0x80000000u));
  const __m256i shi = _mm256_set1_epi32(static_cast<int32_t>(hi ^ 0x80000000u));
  const __m256i low31 = _mm256_set1_epi32(0x7fffffff), sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  __m256i below8 = _mm256_setzero_si256();
  int64_t m = 0, e = 0;
  for (; e + 8 <= n; e += 8) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + e));
    const __m256i sk = _mm256_xor_si256(u, _mm256_and_si256(_mm256_srai_epi32(u, 31), low31));
    const __m256i lt = _mm256_cmpgt_epi32(slo, sk), gt = _mm256_cmpgt_epi32(sk, shi);
    below8 = _mm256_sub_epi32(below8, lt);
    const int mask = ~_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(lt, gt))) & 0xff;
    // branch-free: always store 8 lanes (cand has n + 16 entries), advance by the number kept
    const __m256i perm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLeftPack.idx[mask]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cand + m),
                        _mm256_permutevar8x32_epi32(_mm256_xor_si256(sk, sign), perm));
    m += __builtin_popcount(static_cast<unsigned>(mask));
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), below8);
  int64_t below = 0;
  for (int q = 0; q < 8; ++q) below += lanes[q];
  m += gather_bracket_scalar(x + e, n - e, lo, hi, cand + m, below_out);
  *below_out += below;
  return m;
}

// The same pass with AVX-512 (16 values per step, vpcompressd): the same candidates in the same order.
// Used where the CPU has AVX-512F/VL (Problem::avx512, from cpu_isa()).
__attribute__((target("avx512f,avx512vl"))) inline int64_t gather_bracket16(
    const float* __restrict__ x, int64_t n, uint32_t lo, uint32_t hi, uint32_t* __restrict__ cand,
    int64_t* below_out) {
  const __m512i slo = _mm512_set1_epi32(static_cast<int32_t>(lo ^ 0x80000000u));
  const __m512i shi = _mm512_set1_epi32(static_cast<int32_t>(hi ^ 0x80000000u));
  const __m512i low31 = _mm512_set1_epi32(0x7fffffff), sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  int64_t below = 0, m = 0, e = 0;
  for (; e + 16 <= n; e += 16) {
    const __m512i u = _mm512_loadu_si512(x + e);
    const __m512i sk = _mm512_xor_si512(u, _mm512_and_si512(_mm512_srai_epi32(u, 31), low31));
    const __mmask16 lt = _mm512_cmpgt_epi32_mask(slo, sk), gt = _mm512_cmpgt_epi32_mask(sk, shi);
    const __mmask16 in = static_cast<__mmask16>(~(lt | gt));
    // always store 16 lanes (cand has n + 16 entries), advance by the number kept
    _mm512_storeu_si512(cand + m, _mm512_maskz_compress_epi32(in, _mm512_xor_si512(sk, sign)));
    below += __builtin_popcount(static_cast<unsigned>(lt));
    m += __builtin_popcount(static_cast<unsigned>(in));
  }
  m += gather_bracket_scalar(x + e, n - e, lo, hi, cand + m, below_out);
  *below_out += below;
  return m;
}
#else
inline int64_t gather_bracket(const float* __restrict__ x, int64_t n, uint32_t lo, uint32_t hi,
                              uint32_t* __restrict__ cand, int64_t* below_out) {
  return gather_bracket_scalar(x, n, lo, hi, cand, below_out);
}
#endif

// Keys lo <= hi around the sample ranks r_lo < r_hi of s[0..m) (keys in [smin, smax]): one histogram of
// the sample in bins of 2^shift keys (at most 2^kDigitBits bins over its span); lo is the first key of the
// bin holding rank r_lo, hi the last of the bin holding rank r_hi, so the bracket holds at least the keys of
// those ranks (r_lo <= 0: lo = 0; r_hi >= m - 1: hi = 0xffffffff). h: kHistWords counters.
inline void sample_bracket(const uint32_t* __restrict__ s, int64_t m, uint32_t smin, uint32_t smax, int64_t r_lo,
                           int64_t r_hi, uint32_t* __restrict__ h, uint32_t* lo, uint32_t* hi) {
  const uint32_t span = smax - smin;
  const int shift = std::max(0, (span == 0 ? 0 : 32 - __builtin_clz(span)) - kDigitBits);
  const uint32_t bins = (span >> shift) + 1u;
  std::fill(h, h + bins, 0u);
  for (int64_t q = 0; q < m; ++q) ++h[(s[q] - smin) >> shift];
  uint32_t below = 0, b = 0;
  *lo = 0u;
  if (r_lo > 0) {
    for (; below + h[b] <= static_cast<uint32_t>(r_lo); ++b) below += h[b];
    *lo = smin + (b << shift);
  }
  *hi = 0xffffffffu;
  if (r_hi < m - 1) {
    for (; below + h[b] <= static_cast<uint32_t>(r_hi); ++b) below += h[b];
    *hi = static_cast<uint32_t>(std::min<uint64_t>(uint64_t{smin} + ((uint64_t{b} + 1) << shift) - 1, smax));
  }
}

// Value of rank k (0-based: the (k+1)-th smallest, duplicates counted) of x[0..n). cand: n + 16
// scratch keys; h: kHistWords counters. Large inputs first bracket the answer with an evenly strided
// sample of kSample values (Floyd-Rivest): one histogram of the sample gives keys lo <= hi around the
// rank (3 standard deviations + 4 of margin, widened to its bins' edges), one pass counts the keys below lo
// and gathers those in [lo, hi], and the radix select runs on that small set. When the bracket misses the
// rank (about 0.3% of random inputs, or adversarial ones) it runs on all n keys. Either way the result is
// exact.
constexpr int64_t kSample = 1024;
constexpr int64_t kGatherChunk = 512;  // the bracket gather runs in chunks, calling `between` after each

struct NoHook {
  void operator()() const {}
};

template <typename Hook = NoHook>
inline float select_kth(const float* __restrict__ x, int64_t n, int64_t k, uint32_t* __restrict__ h,
                        uint32_t* __restrict__ cand, bool avx512 = false, Hook&& between = Hook{}) {
  if (n > 4 * kSample) {
    uint32_t sample[kSample];
    uint32_t smin = 0xffffffffu, smax = 0u;
    for (int64_t q = 0; q < kSample; ++q) {
      sample[q] = float_to_key(x[(q * n) / kSample]);
      smin = std::min(smin, sample[q]);
      smax = std::max(smax, sample[q]);
    }
    const double r = static_cast<double>(k) * kSample / static_cast<double>(n);
    const double p = static_cast<double>(k) / static_cast<double>(n);
    const double margin = 3.0 * std::sqrt(kSample * p * (1.0 - p)) + 4.0;
    const int64_t r_lo = static_cast<int64_t>(std::floor(r - margin));
    const int64_t r_hi = static_cast<int64_t>(std::ceil(r + margin));
    uint32_t lo, hi;
    sample_bracket(sample, kSample, smin, smax, r_lo, r_hi, h, &lo, &hi);
    int64_t below = 0, m = 0;
    for (int64_t e = 0; e < n; e += kGatherChunk) {
      int64_t below_chunk = 0;
      const int64_t len = std::min(kGatherChunk, n - e);
#if defined(ROLLOUT_CPU_F16C)
      if (avx512) m += gather_bracket16(x + e, len, lo, hi, cand + m, &below_chunk);
      else
#endif
        m += gather_bracket(x + e, len, lo, hi, cand + m, &below_chunk);
      below += below_chunk;
      between();
    }
    if (below <= k && k < below + m) return key_to_float(select_key(cand, m, k - below, lo, hi - lo, kDigitBits, h));
  }
  for (int64_t e = 0; e < n; ++e) cand[e] = float_to_key(x[e]);
  return key_to_float(select_key(cand, n, k, 0u, 0xffffffffu, n < 4096 ? 8 : kDigitBits, h));
}

// Normalised map of one sample from the chain's result vector v (N entries): out[0..G).
inline void finalize_map(const float* v, int64_t N, int64_t P, int readout, int normalize, float* out) {
  const int64_t G = N - P;
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  for (int64_t j = 0; j < G; ++j) {
    out[j] = readout_finish(readout, v[P + j], G);
    lo = std::min(lo, out[j]);
    hi = std::max(hi, out[j]);
  }
  for (int64_t j = 0; j < G; ++j) out[j] = normalize_value(normalize, out[j], lo, hi);
}

// ---------------------------------------------------------------------------------- schedules
constexpr float kNoThreshold = -std::numeric_limits<float>::infinity();

// A short wait in a spin loop: a pause, and every 2048th time the rest of the time slice (the machine may be
// shared with other work; on a loaded 2-core machine a yield every 64 pauses made batch-1 calls ~20x slower
// at the median: each yield can cost a scheduler time slice, milliseconds).
inline void relax(int64_t& spins) {
  if (++spins % 2048 == 0) {
    std::this_thread::yield();
  } else {
#if defined(__x86_64__)
    _mm_pause();
#endif
  }
}

// Uninitialised scratch (std::vector would zero it first: a write of every byte before the first use).
template <typename V>
std::unique_ptr<V[]> scratch(int64_t n) {
  return std::unique_ptr<V[]>(new V[static_cast<size_t>(std::max<int64_t>(n, 1))]);
}

template <typename T, int FUSION>
struct Kernel {
  const T* att;
  Problem p;

  const T* base(int64_t l, int64_t b) const { return att + l * p.sL + b * p.sB; }
  bool check_rows() const { return p.row_tol >= 0.0f; }

  // Step 1 (head fusion) of rows i0 <= i < i1 of the (layer, sample) matrix at a into f (that matrix's N*N
  // floats), with the row check when p.row_tol >= 0; returns the ValueStatus. Row by row in one call, except
  // contiguous rows without the row check: one run.
  int fuse_rows(const T* a, int64_t i0, int64_t i1, float* f) const {
    const int64_t N = p.N;
    if (p.sI == N && !check_rows())
      return fuse_run<T, FUSION>(a + i0 * N, p.sH, p.H, (i1 - i0) * N, f + i0 * N, p.avx512);
    return fuse_span<T, FUSION>(a + i0 * p.sI, p.sH, p.H, N, f + i0 * N, p.row_tol, p.avx512, i1 - i0, p.sI);
  }

  int fuse_matrix(const T* a, float* f) const { return fuse_rows(a, 0, p.N, f); }

  // Steps 1-3 for every (layer, sample): M (L, B, N, N) float32, parallel over (layer, sample, run of whole
  // rows, ~kFuseChunk entries). Returns the ValueStatus of the attention (M is undefined unless kValuesOk).
  int layers(float* M) const {
    const int64_t N = p.N, NN = N * N, LB = p.L * p.B;
    const int64_t rows = std::max<int64_t>(1, kFuseChunk / N), chunks = (N + rows - 1) / rows;
    std::atomic<int> status{kValuesOk};
    at::parallel_for(0, LB * chunks, 1, [&](int64_t u0, int64_t u1) {
      int st = kValuesOk;
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t lb = u / chunks, i0 = (u % chunks) * rows;
        st |= fuse_rows(base(lb / p.B, lb % p.B), i0, std::min(N, i0 + rows), M + lb * NN);
      }
      if (st != kValuesOk) status.fetch_or(st, std::memory_order_relaxed);
    });
    if (status.load() != kValuesOk) return status.load();
    std::vector<float> thresh(LB, kNoThreshold);
    if (p.k >= 1) {
      at::parallel_for(0, LB, 1, [&](int64_t s0, int64_t s1) {
        auto cand = scratch<uint32_t>(NN + 16), hist = scratch<uint32_t>(kHistWords);
        for (int64_t lb = s0; lb < s1; ++lb)
          thresh[lb] = select_kth(M + lb * NN, NN, p.k, hist.get(), cand.get(), p.avx512);
      });
    }
    at::parallel_for(0, LB * N, std::max<int64_t>(1, 32768 / N), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t lb = r / N, i = r % N;
        normalize_row(M + lb * NN + i * N, N, i, thresh[lb], p.protect00);
      }
    });
    return kValuesOk;
  }

  // The head fusion of the next matrix in slices, run between pieces of this matrix's compute (software
  // pipelining: its memory reads overlap the compute instead of following it). Each call fuses up to `step`
  // more elements: any run, or with the row check whole rows (each row's fusion, value and sum checks in
  // its one read). Needs contiguous rows (one run of NN elements per head); a = nullptr: nothing to do.
  struct FuseAhead {
    const T* a;
    float* f;
    int64_t step;
    const Kernel* kernel;
    int64_t done = 0;    // elements fused (whole rows with the row check)
    int64_t target = 0;  // elements due
    int status = kValuesOk;
    void operator()() {
      const int64_t N = kernel->p.N, NN = N * N;
      if (a == nullptr || done >= NN) return;
      target = std::min(NN, target + step);
      if (!kernel->check_rows()) {
        status |= fuse_run<T, FUSION>(a + done, kernel->p.sH, kernel->p.H, target - done, f + done, kernel->p.avx512);
        done = target;
      } else if (target > done) {
        const int64_t i0 = done / N, i1 = (target + N - 1) / N;  // the rows starting before target
        status |= kernel->fuse_rows(a, i0, i1, f);
        done = i1 * N;
      }
    }
    void finish() {
      const int64_t N = kernel->p.N;
      if (a == nullptr || done >= N * N) return;
      status |= kernel->check_rows() ? kernel->fuse_rows(a, done / N, N, f)
                                     : fuse_run<T, FUSION>(a + done, kernel->p.sH, kernel->p.H, N * N - done, f + done,
                                                                kernel->p.avx512);
      done = N * N;
    }
  };

  // FuseAhead's slice: one per gather chunk of the threshold selection and one per row.
  int64_t ahead_step() const {
    const int64_t N = p.N, NN = N * N;
    const int64_t slots = (p.k >= 1 && NN > 4 * kSample ? (NN + kGatherChunk - 1) / kGatherChunk : 0) + N;
    return ((NN + slots - 1) / slots + 7) / 8 * 8;
  }

  // Whole rollout per sample, layers last to first, with N*N scratches (no stored M). The thread's
  // matrices run in the order (sample b0, layer L-1), ..., (b0, 0), (b0 + 1, L-1), ...; with contiguous
  // rows the next matrix is fused into a second scratch while this one's threshold is selected and its
  // rows normalised. Returns the ValueStatus of the attention (a thread stops at its first bad matrix).
  int per_sample(int64_t P, int readout, int normalize, float* out) const {
    const int64_t N = p.N, NN = N * N, G = N - P;
    const bool discard = p.k >= 1, pipelined = p.sI == N;
    std::atomic<int> status{kValuesOk};
    at::parallel_for(0, p.B, 1, [&](int64_t b0, int64_t b1) {
      auto F = scratch<float>(NN), Fnext = scratch<float>(pipelined ? NN : 0);
      std::vector<float> v(N), vn(N);
      auto cand = scratch<uint32_t>(discard ? NN + 16 : 0), hist = scratch<uint32_t>(discard ? kHistWords : 0);
      const int64_t count = (b1 - b0) * p.L;
      const auto matrix = [&](int64_t s) { return base(p.L - 1 - s % p.L, b0 + s / p.L); };
      int st = fuse_matrix(matrix(0), F.get());
      for (int64_t s = 0; s < count && st == kValuesOk; ++s) {
        const int64_t b = b0 + s / p.L;
        if (s % p.L == 0)
          for (int64_t i = 0; i < N; ++i) v[i] = readout_init(readout, i, P);
        FuseAhead ahead{pipelined && s + 1 < count ? matrix(s + 1) : nullptr, Fnext.get(), ahead_step(), this};
        const float t = discard ? select_kth(F.get(), NN, p.k, hist.get(), cand.get(), p.avx512, ahead) : kNoThreshold;
        const float* f = F.get();
        chain_step(vn.data(), v.data(), f, N, t, p.protect00,
                   [&](int64_t i) { return row_scale(f + i * N, N, i, t, p.protect00); }, [&](int64_t) { ahead(); });
        v.swap(vn);
        if (s % p.L == p.L - 1) finalize_map(v.data(), N, P, readout, normalize, out + b * G);
        if (s + 1 < count) {
          if (pipelined) {
            ahead.finish();
            st = ahead.status;
            F.swap(Fnext);
          } else {
            st = fuse_matrix(matrix(s + 1), F.get());
          }
        }
      }
      if (st != kValuesOk) status.fetch_or(st, std::memory_order_relaxed);
    });
    return status.load();
  }

  // Fewer samples than threads (batch 1 on 2 threads): the (layer, sample) matrices u = (L-1-l) * B + b, in
  // the order the chains consume them, are prepared by every thread -- fused (with the checks), threshold
  // selected, the scale of every row the chain may read computed -- each claimed from a shared counter, into
  // stored F, thresholds and scales (B*L*N*(N+1) floats). Role b < B runs sample b's chain
  // u^T M_{L-1} ... M_0 as the matrices become ready (the per-sample schedule's arithmetic: the same bits),
  // preparing unclaimed matrices itself while it waits; then it helps prepare, as the other roles do from
  // the start, with the next matrix fused in slices between the current one's steps (FuseAhead). A thread
  // waits only for matrices other running threads have claimed, so any thread count works, one included
  // (a nested parallel region). With `handoff` (tests), a thread with chain roles only waits instead of
  // preparing matrices when other threads prepare them. Returns the ValueStatus of the attention;
  // *threads_used = the number of threads that took part (prepared a matrix or ran a chain).
  int split(int64_t P, int readout, int normalize, float* out, bool handoff, int* threads_used) const {
    const int64_t N = p.N, NN = N * N, G = N - P, units = p.L * p.B;
    const bool discard = p.k >= 1, pipelined = p.sI == N;
    auto F = scratch<float>(units * NN), scale = scratch<float>(units * N), thresh = scratch<float>(units);
    auto ready = scratch<std::atomic<int>>(units);
    for (int64_t u = 0; u < units; ++u) ready[u].store(0, std::memory_order_relaxed);
    std::atomic<int64_t> next{0};
    std::atomic<int> status{kValuesOk};
    std::atomic<bool> stop{false};
    std::atomic<uint64_t> active{0};  // bit r: role r prepared a matrix or ran a chain
    const auto took_part = [&](int64_t role) {
      active.fetch_or(uint64_t{1} << std::min<int64_t>(role, 63), std::memory_order_relaxed);
    };
    const auto matrix = [&](int64_t u) { return base(p.L - 1 - u / p.B, u % p.B); };
    const auto claim = [&]() {
      return stop.load(std::memory_order_relaxed) || next.load(std::memory_order_relaxed) >= units ? units
                                                                                                    : next.fetch_add(1);
    };
    const auto fail = [&](int st) {
      status.fetch_or(st);
      stop.store(true);
    };
    // threshold and row scales of the fused matrix u (ahead(): the pipelined fusion of the next one)
    const auto prepare = [&](int64_t u, auto& ahead, uint32_t* cand, uint32_t* hist, int64_t role) {
      const float* f = F.get() + u * NN;
      const float t = discard ? select_kth(f, NN, p.k, hist, cand, p.avx512, ahead) : kNoThreshold;
      const bool first = u < p.B;  // layer L-1: the chain reads the rows of its readout vector only
      for (int64_t i = 0; i < N; ++i) {
        ahead();
        if (!first || readout_init(readout, i, P) != 0.f) scale[u * N + i] = row_scale(f + i * N, N, i, t, p.protect00);
      }
      thresh[u] = t;
      took_part(role);
      ready[u].store(1, std::memory_order_release);
    };
    const auto work = [&](uint32_t* cand, uint32_t* hist, int64_t role) {
      int64_t u = claim();
      int st = u < units ? fuse_matrix(matrix(u), F.get() + u * NN) : kValuesOk;
      while (u < units) {
        if (st != kValuesOk) return fail(st);
        const int64_t n = claim();
        const bool ahead_n = pipelined && n < units;
        FuseAhead ahead{ahead_n ? matrix(n) : nullptr, ahead_n ? F.get() + n * NN : nullptr, ahead_step(), this};
        prepare(u, ahead, cand, hist, role);
        if (n < units) {
          if (pipelined) {
            ahead.finish();
            st = ahead.status;
          } else {
            st = fuse_matrix(matrix(n), F.get() + n * NN);
          }
        }
        u = n;
      }
    };
    const auto chain = [&](int64_t b, float* v, float* vn, uint32_t* cand, uint32_t* hist, int64_t role,
                           bool wait_only) {
      for (int64_t i = 0; i < N; ++i) v[i] = readout_init(readout, i, P);
      took_part(role);
      for (int64_t u = b; u < units; u += p.B) {
        for (int64_t spins = 0; ready[u].load(std::memory_order_acquire) == 0;) {
          if (stop.load(std::memory_order_relaxed)) return false;
          const int64_t c = wait_only ? units : claim();
          if (c >= units) {
            relax(spins);
            continue;
          }
          const int st = fuse_matrix(matrix(c), F.get() + c * NN);
          if (st != kValuesOk) {
            fail(st);
            return false;
          }
          NoHook none;
          prepare(c, none, cand, hist, role);
        }
        const float* su = scale.get() + u * N;
        chain_step(vn, v, F.get() + u * NN, N, thresh[u], p.protect00, [&](int64_t i) { return su[i]; },
                   [](int64_t) {});
        std::swap(v, vn);
      }
      finalize_map(v, N, P, readout, normalize, out + b * G);
      return true;
    };
    const int64_t roles = std::max<int64_t>(p.B, at::get_num_threads());
    at::parallel_for(0, roles, 1, [&](int64_t r0, int64_t r1) {
      auto cand = scratch<uint32_t>(discard ? NN + 16 : 0), hist = scratch<uint32_t>(discard ? kHistWords : 0);
      std::vector<float> v(N), vn(N);
      // waiting only is safe where this thread has no preparing role and another thread has (roles > B)
      const bool wait_only = handoff && r1 <= p.B && roles > p.B;
      for (int64_t b = r0; b < std::min(r1, p.B); ++b)
        if (!chain(b, v.data(), vn.data(), cand.get(), hist.get(), r0, wait_only)) return;
      work(cand.get(), hist.get(), r0);
    });
    *threads_used = __builtin_popcountll(active.load());
    return status.load();
  }
};

// The op bodies for one dtype/fusion instantiation (see rollout_cpu.cpp); they return the ValueStatus of
// the attention (the op raises unless kValuesOk).
template <typename T, int FUSION>
int run_layers(const T* att, const Problem& p, float* M) {
  return Kernel<T, FUSION>{att, p}.layers(M);
}

// Readouts 'cls' / 'mean' with a Schedule (rollout_cpu.cpp); *threads_used: how many threads took part (split)
// or ran samples (per-sample).
template <typename T, int FUSION>
int run_rollout(const T* att, const Problem& p, int64_t P, int readout, int normalize, int schedule, float* out,
                int* threads_used) {
  const Kernel<T, FUSION> kernel{att, p};
  if (schedule != kSchedulePerSample)
    return kernel.split(P, readout, normalize, out, schedule == kScheduleSplitHandoff, threads_used);
  *threads_used = static_cast<int>(std::min<int64_t>(p.B, at::get_num_threads()));
  return kernel.per_sample(P, readout, normalize, out);
}
