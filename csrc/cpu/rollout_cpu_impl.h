// The CPU rollout kernel, written once and compiled twice by rollout_cpu.cpp: for the baseline ISA and,
// on x86-64, for AVX2 + FMA + F16C (chosen at run time), by including this file inside
// `namespace rollout_fast::cpu_<isa>` under `#pragma GCC target`. No #include here: everything it uses
// (ATen parallel_for, <atomic>, <vector>, <limits>, <algorithm>, <type_traits>, rollout_common.h) is
// included before.
// ROLLOUT_CPU_F16C selects the vectorisable hardware float16 conversion.
//
// Schedules (both compute every entry, sum and product in the same order, so the result is bitwise the
// same for any thread count):
//   per_sample: parallel over samples; each sample runs its layers last to first with two N*N scratches
//               that stay in cache: select the threshold of the fused matrix, then normalise each row the
//               chain reads (v[i] != 0) on the fly and add it to the row-vector chain; with contiguous
//               rows the next matrix's heads are fused into the other scratch in slices between these
//               steps (FuseAhead: its read overlaps this compute).
//   layers + chain: parallel over (layer, sample, run of whole rows, ~kFuseChunk entries) -- over rows when
//               they are not contiguous -- into a stored (L, B, N, N) M, then the chain per sample (small
//               batches, the 'full' readout, and the fused_layers op).
// Both return a ValueStatus (rollout_common.h): the values' checks ride on the head fusion's read, and with
// a row tolerance (Problem::row_tol >= 0) each run's row sums are added right after its fusion
// (add_row_sums, 8 partial sums per row) and checked when the matrix (or, in `layers`, the run) is complete.

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

// ------------------------------------------------------------------------------ row primitives
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
#endif

// kValueNegative when some a[h * sH + j], h < H, j < n, is negative: the closer look of fuse_row_h's AVX2
// build, whose one-instruction sign test also sees -0.0 (rare in attention, so this path is rare too).
template <typename T>
int negative_status(const typename Raw<T>::type* a, int64_t sH, int64_t H, int64_t n) {
  int status = kValuesOk;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t j = 0; j < n; ++j) status |= raw_to_float<T>(a[h * sH + j]) < 0.0f ? kValueNegative : kValuesOk;
  return status;
}

// f[0..N) = head fusion over h of a[h * sH + j] (row i of one (layer, sample), or a whole contiguous
// matrix), float32, heads combined in order h = 0..H-1 (every loop order below gives the same bits).
// Returns the ValueStatus of the values read (rollout_common.h: kValuesOk, or NaN/inf and/or negative
// values; the op then raises): the value checks ride on the one read. The AVX2 build reads the H head
// streams side by side, the accumulator in a register, and prefetches each stream 2 KiB ahead; its sign
// test ORs the values themselves (one instruction each), and only a set sign bit (a negative value, or
// -0.0) sends it to negative_status for a closer look.
template <typename T, int FUSION, int HEADS = 0>
int fuse_row_h(const T* a_typed, int64_t sH, int64_t H_runtime, int64_t N, float* __restrict__ f) {
  using R = typename Raw<T>::type;
  const R* __restrict__ a = reinterpret_cast<const R*>(a_typed);
  const int64_t H = HEADS > 0 ? HEADS : H_runtime;
#if defined(ROLLOUT_CPU_F16C)
  if constexpr (!std::is_same_v<T, double>) {
    const __m256 heads = _mm256_set1_ps(static_cast<float>(H));
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 big = _mm256_set1_ps(std::numeric_limits<float>::max());
    __m256 bad = _mm256_setzero_ps();   // lanes set where |x| > FLT_MAX or x is NaN
    __m256 signs = _mm256_setzero_ps();  // OR of the values: a sign bit set where x < 0 (or x is -0.0)
    int64_t j = 0;
    constexpr int64_t kAhead = 512 / sizeof(R) * 4;  // prefetch distance: 2 KiB of each head's stream
    for (; j + 8 <= N; j += 8) {  // one read of the H head rows, the accumulator in a register
      if ((j & (64 / sizeof(R) - 1)) == 0)
        for (int64_t h = 0; h < H; ++h) __builtin_prefetch(a + h * sH + j + kAhead, 0, 3);
      __m256 x = load8<T>(a + j);
      __m256 acc = x;
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(x, abs_mask), big, _CMP_NLE_UQ));
      signs = _mm256_or_ps(signs, x);
      for (int64_t h = 1; h < H; ++h) {
        x = load8<T>(a + h * sH + j);
        acc = fusion_combine8<FUSION>(acc, x);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(x, abs_mask), big, _CMP_NLE_UQ));
        signs = _mm256_or_ps(signs, x);
      }
      if (FUSION == kFusionMean) acc = _mm256_div_ps(acc, heads);
      _mm256_storeu_ps(f + j, acc);
    }
    int status = _mm256_movemask_ps(bad) != 0 ? kValueNonFinite : kValuesOk;
    if (_mm256_movemask_ps(signs) != 0) status |= negative_status<T>(a, sH, H, j);
    for (; j < N; ++j) {
      float x = raw_to_float<T>(a[j]);
      float acc = fusion_first(x);
      status |= value_status(x);
      for (int64_t h = 1; h < H; ++h) {
        x = raw_to_float<T>(a[h * sH + j]);
        acc = fusion_combine(FUSION, acc, x);
        status |= value_status(x);
      }
      f[j] = fusion_finish(FUSION, acc, H);
    }
    return status;
  }
#endif
  int status = kValuesOk;  // integer OR reduction: vectorises
  for (int64_t j = 0; j < N; ++j) {
    const float x = raw_to_float<T>(a[j]);
    f[j] = fusion_first(x);
    status |= value_status(x);
  }
  for (int64_t h = 1; h < H; ++h) {
    const R* __restrict__ ah = a + h * sH;
    for (int64_t j = 0; j < N; ++j) {
      const float x = raw_to_float<T>(ah[j]);
      f[j] = fusion_combine(FUSION, f[j], x);
      status |= value_status(x);
    }
  }
  if (FUSION == kFusionMean) {
    for (int64_t j = 0; j < N; ++j) f[j] = fusion_finish(FUSION, f[j], H);
  }
  return status;
}

// fuse_row_h with the head count as a compile-time constant for the common ViT head counts, so the
// AVX2 loop's heads unroll into straight-line loads (measured on DeiT-S shapes, 2 threads: the pipelined
// op went from ~1.8x to ~1.45x the memory floor; a runtime head loop per 8 elements starves the stream).
// The baseline build and float64 loop over heads outermost, where the constant buys nothing.
template <typename T, int FUSION>
int fuse_row(const T* a, int64_t sH, int64_t H, int64_t N, float* __restrict__ f) {
#if defined(ROLLOUT_CPU_F16C)
  if constexpr (std::is_same_v<T, double>) return fuse_row_h<T, FUSION>(a, sH, H, N, f);
  switch (H) {
    case 1: return fuse_row_h<T, FUSION, 1>(a, sH, H, N, f);
    case 3: return fuse_row_h<T, FUSION, 3>(a, sH, H, N, f);
    case 4: return fuse_row_h<T, FUSION, 4>(a, sH, H, N, f);
    case 6: return fuse_row_h<T, FUSION, 6>(a, sH, H, N, f);
    case 8: return fuse_row_h<T, FUSION, 8>(a, sH, H, N, f);
    case 12: return fuse_row_h<T, FUSION, 12>(a, sH, H, N, f);
    case 16: return fuse_row_h<T, FUSION, 16>(a, sH, H, N, f);
    default: return fuse_row_h<T, FUSION>(a, sH, H, N, f);
  }
#else
  return fuse_row_h<T, FUSION>(a, sH, H, N, f);
#endif
}

// f[0..n) = head fusion of a[h * sH + e] for a contiguous run of n elements (e.g. a whole (N, N) matrix
// with unit row stride): fuse_row over the run. The AVX2 build reads the whole run in one go (H
// streams side by side, prefetched); the baseline build (and float64) goes in chunks of kFuseChunk
// elements, heads outermost, so each head's chunk is one sequential read and the chunk of f stays in
// L1. Every split gives the same bits. Returns the ValueStatus of the run.
constexpr int64_t kFuseChunk = 2048;

template <typename T, int FUSION>
int fuse_run(const T* a, int64_t sH, int64_t H, int64_t n, float* __restrict__ f) {
#if defined(ROLLOUT_CPU_F16C)
  if constexpr (!std::is_same_v<T, double>) return fuse_row<T, FUSION>(a, sH, H, n, f);
#endif
  int status = kValuesOk;
  for (int64_t c0 = 0; c0 < n; c0 += kFuseChunk)
    status |= fuse_row<T, FUSION>(a + c0, sH, H, std::min(kFuseChunk, n - c0), f + c0);
  return status;
}

// acc[0..8) += x[0..n), float32 partial sums in any lane order (the row check: Kernel::add_row_sums keeps 8
// partial sums per row, so a run's piece of a row costs no horizontal sum). The AVX2 build: four 8-lane
// accumulators (independent add chains; bfloat16 16 values per load, widened by interleaving zeros below
// them), the last n mod 8 values as the top lanes of one more 8-value load ending at x + n (its other lanes
// masked off); the baseline build (and float64): one value per lane. Any order will do: the op's row
// tolerance leaves room for the rounding of any summation order (ops/rollout.py).
template <typename T>
inline void add_partial_sums(const T* x_typed, int64_t n, float* __restrict__ acc) {
  using R = typename Raw<T>::type;
  const R* __restrict__ x = reinterpret_cast<const R*>(x_typed);
  int64_t j = 0;
#if defined(ROLLOUT_CPU_F16C)
  if constexpr (!std::is_same_v<T, double>) {
    if (n >= 8) {
      __m256 a0 = _mm256_loadu_ps(acc), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        const __m256i zero = _mm256_setzero_si256();
        for (; j + 32 <= n; j += 32) {
          const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j));
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j + 16));
          a0 = _mm256_add_ps(a0, _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, u)));
          a1 = _mm256_add_ps(a1, _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, u)));
          a2 = _mm256_add_ps(a2, _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)));
          a3 = _mm256_add_ps(a3, _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v)));
        }
      }
      for (; j + 32 <= n; j += 32) {
        a0 = _mm256_add_ps(a0, load8<T>(x + j));
        a1 = _mm256_add_ps(a1, load8<T>(x + j + 8));
        a2 = _mm256_add_ps(a2, load8<T>(x + j + 16));
        a3 = _mm256_add_ps(a3, load8<T>(x + j + 24));
      }
      for (; j + 8 <= n; j += 8) a0 = _mm256_add_ps(a0, load8<T>(x + j));
      if (j < n) {  // lanes 8 - (n - j) .. 7 of the 8 values ending at x + n are the ones not yet added
        const __m256i keep = _mm256_cmpgt_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                                _mm256_set1_epi32(static_cast<int32_t>(7 - (n - j))));
        a1 = _mm256_add_ps(a1, _mm256_and_ps(load8<T>(x + n - 8), _mm256_castsi256_ps(keep)));
      }
      _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a1, a3)));
      return;
    }
  }
#endif
  for (; j + 8 <= n; j += 8)
    for (int q = 0; q < 8; ++q) acc[q] += raw_to_float<T>(x[j + q]);
  for (int q = 0; j < n; ++j, ++q) acc[q] += raw_to_float<T>(x[j]);
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

// y += c * x
inline void axpy(float* __restrict__ y, float c, const float* __restrict__ x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += c * x[j];
}

// y += c * M_i for the fused row F_i, M_i computed on the fly (normalize_row's values, not stored): the
// same bits as axpy over the row normalize_row leaves.
inline void axpy_normalized_row(float* __restrict__ y, float c, const float* __restrict__ row, int64_t N, int64_t i,
                                float t, bool protect00) {
  const float inv = row_scale(row, N, i, t, protect00);
  int64_t j = 0;
#if defined(ROLLOUT_CPU_F16C)
  const RowEntries m(i, t, protect00);
  const __m256 vc = _mm256_set1_ps(c), vinv = _mm256_set1_ps(inv);
  for (; j + 8 <= N; j += 8)  // y + c * (m * inv), as the scalar loop
    _mm256_storeu_ps(y + j, _mm256_add_ps(_mm256_loadu_ps(y + j), _mm256_mul_ps(vc, _mm256_mul_ps(m(row, j), vinv))));
  if (j < N) {
    const __m256i valid = first_lanes(N - j);
    _mm256_maskstore_ps(y + j, valid, _mm256_add_ps(_mm256_maskload_ps(y + j, valid),
                                                    _mm256_mul_ps(vc, _mm256_mul_ps(m(row, j, valid), vinv))));
    j = N;
  }
#endif
  for (; j < N; ++j) y[j] += c * row_normalize(m_entry(row[j], i, j, t, protect00), inv);
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
// lie in [base, base + span]. Digits of at most digit_bits bits; h holds kHistWords counters.
inline uint32_t select_key(uint32_t* __restrict__ keys, int64_t m, int64_t r, uint32_t base, uint32_t span,
                           int digit_bits, uint32_t* __restrict__ h) {
  int remaining = span == 0 ? 0 : 32 - __builtin_clz(span);  // offset bits in which keys can differ
  uint32_t prefix = 0, rank = static_cast<uint32_t>(r);
  while (remaining > 0) {
    const int bits = std::min(digit_bits, remaining), shift = remaining - bits;
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

// Value of rank k (0-based: the (k+1)-th smallest, duplicates counted) of x[0..n). cand: n + 16
// scratch keys; h: kHistWords counters. Large inputs first bracket the answer with an evenly strided
// sample of kSample values (Floyd-Rivest): radix selects on the sample give keys lo <= hi around the
// rank (3 standard deviations + 4 of margin), one pass counts the keys below lo and gathers those in
// [lo, hi], and the radix select runs on that small set. When the bracket misses the rank (about 0.3%
// of random inputs, or adversarial ones) it runs on all n keys. Either way the result is exact.
constexpr int64_t kSample = 1024;
constexpr int64_t kGatherChunk = 512;  // the bracket gather runs in chunks, calling `between` after each

struct NoHook {
  void operator()() const {}
};

template <typename Hook = NoHook>
inline float select_kth(const float* __restrict__ x, int64_t n, int64_t k, uint32_t* __restrict__ h,
                        uint32_t* __restrict__ cand, bool avx512 = false, Hook&& between = Hook{}) {
  if (n > 4 * kSample) {
    uint32_t sample[kSample], scratch[kSample];
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
    uint32_t lo = 0u, hi = 0xffffffffu;
    if (r_lo > 0) {
      std::copy(sample, sample + kSample, scratch);
      lo = select_key(scratch, kSample, r_lo, smin, smax - smin, 8, h);
    }
    if (r_hi < kSample - 1) {
      std::copy(sample, sample + kSample, scratch);
      hi = select_key(scratch, kSample, r_hi, smin, smax - smin, 8, h);
    }
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

template <typename T, int FUSION>
struct Kernel {
  const T* att;
  Problem p;

  const T* base(int64_t l, int64_t b) const { return att + l * p.sL + b * p.sB; }

  // Steps 1-3 for every (layer, sample): M (L, B, N, N) float32, parallel over rows. Returns the
  // ValueStatus of the attention (M is undefined unless kValuesOk).
  int layers(float* M) const {
    const int64_t N = p.N, NN = N * N, LB = p.L * p.B;
    std::atomic<int> status{kValuesOk};
    if (p.sI == N) {  // rows contiguous: parallel over (layer, sample, run of whole rows, ~kFuseChunk entries)
      const int64_t rows = std::max<int64_t>(1, kFuseChunk / N), chunks = (N + rows - 1) / rows;
      at::parallel_for(0, LB * chunks, 1, [&](int64_t u0, int64_t u1) {
        std::vector<float> rs(row_sums_size());
        int st = kValuesOk;
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t lb = u / chunks, i0 = (u % chunks) * rows, i1 = std::min(N, i0 + rows);
          const T* a = base(lb / p.B, lb % p.B);
          st |= fuse_row<T, FUSION>(a + i0 * N, p.sH, p.H, (i1 - i0) * N, M + lb * NN + i0 * N);
          if (check_rows()) {
            add_row_sums(a, i0 * N, (i1 - i0) * N, rs.data());
            st |= row_status(rs.data(), i0, i1);
          }
        }
        if (st != kValuesOk) status.fetch_or(st, std::memory_order_relaxed);
      });
    } else {
      const int64_t fuse_grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.H * N));
      at::parallel_for(0, LB * N, fuse_grain, [&](int64_t r0, int64_t r1) {
        std::vector<float> rs(row_sums_size());
        int st = kValuesOk;
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t lb = r / N, i = r % N;
          const T* a = base(lb / p.B, lb % p.B);
          st |= fuse_row<T, FUSION>(a + i * p.sI, p.sH, p.H, N, M + lb * NN + i * N);
          if (check_rows()) {
            add_row_sums(a, i * N, N, rs.data());
            st |= row_status(rs.data(), i, i + 1);
          }
        }
        if (st != kValuesOk) status.fetch_or(st, std::memory_order_relaxed);
      });
    }
    if (status.load() != kValuesOk) return status.load();
    std::vector<float> thresh(LB, kNoThreshold);
    if (p.k >= 1) {
      at::parallel_for(0, LB, 1, [&](int64_t s0, int64_t s1) {
        std::vector<uint32_t> cand(NN + 16), hist(kHistWords);
        for (int64_t lb = s0; lb < s1; ++lb)
          thresh[lb] = select_kth(M + lb * NN, NN, p.k, hist.data(), cand.data(), p.avx512);
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

  // Row-vector chain over stored M: v^T M_L ... M_1 per sample, then the map.
  void chain(const float* M, int64_t P, int readout, int normalize, float* out) const {
    const int64_t N = p.N, NN = N * N, G = N - P;
    at::parallel_for(0, p.B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> v(N), vn(N);
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t i = 0; i < N; ++i) v[i] = readout_init(readout, i, P);
        for (int64_t l = p.L - 1; l >= 0; --l) {
          const float* Ml = M + (l * p.B + b) * NN;
          std::fill(vn.begin(), vn.end(), 0.f);
          for (int64_t i = 0; i < N; ++i)
            if (v[i] != 0.f) axpy(vn.data(), v[i], Ml + i * N, N);
          v.swap(vn);
        }
        finalize_map(v.data(), N, P, readout, normalize, out + b * G);
      }
    });
  }

  // Step 1 (head fusion) of one (layer, sample) matrix into f, NN floats; returns the ValueStatus, with the
  // row check when rs (row_sums_size() zeroed floats) is given.
  int fuse_matrix(const T* a, float* f, float* rs = nullptr) const {
    const int64_t N = p.N;
    int status = kValuesOk;
    if (p.sI != N) {
      for (int64_t i = 0; i < N; ++i) {
        status |= fuse_row<T, FUSION>(a + i * p.sI, p.sH, p.H, N, f + i * N);
        if (rs != nullptr) add_row_sums(a, i * N, N, rs);
      }
    } else if (rs == nullptr) {
      return fuse_run<T, FUSION>(a, p.sH, p.H, N * N, f);
    } else {  // runs of whole rows, each summed right after its fusion, while it is in cache
      const int64_t rows = std::max<int64_t>(1, kFuseChunk / N);
      for (int64_t i0 = 0; i0 < N; i0 += rows) {
        const int64_t n = (std::min(N, i0 + rows) - i0) * N;
        status |= fuse_run<T, FUSION>(a + i0 * N, p.sH, p.H, n, f + i0 * N);
        add_row_sums(a, i0 * N, n, rs);
      }
    }
    return rs != nullptr ? status | row_status(rs, 0, N) : status;
  }

  // ------------------------------------------------------------------ the row check (p.row_tol >= 0)
  bool check_rows() const { return p.row_tol >= 0.0f; }

  // Sums of the rows of every head, 8 partial sums per row, a row's heads side by side: rs[(i * H + h) * 8 + q]
  // (row_sums_size() floats, zeroed); add_row_sums adds the flat entries e0 .. e0 + n - 1 (e = i * N + j) of
  // the matrix at a.
  int64_t row_sums_size() const { return check_rows() ? p.H * p.N * 8 : 0; }

  void add_row_sums(const T* a, int64_t e0, int64_t n, float* rs) const {
    int64_t i = e0 / p.N, j = e0 - i * p.N;
    for (int64_t left = n; left > 0; ++i, j = 0) {
      const int64_t len = std::min(p.N - j, left);
      const T* row = a + i * p.sI + j;
      float* sums = rs + i * p.H * 8;
      for (int64_t h = 0; h < p.H; ++h) add_partial_sums<T>(row + h * p.sH, len, sums + h * 8);
      left -= len;
    }
  }

  // kValueRowSum when the sum of a row i0 <= i < i1 of some head is off 1 by more than the tolerance; those
  // sums are zeroed for the next matrix.
  int row_status(float* rs, int64_t i0, int64_t i1) const {
    int status = kValuesOk;
    for (float* q = rs + i0 * p.H * 8; q < rs + i1 * p.H * 8; q += 8) {
      status |= row_sum_status(((q[0] + q[4]) + (q[2] + q[6])) + ((q[1] + q[5]) + (q[3] + q[7])), p.row_tol);
      std::fill(q, q + 8, 0.0f);
    }
    return status;
  }

  // The head fusion of the next matrix in slices of `step` elements, run between pieces of this matrix's
  // compute (software pipelining: its memory reads overlap the compute instead of following it).
  // Needs contiguous rows (one run of NN elements per head); a = nullptr: nothing to do. With rs
  // (row_sums_size() zeroed floats) each slice's row sums are added right after its fusion and checked at
  // the end.
  struct FuseAhead {
    const T* a;
    float* f;
    int64_t step;
    const Kernel* kernel;
    float* rs;
    int64_t done = 0;
    int status = kValuesOk;
    void operator()() {
      const int64_t n = kernel->p.N * kernel->p.N;
      if (a == nullptr || done >= n) return;
      const int64_t len = std::min(step, n - done);
      status |= fuse_row<T, FUSION>(a + done, kernel->p.sH, kernel->p.H, len, f + done);
      if (rs != nullptr) kernel->add_row_sums(a, done, len, rs);
      done += len;
    }
    void finish() {
      if (a == nullptr) return;
      while (done < kernel->p.N * kernel->p.N) (*this)();
      if (rs != nullptr) status |= kernel->row_status(rs, 0, kernel->p.N);
    }
  };

  // Whole rollout per sample, layers last to first, with N*N scratches (no stored M). The thread's
  // matrices run in the order (sample b0, layer L-1), ..., (b0, 0), (b0 + 1, L-1), ...; with contiguous
  // rows the next matrix is fused into a second scratch while this one's threshold is selected and its
  // rows normalised. Returns the ValueStatus of the attention (a thread stops at its first bad matrix).
  int per_sample(int64_t P, int readout, int normalize, float* out) const {
    const int64_t N = p.N, NN = N * N, G = N - P;
    const bool discard = p.k >= 1, pipelined = p.sI == N;
    std::atomic<int> status{kValuesOk};
    at::parallel_for(0, p.B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> F(NN), Fnext(pipelined ? NN : 0), v(N), vn(N), sums(row_sums_size());
      float* rs = check_rows() ? sums.data() : nullptr;
      std::vector<uint32_t> cand(discard ? NN + 16 : 0), hist(discard ? kHistWords : 0);
      const int64_t count = (b1 - b0) * p.L;
      const auto matrix = [&](int64_t s) { return base(p.L - 1 - s % p.L, b0 + s / p.L); };
      // slices of the next matrix's fusion: one per gather chunk and one per row
      const int64_t slots = (discard && NN > 4 * kSample ? (NN + kGatherChunk - 1) / kGatherChunk : 0) + N;
      const int64_t step = ((NN + slots - 1) / slots + 7) / 8 * 8;
      int st = fuse_matrix(matrix(0), F.data(), rs);
      for (int64_t s = 0; s < count && st == kValuesOk; ++s) {
        const int64_t b = b0 + s / p.L;
        if (s % p.L == 0)
          for (int64_t i = 0; i < N; ++i) v[i] = readout_init(readout, i, P);
        FuseAhead ahead{pipelined && s + 1 < count ? matrix(s + 1) : nullptr, Fnext.data(), step, this, rs};
        const float t = discard ? select_kth(F.data(), NN, p.k, hist.data(), cand.data(), p.avx512, ahead) : kNoThreshold;
        std::fill(vn.begin(), vn.end(), 0.f);
        for (int64_t i = 0; i < N; ++i) {
          ahead();
          if (v[i] == 0.f) continue;  // rows the chain does not read need no normalisation
          axpy_normalized_row(vn.data(), v[i], F.data() + i * N, N, i, t, p.protect00);
        }
        v.swap(vn);
        if (s % p.L == p.L - 1) finalize_map(v.data(), N, P, readout, normalize, out + b * G);
        if (s + 1 < count) {
          if (pipelined) {
            ahead.finish();
            st = ahead.status;
            F.swap(Fnext);
          } else {
            st = fuse_matrix(matrix(s + 1), F.data(), rs);
          }
        }
      }
      if (st != kValuesOk) status.fetch_or(st, std::memory_order_relaxed);
    });
    return status.load();
  }
};

// The op bodies for one dtype/fusion instantiation (see rollout_cpu.cpp); they return the ValueStatus of
// the attention (the op raises unless kValuesOk).
template <typename T, int FUSION>
int run_layers(const T* att, const Problem& p, float* M) {
  return Kernel<T, FUSION>{att, p}.layers(M);
}

template <typename T, int FUSION>
int run_rollout(const T* att, const Problem& p, int64_t P, int readout, int normalize, bool per_sample,
                float* out) {
  const Kernel<T, FUSION> kernel{att, p};
  if (per_sample) return kernel.per_sample(P, readout, normalize, out);
  std::vector<float> M(static_cast<size_t>(p.L * p.B * p.N * p.N));
  const int status = kernel.layers(M.data());
  if (status != kValuesOk) return status;
  kernel.chain(M.data(), P, readout, normalize, out);
  return kValuesOk;
}
