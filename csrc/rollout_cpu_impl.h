// The CPU rollout kernel, written once and compiled twice by rollout_cpu.cpp: for the baseline ISA and,
// on x86-64, for AVX2 + FMA + F16C (chosen at run time), by including this file inside
// `namespace rollout_fast::cpu_<isa>` under `#pragma GCC target`. No #include here: everything it uses
// (ATen parallel_for, <atomic>, <vector>, <limits>, <algorithm>, <type_traits>, rollout_common.h) is
// included before.
// ROLLOUT_CPU_F16C selects the vectorisable hardware float16 conversion.
//
// Schedules (both run the same per-row functions in the same order, so the result is bitwise the same
// for any thread count):
//   per_sample: parallel over samples; each sample runs its layers last to first with an N*N scratch
//               that stays in cache: fuse the heads row by row, select the threshold, normalise each
//               row and add it to the row-vector chain.
//   layers + chain: parallel over (layer, sample, row) into a stored (L, B, N, N) M, then the chain
//               per sample (small batches, the 'full' readout, and the fused_layers op).

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

// f[0..N) = head fusion over h of a[h * sH + j] (row i of one (layer, sample)), float32, heads
// combined in order h = 0..H-1 (every loop order below gives the same bits). Returns false when an
// input value is NaN or infinite (the op then raises): the finiteness check rides on the one read.
template <typename T, int FUSION>
bool fuse_row(const T* a_typed, int64_t sH, int64_t H, int64_t N, float* __restrict__ f) {
  using R = typename Raw<T>::type;
  const R* __restrict__ a = reinterpret_cast<const R*>(a_typed);
  bool finite = true;
#if defined(ROLLOUT_CPU_F16C)
  if constexpr (!std::is_same_v<T, double>) {
    const __m256 heads = _mm256_set1_ps(static_cast<float>(H));
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 big = _mm256_set1_ps(std::numeric_limits<float>::max());
    __m256 bad = _mm256_setzero_ps();  // lanes set where |x| > FLT_MAX or x is NaN
    int64_t j = 0;
    for (; j + 8 <= N; j += 8) {  // one read of the H head rows, the accumulator in a register
      __m256 x = load8<T>(a + j);
      __m256 acc = x;
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(x, abs_mask), big, _CMP_NLE_UQ));
      for (int64_t h = 1; h < H; ++h) {
        x = load8<T>(a + h * sH + j);
        acc = fusion_combine8<FUSION>(acc, x);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(x, abs_mask), big, _CMP_NLE_UQ));
      }
      if (FUSION == kFusionMean) acc = _mm256_div_ps(acc, heads);
      _mm256_storeu_ps(f + j, acc);
    }
    finite = _mm256_movemask_ps(bad) == 0;
    for (; j < N; ++j) {
      float x = raw_to_float<T>(a[j]);
      float acc = fusion_first(x);
      finite &= is_finite_value(x);
      for (int64_t h = 1; h < H; ++h) {
        x = raw_to_float<T>(a[h * sH + j]);
        acc = fusion_combine(FUSION, acc, x);
        finite &= is_finite_value(x);
      }
      f[j] = fusion_finish(FUSION, acc, H);
    }
    return finite;
  }
#endif
  int bad = 0;  // integer OR reduction: vectorises
  for (int64_t j = 0; j < N; ++j) {
    const float x = raw_to_float<T>(a[j]);
    f[j] = fusion_first(x);
    bad |= is_finite_value(x) ? 0 : 1;
  }
  for (int64_t h = 1; h < H; ++h) {
    const R* __restrict__ ah = a + h * sH;
    for (int64_t j = 0; j < N; ++j) {
      const float x = raw_to_float<T>(ah[j]);
      f[j] = fusion_combine(FUSION, f[j], x);
      bad |= is_finite_value(x) ? 0 : 1;
    }
  }
  if (FUSION == kFusionMean) {
    for (int64_t j = 0; j < N; ++j) f[j] = fusion_finish(FUSION, f[j], H);
  }
  return bad == 0 && finite;
}

// f[0..n) = head fusion of a[h * sH + e] for a contiguous run of n elements (e.g. a whole (N, N) matrix
// with unit row stride), heads outermost over chunks of kFuseChunk elements: each head's chunk is one
// sequential read and the chunk of f stays in L1. Same values as fuse_row (heads combined in order
// h = 0..H-1, 'mean' divided at the end), so every schedule gives the same bits. False on NaN/inf.
constexpr int64_t kFuseChunk = 2048;

template <typename T, int FUSION>
bool fuse_run(const T* a_typed, int64_t sH, int64_t H, int64_t n, float* __restrict__ f) {
  using R = typename Raw<T>::type;
  const R* a = reinterpret_cast<const R*>(a_typed);
  int bad = 0;  // integer OR reduction: vectorises
  for (int64_t c0 = 0; c0 < n; c0 += kFuseChunk) {
    const int64_t len = std::min(kFuseChunk, n - c0);
    float* __restrict__ fc = f + c0;
    const R* __restrict__ a0 = a + c0;
    for (int64_t j = 0; j < len; ++j) {
      const float x = raw_to_float<T>(a0[j]);
      fc[j] = fusion_first(x);
      bad |= is_finite_value(x) ? 0 : 1;
    }
    for (int64_t h = 1; h < H; ++h) {
      const R* __restrict__ ah = a + h * sH + c0;
      for (int64_t j = 0; j < len; ++j) {
        const float x = raw_to_float<T>(ah[j]);
        fc[j] = fusion_combine(FUSION, fc[j], x);
        bad |= is_finite_value(x) ? 0 : 1;
      }
    }
    if (FUSION == kFusionMean) {
      for (int64_t j = 0; j < len; ++j) fc[j] = fusion_finish(FUSION, fc[j], H);
    }
  }
  return bad == 0;
}

// Sum of a row in a fixed order (8 interleaved partial sums, then a fixed tree).
inline float row_sum(const float* __restrict__ x, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int q = 0; q < 8; ++q) acc[q] += x[j + q];
  for (int q = 0; j < n; ++j, ++q) acc[q] += x[j];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// Row i of M = (discard(F) + I) / rowsum, in place. t = -inf when nothing is discarded.
inline void normalize_row(float* __restrict__ row, int64_t N, int64_t i, float t, bool protect00) {
  const float keep0 = row[0];
  for (int64_t j = 0; j < N; ++j) row[j] = discard_apply(row[j], t, false);
  if (i == 0) row[0] = discard_apply(keep0, t, protect00);
  row[i] = residual_add(row[i], i, i);
  const float s = row_sum(row, N);
  for (int64_t j = 0; j < N; ++j) row[j] = row_normalize(row[j], s);
}

// y += c * x
inline void axpy(float* __restrict__ y, float c, const float* __restrict__ x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += c * x[j];
}

// ------------------------------------------------------------------------------ radix select
// Histograms of many keys are 4 interleaved sub-histograms of kRadixMaxBins counters (consecutive
// keys go to different copies, so runs of one bin do not serialise on one counter), summed before
// the bin search; a few keys use one copy (cheaper to clear and sum).
constexpr int kSubHists = 4;
constexpr int64_t kHistWords = kSubHists * static_cast<int64_t>(kRadixMaxBins);
constexpr int64_t kManyKeys = 16384;

inline void hist_add_keys(const uint32_t* __restrict__ keys, int64_t n, int pass, int copies,
                          uint32_t* __restrict__ h) {
  int64_t e = 0;
  if (copies == kSubHists) {
    for (; e + kSubHists <= n; e += kSubHists)
      for (int q = 0; q < kSubHists; ++q) ++h[q * kRadixMaxBins + radix_digit(keys[e + q], pass)];
  }
  for (; e < n; ++e) ++h[radix_digit(keys[e], pass)];
}

// Sums the sub-histograms into h[0..bins), then the bin holding *rank (updated to the rank inside it).
inline uint32_t hist_find(uint32_t* h, int pass, int copies, uint32_t* rank) {
  const uint32_t bins = radix_bins(pass);
  for (uint32_t b = 0; b < bins; ++b)
    for (int q = 1; q < copies; ++q) h[b] += h[q * kRadixMaxBins + b];
  return radix_find_bin(h, bins, rank);
}

// One pass over x[0..n): *below = #(x < lo); the keys of the values in [lo, hi] go to cand (in order;
// cand holds n + 8 entries); returns their number.
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

inline int64_t gather_bracket(const float* __restrict__ x, int64_t n, float lo, float hi,
                              uint32_t* __restrict__ cand, int64_t* below_out) {
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  __m256i below8 = _mm256_setzero_si256();
  int64_t m = 0, e = 0;
  for (; e + 8 <= n; e += 8) {
    const __m256 v = _mm256_loadu_ps(x + e);
    below8 = _mm256_sub_epi32(below8, _mm256_castps_si256(_mm256_cmp_ps(v, vlo, _CMP_LT_OQ)));
    const int mask = _mm256_movemask_ps(
        _mm256_and_ps(_mm256_cmp_ps(v, vlo, _CMP_GE_OQ), _mm256_cmp_ps(v, vhi, _CMP_LE_OQ)));
    // branch-free: always store 8 lanes (cand has n + 8 entries), advance by the number kept
    const __m256i u = _mm256_castps_si256(v);  // float_to_key, 8 lanes: u ^ (negative ? ~0 : sign)
    const __m256i key = _mm256_xor_si256(u, _mm256_or_si256(_mm256_srai_epi32(u, 31), sign));
    const __m256i perm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLeftPack.idx[mask]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cand + m), _mm256_permutevar8x32_epi32(key, perm));
    m += __builtin_popcount(static_cast<unsigned>(mask));
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), below8);
  int64_t below = 0;
  for (int q = 0; q < 8; ++q) below += lanes[q];
  for (; e < n; ++e) {
    const float v = x[e];
    below += v < lo ? 1 : 0;
    if (v >= lo && v <= hi) cand[m++] = float_to_key(v);
  }
  *below_out = below;
  return m;
}
#else
inline int64_t gather_bracket(const float* __restrict__ x, int64_t n, float lo, float hi,
                              uint32_t* __restrict__ cand, int64_t* below_out) {
  int64_t below = 0, m = 0;
  for (int64_t e = 0; e < n; ++e) {
    const float v = x[e];
    below += v < lo ? 1 : 0;
    if (v >= lo && v <= hi) cand[m++] = float_to_key(v);
  }
  *below_out = below;
  return m;
}
#endif

// Exact radix select: value of rank k (0-based) among the keys[0..m) (reordered, used as scratch).
inline float radix_select_keys(uint32_t* __restrict__ keys, int64_t m, int64_t k, uint32_t* __restrict__ h) {
  uint32_t rank = static_cast<uint32_t>(k), prefix = 0u;
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    if (pass > 0) {  // keep the keys under the prefix chosen so far (branch-free compaction, in place)
      int64_t m2 = 0;
      for (int64_t e = 0; e < m; ++e) {
        const uint32_t key = keys[e];
        keys[m2] = key;
        m2 += radix_prefix_match(key, prefix, pass) ? 1 : 0;
      }
      m = m2;
    }
    const int copies = m >= kManyKeys ? kSubHists : 1;
    std::fill(h, h + copies * static_cast<int64_t>(kRadixMaxBins), 0u);
    hist_add_keys(keys, m, pass, copies, h);
    prefix = radix_extend_prefix(prefix, hist_find(h, pass, copies, &rank), pass);
  }
  return key_to_float(prefix);
}

// Value of rank k (0-based: the (k+1)-th smallest, duplicates counted) of x[0..n). cand: n + 8
// scratch keys; h: kHistWords counters. Large inputs first bracket the answer with an evenly strided sample
// of kSample values (Floyd-Rivest): one pass counts the values below the bracket and gathers those
// inside it, and the radix select runs on that small set. When the bracket misses the rank (unlikely,
// or adversarial input) the radix select runs on all n keys. Either way the result is exact.
constexpr int64_t kSample = 1024;

inline float select_kth(const float* __restrict__ x, int64_t n, int64_t k, uint32_t* __restrict__ h,
                        uint32_t* __restrict__ cand) {
  if (n > 4 * kSample) {
    float* sample = reinterpret_cast<float*>(cand);  // cand is free until the gather below
    for (int64_t t = 0; t < kSample; ++t) sample[t] = x[(t * n) / kSample];
    const double r = static_cast<double>(k) * kSample / static_cast<double>(n);
    const double p = static_cast<double>(k) / static_cast<double>(n);
    const double margin = 4.0 * std::sqrt(kSample * p * (1.0 - p)) + 8.0;
    const int64_t r_lo = std::max<int64_t>(0, static_cast<int64_t>(std::floor(r - margin)));
    const int64_t r_hi = std::min<int64_t>(kSample - 1, static_cast<int64_t>(std::ceil(r + margin)));
    std::nth_element(sample, sample + r_lo, sample + kSample);
    const float lo = r_lo == 0 ? -std::numeric_limits<float>::infinity() : sample[r_lo];
    std::nth_element(sample + r_lo, sample + r_hi, sample + kSample);
    const float hi = r_hi == kSample - 1 ? std::numeric_limits<float>::infinity() : sample[r_hi];
    int64_t below = 0;
    const int64_t m = gather_bracket(x, n, lo, hi, cand, &below);
    if (below <= k && k < below + m) return radix_select_keys(cand, m, k - below, h);
  }
  for (int64_t e = 0; e < n; ++e) cand[e] = float_to_key(x[e]);
  return radix_select_keys(cand, n, k, h);
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

  // Steps 1-3 for every (layer, sample): M (L, B, N, N) float32, parallel over rows. Returns false
  // (M then undefined) when the attention holds a NaN or an infinity.
  bool layers(float* M) const {
    const int64_t N = p.N, NN = N * N, LB = p.L * p.B;
    const int64_t fuse_grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.H * N));
    std::atomic<bool> finite{true};
    if (p.sI == N) {  // rows contiguous: parallel over (layer, sample, chunk) runs, heads outermost
      const int64_t chunks = (NN + kFuseChunk - 1) / kFuseChunk;
      at::parallel_for(0, LB * chunks, 1, [&](int64_t u0, int64_t u1) {
        bool ok = true;
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t lb = u / chunks, c0 = (u % chunks) * kFuseChunk;
          ok &= fuse_run<T, FUSION>(base(lb / p.B, lb % p.B) + c0, p.sH, p.H, std::min(kFuseChunk, NN - c0),
                                    M + lb * NN + c0);
        }
        if (!ok) finite.store(false, std::memory_order_relaxed);
      });
    } else {
      at::parallel_for(0, LB * N, fuse_grain, [&](int64_t r0, int64_t r1) {
        bool ok = true;
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t lb = r / N, i = r % N;
          ok &= fuse_row<T, FUSION>(base(lb / p.B, lb % p.B) + i * p.sI, p.sH, p.H, N, M + lb * NN + i * N);
        }
        if (!ok) finite.store(false, std::memory_order_relaxed);
      });
    }
    if (!finite.load()) return false;
    std::vector<float> thresh(LB, kNoThreshold);
    if (p.k >= 1) {
      at::parallel_for(0, LB, 1, [&](int64_t s0, int64_t s1) {
        std::vector<uint32_t> cand(NN + 8), hist(kHistWords);
        for (int64_t lb = s0; lb < s1; ++lb)
          thresh[lb] = select_kth(M + lb * NN, NN, p.k, hist.data(), cand.data());
      });
    }
    at::parallel_for(0, LB * N, std::max<int64_t>(1, 32768 / N), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t lb = r / N, i = r % N;
        normalize_row(M + lb * NN + i * N, N, i, thresh[lb], p.protect00);
      }
    });
    return true;
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

  // Whole rollout per sample, layers last to first, with an N*N scratch (no stored M). Returns false
  // when the attention holds a NaN or an infinity.
  bool per_sample(int64_t P, int readout, int normalize, float* out) const {
    const int64_t N = p.N, NN = N * N, G = N - P;
    const bool discard = p.k >= 1;
    std::atomic<bool> finite{true};
    at::parallel_for(0, p.B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> F(NN), v(N), vn(N);
      std::vector<uint32_t> cand(discard ? NN + 8 : 0), hist(discard ? kHistWords : 0);
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t i = 0; i < N; ++i) v[i] = readout_init(readout, i, P);
        for (int64_t l = p.L - 1; l >= 0; --l) {
          const T* a = base(l, b);
          bool ok = true;
          if (p.sI == N) {  // rows contiguous: the whole (N, N) matrix is one run per head
            ok = fuse_run<T, FUSION>(a, p.sH, p.H, NN, F.data());
          } else {
            for (int64_t i = 0; i < N; ++i) ok &= fuse_row<T, FUSION>(a + i * p.sI, p.sH, p.H, N, F.data() + i * N);
          }
          if (!ok) {
            finite.store(false, std::memory_order_relaxed);
            return;
          }
          const float t = discard ? select_kth(F.data(), NN, p.k, hist.data(), cand.data()) : kNoThreshold;
          std::fill(vn.begin(), vn.end(), 0.f);
          for (int64_t i = 0; i < N; ++i) {
            float* row = F.data() + i * N;
            normalize_row(row, N, i, t, p.protect00);
            if (v[i] != 0.f) axpy(vn.data(), v[i], row, N);
          }
          v.swap(vn);
        }
        finalize_map(v.data(), N, P, readout, normalize, out + b * G);
      }
    });
    return finite.load();
  }
};

// The op bodies for one dtype/fusion instantiation (see rollout_cpu.cpp); false: non-finite input.
template <typename T, int FUSION>
bool run_layers(const T* att, const Problem& p, float* M) {
  return Kernel<T, FUSION>{att, p}.layers(M);
}

template <typename T, int FUSION>
bool run_rollout(const T* att, const Problem& p, int64_t P, int readout, int normalize, bool per_sample,
                 float* out) {
  const Kernel<T, FUSION> kernel{att, p};
  if (per_sample) return kernel.per_sample(P, readout, normalize, out);
  std::vector<float> M(static_cast<size_t>(p.L * p.B * p.N * p.N));
  if (!kernel.layers(M.data())) return false;
  kernel.chain(M.data(), P, readout, normalize, out);
  return true;
}
