// Small-M linear layers for decode: y[m, o] = sum_k x[m, k] * W[o, k] (+ bias[o]), M = 1..a few
// rows, fp32 activations and fp32 accumulation, for the weights in cpmctl.quant's stored format:
//   int8_linear: W = q * scale      q int8 [out, in], scale bf16 [out] (one per row)
//   bf16_linear: W bf16 [out, in]
//   int4_linear: W = (q - 8) * s_g + z_g, q uint8 [out, in / 2] (element 2j in the low nibble,
//                2j + 1 in the high one), s, z bf16 [out, in / group]
// At batch 1 a linear layer is a stream over its weight: each weight byte is read once and used
// M times, so the kernel is built to keep the stream at the memory bandwidth. Each weight value
// is widened to fp32 in registers and multiplied with fp32 activations (AVX-512: 16 values per
// FMA, 4 output rows at a time so that each activation vector loaded serves 4 rows), so the
// product equals dequantize-then-matmul in fp32 up to the order of the sums. Threads split the
// output rows (at::parallel_for, torch's OpenMP runtime). Without AVX-512 a portable loop runs.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define CPMCTL_GEMV_AVX512 1
#endif

namespace {

constexpr int kRows = 4;      // output rows per step
constexpr int kMaxM = 4;      // activation rows per pass; more rows run in passes of kMaxM
// Software prefetch: while R rows are summed, the same cache lines of the rows kPrefetchBlocks
// steps ahead are requested, so DRAM reads overlap the arithmetic (without it the stream ran at
// about half the read bandwidth, as torch's kernel does; benchmarks/cpu_gemv.py). A prefetch past
// the weight's end is a hint and never faults.
#ifndef CPMCTL_GEMV_PREFETCH_BLOCKS
#define CPMCTL_GEMV_PREFETCH_BLOCKS 2
#endif
constexpr int kPrefetchBlocks = CPMCTL_GEMV_PREFETCH_BLOCKS;
constexpr int64_t kGrainBytes = 64 * 1024;  // weight bytes per thread task at least

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// ---- int8 ------------------------------------------------------------------------------------
#ifdef CPMCTL_GEMV_AVX512
inline __m512 load_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load_i8_masked(const int8_t* p, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}
inline __m512 load_bf16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load_bf16_masked(const uint16_t* p, __mmask16 mask) {
  __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// R output rows (R <= kRows) starting at row o, M activation rows; WT is int8_t or uint16_t (bf16).
template <int M, int R, typename WT>
inline void dot_rows_avx512(const float* x, int64_t ldx, const WT* w, int64_t ldw, int64_t K, float out[kRows][kMaxM]) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  constexpr int64_t line = 64 / sizeof(WT);  // weight values per cache line
  for (; k + 16 <= K; k += 16) {
    __m512 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(x + m * ldx + k);
    if (kPrefetchBlocks > 0 && (k & (line - 1)) == 0)  // the same line of the rows kPrefetchBlocks steps ahead
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (r + kPrefetchBlocks * R) * ldw + k), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      __m512 wv;
      if constexpr (sizeof(WT) == 1) wv = load_i8(reinterpret_cast<const int8_t*>(w) + r * ldw + k);
      else wv = load_bf16(reinterpret_cast<const uint16_t*>(w) + r * ldw + k);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  if (k < K) {
    __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * ldx + k);
    for (int r = 0; r < R; ++r) {
      __m512 wv;
      if constexpr (sizeof(WT) == 1) wv = load_i8_masked(reinterpret_cast<const int8_t*>(w) + r * ldw + k, mask);
      else wv = load_bf16_masked(reinterpret_cast<const uint16_t*>(w) + r * ldw + k, mask);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) out[r][m] = _mm512_reduce_add_ps(acc[r][m]);
}
#endif

template <typename WT>
inline float weight_value(const WT* p) {
  if constexpr (sizeof(WT) == 1) return static_cast<float>(*reinterpret_cast<const int8_t*>(p));
  else return bf16_to_float(*reinterpret_cast<const uint16_t*>(p));
}

template <int M, int R, typename WT>
inline void dot_rows(const float* x, int64_t ldx, const WT* w, int64_t ldw, int64_t K, float out[kRows][kMaxM]) {
#ifdef CPMCTL_GEMV_AVX512
  dot_rows_avx512<M, R, WT>(x, ldx, w, ldw, K, out);
#else
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[m * ldx + k] * weight_value(w + r * ldw + k);
      out[r][m] = s;
    }
#endif
}

template <int M, typename WT>
void rows_range(const float* x, int64_t ldx, const WT* w, int64_t K, const uint16_t* scales, const float* bias,
                float* y, int64_t ldy, int64_t o0, int64_t o1) {
  float out[kRows][kMaxM];
  int64_t o = o0;
  auto finish = [&](int64_t row, int r) {
    float s = scales ? bf16_to_float(scales[row]) : 1.f;
    float b = bias ? bias[row] : 0.f;
    for (int m = 0; m < M; ++m) y[m * ldy + row] = out[r][m] * s + b;
  };
  for (; o + kRows <= o1; o += kRows) {
    dot_rows<M, kRows, WT>(x, ldx, w + o * K, K, K, out);
    for (int r = 0; r < kRows; ++r) finish(o + r, r);
  }
  for (; o < o1; ++o) {
    dot_rows<M, 1, WT>(x, ldx, w + o * K, K, K, out);
    finish(o, 0);
  }
}

template <typename WT>
void dense_linear(const float* x, int64_t ldx, int64_t M, const WT* w, int64_t N, int64_t K, const uint16_t* scales,
                  const float* bias, float* y) {
  int64_t grain = std::max<int64_t>(kRows, (kGrainBytes / std::max<int64_t>(1, K * (int64_t)sizeof(WT))) / kRows * kRows);
  for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {
    int64_t mm = std::min<int64_t>(kMaxM, M - m0);
    const float* xs = x + m0 * ldx;
    float* ys = y + m0 * N;
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      switch (mm) {
        case 1: rows_range<1, WT>(xs, ldx, w, K, scales, bias, ys, N, begin, end); break;
        case 2: rows_range<2, WT>(xs, ldx, w, K, scales, bias, ys, N, begin, end); break;
        case 3: rows_range<3, WT>(xs, ldx, w, K, scales, bias, ys, N, begin, end); break;
        default: rows_range<4, WT>(xs, ldx, w, K, scales, bias, ys, N, begin, end); break;
      }
    });
  }
}

// ---- int4 -------------------------------------------------------------------------------------
// x is first rearranged per 32-value block into its even elements then its odd ones (xr), so that
// the low nibbles of 16 bytes meet xr[0..15] and the high nibbles xr[16..31]. Per group g:
//   sum_k x_k W_k = s_g * sum_k x_k q_k + (z_g - 8 s_g) * sum_k x_k
// with the group sums of x (xg) computed once per call.
#ifdef CPMCTL_GEMV_AVX512
// R rows from row o: total[r][m] += the dot products of the int4 rows with x (group by group).
template <int M, int R>
inline void int4_rows_avx512(const float* xr, const float* xg, int64_t K, const uint8_t* q, const uint16_t* sc,
                             const uint16_t* zr, int64_t group, int64_t o, float total[kRows][kMaxM]) {
  const int64_t groups = K / group, half = K / 2;
  const __m512i low_mask = _mm512_set1_epi32(0x0F);
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 lo_part[R][M], hi_part[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) lo_part[r][m] = hi_part[r][m] = _mm512_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
      __m512 xlo[M], xhi[M];
      for (int m = 0; m < M; ++m) {
        xlo[m] = _mm512_loadu_ps(xr + m * K + k);
        xhi[m] = _mm512_loadu_ps(xr + m * K + k + 16);
      }
      if (kPrefetchBlocks > 0 && ((k / 2) & 63) == 0)
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(q + (o + r + kPrefetchBlocks * R) * half + k / 2), _MM_HINT_T0);
      for (int r = 0; r < R; ++r) {
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (o + r) * half + k / 2)));
        __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, low_mask));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
        for (int m = 0; m < M; ++m) {
          lo_part[r][m] = _mm512_fmadd_ps(lo, xlo[m], lo_part[r][m]);
          hi_part[r][m] = _mm512_fmadd_ps(hi, xhi[m], hi_part[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const float s = bf16_to_float(sc[(o + r) * groups + g]);
      const float off = bf16_to_float(zr[(o + r) * groups + g]) - 8.f * s;
      const __m512 sv = _mm512_set1_ps(s);
      for (int m = 0; m < M; ++m) {
        acc[r][m] = _mm512_fmadd_ps(_mm512_add_ps(lo_part[r][m], hi_part[r][m]), sv, acc[r][m]);
        total[r][m] += off * xg[m * groups + g];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) total[r][m] += _mm512_reduce_add_ps(acc[r][m]);
}
#endif

// Portable: one row, any even group size.
template <int M>
inline void int4_row_scalar(const float* xr, const float* xg, int64_t K, const uint8_t* q, const uint16_t* sc,
                            const uint16_t* zr, int64_t group, int64_t o, float total[kMaxM]) {
  const int64_t groups = K / group;
  const uint8_t* row = q + o * (K / 2);
  for (int64_t g = 0; g < groups; ++g) {
    const float s = bf16_to_float(sc[o * groups + g]);
    const float off = bf16_to_float(zr[o * groups + g]) - 8.f * s;
    for (int m = 0; m < M; ++m) {
      float part = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
        const uint8_t b = row[k / 2];
        // xr holds x per 32-block in even/odd order: element k (even) at blk + j, k + 1 at blk + 16 + j
        const int64_t blk = k / 32 * 32, j = (k % 32) / 2;
        part += xr[m * K + blk + j] * float(b & 0x0F) + xr[m * K + blk + 16 + j] * float(b >> 4);
      }
      total[m] += s * part + off * xg[m * groups + g];
    }
  }
}

template <int M>
void int4_rows_range(const float* xr, const float* xg, int64_t K, const uint8_t* q, const uint16_t* sc,
                     const uint16_t* zr, int64_t group, const float* bias, float* y, int64_t ldy, int64_t o0, int64_t o1) {
  int64_t o = o0;
#ifdef CPMCTL_GEMV_AVX512
  if (group % 32 == 0) {
    for (; o + kRows <= o1; o += kRows) {
      float total[kRows][kMaxM] = {};
      int4_rows_avx512<M, kRows>(xr, xg, K, q, sc, zr, group, o, total);
      for (int r = 0; r < kRows; ++r)
        for (int m = 0; m < M; ++m) y[m * ldy + o + r] = total[r][m] + (bias ? bias[o + r] : 0.f);
    }
    for (; o < o1; ++o) {
      float total[kRows][kMaxM] = {};
      int4_rows_avx512<M, 1>(xr, xg, K, q, sc, zr, group, o, total);
      for (int m = 0; m < M; ++m) y[m * ldy + o] = total[0][m] + (bias ? bias[o] : 0.f);
    }
  }
#endif
  for (; o < o1; ++o) {
    float total[kMaxM] = {};
    int4_row_scalar<M>(xr, xg, K, q, sc, zr, group, o, total);
    for (int m = 0; m < M; ++m) y[m * ldy + o] = total[m] + (bias ? bias[o] : 0.f);
  }
}

// ---- operand checks (the Python launchers check first; these guard direct calls) -------------
void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == K &&
                  x.stride(1) == 1,
              "x must be a CPU fp32 [m, ", K, "] tensor with unit stride in its last dimension");
}
void check_bias(const c10::optional<at::Tensor>& bias, int64_t N) {
  if (bias.has_value())
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N &&
                    bias->is_contiguous(),
                "bias must be a contiguous CPU fp32 [", N, "] tensor");
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.is_contiguous(),
              "qweight must be a contiguous CPU int8 [out, in] tensor");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  check_x(x, K);
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.numel() == N && scales.is_contiguous(),
              "scales must be a contiguous bf16 tensor of ", N, " values");
  check_bias(bias, N);
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  dense_linear<int8_t>(x.data_ptr<float>(), x.stride(0), M, qweight.data_ptr<int8_t>(), N, K,
                       reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>()),
                       bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>());
  return y;
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kBFloat16 && weight.dim() == 2 && weight.is_contiguous(),
              "weight must be a contiguous CPU bf16 [out, in] tensor");
  const int64_t N = weight.size(0), K = weight.size(1);
  check_x(x, K);
  check_bias(bias, N);
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  dense_linear<uint16_t>(x.data_ptr<float>(), x.stride(0), M, reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()),
                         N, K, nullptr, bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>());
  return y;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                       int64_t group_size, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.is_contiguous(),
              "qweight must be a contiguous CPU uint8 [out, in / 2] tensor");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2;
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && K % group_size == 0 && K % 32 == 0,
              "int4 needs an even group size dividing the input width, and an input width divisible by 32");
  const int64_t groups = K / group_size;
  check_x(x, K);
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.numel() == N * groups && scales.is_contiguous() &&
                  zeros.scalar_type() == at::kBFloat16 && zeros.numel() == N * groups && zeros.is_contiguous(),
              "scales and zeros must be contiguous bf16 tensors of [", N, ", ", groups, "] values");
  check_bias(bias, N);
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  // the activations rearranged per 32-block (even elements, then odd) and their group sums
  std::vector<float> xr(M * K), xg(M * groups);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* row = xp + m * x.stride(0);
    for (int64_t b = 0; b < K; b += 32)
      for (int64_t j = 0; j < 16; ++j) {
        xr[m * K + b + j] = row[b + 2 * j];
        xr[m * K + b + 16 + j] = row[b + 2 * j + 1];
      }
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) s += row[k];
      xg[m * groups + g] = s;
    }
  }
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  const uint16_t* zr = reinterpret_cast<const uint16_t*>(zeros.data_ptr<at::BFloat16>());
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(1, K / 2));
  for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {
    int64_t mm = std::min<int64_t>(kMaxM, M - m0);
    const float* xrs = xr.data() + m0 * K;
    const float* xgs = xg.data() + m0 * groups;
    float* ys = y.data_ptr<float>() + m0 * N;
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      switch (mm) {
        case 1: int4_rows_range<1>(xrs, xgs, K, q, sc, zr, group_size, bp, ys, N, begin, end); break;
        case 2: int4_rows_range<2>(xrs, xgs, K, q, sc, zr, group_size, bp, ys, N, begin, end); break;
        case 3: int4_rows_range<3>(xrs, xgs, K, q, sc, zr, group_size, bp, ys, N, begin, end); break;
        default: int4_rows_range<4>(xrs, xgs, K, q, sc, zr, group_size, bp, ys, N, begin, end); break;
      }
    });
  }
  return y;
}

bool has_avx512() {
#ifdef CPMCTL_GEMV_AVX512
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(cpmctl_gemv, m) {
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor? bias) -> Tensor");
  m.def("vectorized() -> bool", &has_avx512);
}

TORCH_LIBRARY_IMPL(cpmctl_gemv, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("bf16_linear", &bf16_linear);
  m.impl("int4_linear", &int4_linear);
}
