// Sparse FFN kernels for decoding on a CPU: a few tokens, each reading only the weight rows it uses.
//
// moe_ffn: a mixture-of-experts FFN over the selected experts of each token, in cpmctl.moe's
//   layout (w_in / w_gate / w_out [E, d_e, d]; w_out is the down projection stored transposed, so
//   an expert's neuron is one contiguous row in all three). One call: the up (and gate)
//   projections of the selected experts as dot products against their rows, the activation, the
//   routing weight, then the down projection as a sum of w_out rows scaled by the hidden values,
//   skipping the rows whose hidden value is exactly 0 (a ReLU expert's silent neurons: 0 * row
//   adds nothing, so the result is the same). No gather copies: rows are read in place.
// threshold_gemv / threshold_ffn: TEAL-style activation sparsity. A weight stored transposed
//   ([inputs, outputs], contiguous rows) is read only at the rows of input entries with
//   |x| > threshold; threshold_ffn is cpmctl's ThresholdFeedForward in one call (input threshold
//   before the up/gate projections, hidden threshold before the down projection).
//
// fp32 only, accumulation in fp32. AVX-512 paths under #ifdef __AVX512F__, a portable loop
// otherwise. Work is split with at::parallel_for (torch's thread pool and set_num_threads).
// Operand checks live in sparse_ffn.py (CpuKernelInputError); TORCH_CHECKs here are a backstop.

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

enum Activation : int64_t { RELU = 0, SILU = 1, GELU = 2, GELU_TANH = 3, DRELU = 4 };

inline float activate(float v, int64_t act) {
  switch (act) {
    case RELU:
    case DRELU:
      return v > 0.f ? v : 0.f;
    case SILU:
      return v / (1.f + std::exp(-v));
    case GELU:
      return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    default: {  // GELU_TANH
      const float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.f + std::tanh(inner));
    }
  }
}

// hidden value of one neuron from its up (and gate) pre-activations
inline float neuron(float up, const float* gate, int64_t act) {
  if (gate == nullptr) return activate(up, act);
  if (act == DRELU) up = up > 0.f ? up : 0.f;
  return activate(*gate, act) * up;
}

// dot products of R (1..4) rows of length d with x
template <int R>
inline void dots(const float* const* rows, const float* x, int64_t d, float* out) {
#ifdef __AVX512F__
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(rows[r] + i), xv, acc[r]);
  }
  if (i < d) {
    const __mmask16 m = (__mmask16)((1u << (d - i)) - 1u);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + i);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, rows[r] + i), xv, acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
#else
  for (int r = 0; r < R; ++r) {
    float s = 0.f;
    for (int64_t i = 0; i < d; ++i) s += rows[r][i] * x[i];
    out[r] = s;
  }
#endif
}

inline void dot_rows(const float* base, int64_t count, int64_t d, const float* x, float* out) {
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const float* rows[4] = {base + r * d, base + (r + 1) * d, base + (r + 2) * d, base + (r + 3) * d};
    dots<4>(rows, x, d, out + r);
  }
  for (; r < count; ++r) {
    const float* rows[1] = {base + r * d};
    dots<1>(rows, x, d, out + r);
  }
}

// acc[0:width] += sum_j scale[j] * rows[j][0:width] over `count` rows (pointers already offset)
inline void axpy_rows(float* acc, int64_t width, const float* const* rows, const float* scale, int64_t count) {
  int64_t j = 0;
#ifdef __AVX512F__
  for (; j + 4 <= count; j += 4) {
    const float *r0 = rows[j], *r1 = rows[j + 1], *r2 = rows[j + 2], *r3 = rows[j + 3];
    const __m512 s0 = _mm512_set1_ps(scale[j]), s1 = _mm512_set1_ps(scale[j + 1]);
    const __m512 s2 = _mm512_set1_ps(scale[j + 2]), s3 = _mm512_set1_ps(scale[j + 3]);
    int64_t i = 0;
    for (; i + 16 <= width; i += 16) {
      __m512 a = _mm512_loadu_ps(acc + i);
      a = _mm512_fmadd_ps(s0, _mm512_loadu_ps(r0 + i), a);
      a = _mm512_fmadd_ps(s1, _mm512_loadu_ps(r1 + i), a);
      a = _mm512_fmadd_ps(s2, _mm512_loadu_ps(r2 + i), a);
      a = _mm512_fmadd_ps(s3, _mm512_loadu_ps(r3 + i), a);
      _mm512_storeu_ps(acc + i, a);
    }
    if (i < width) {
      const __mmask16 m = (__mmask16)((1u << (width - i)) - 1u);
      __m512 a = _mm512_maskz_loadu_ps(m, acc + i);
      a = _mm512_fmadd_ps(s0, _mm512_maskz_loadu_ps(m, r0 + i), a);
      a = _mm512_fmadd_ps(s1, _mm512_maskz_loadu_ps(m, r1 + i), a);
      a = _mm512_fmadd_ps(s2, _mm512_maskz_loadu_ps(m, r2 + i), a);
      a = _mm512_fmadd_ps(s3, _mm512_maskz_loadu_ps(m, r3 + i), a);
      _mm512_mask_storeu_ps(acc + i, m, a);
    }
  }
#endif
  for (; j < count; ++j) {
    const float* r = rows[j];
    const float s = scale[j];
    for (int64_t i = 0; i < width; ++i) acc[i] += s * r[i];
  }
}

constexpr int64_t MIN_COLUMNS = 256;  // the narrowest column block a thread takes (1 KB of each row)

// out[0:m] = bias + sum_j scale[j] * rows[j][0:m], split over column blocks, one per thread: a
// thread reads each row's block as one contiguous run (whole rows on one thread)
void sum_rows(float* out, int64_t m, const std::vector<const float*>& rows, const std::vector<float>& scale,
              const float* bias) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), m / MIN_COLUMNS));
  const int64_t COLUMN_BLOCK = ((m + threads - 1) / threads + 15) / 16 * 16;
  const int64_t blocks = (m + COLUMN_BLOCK - 1) / COLUMN_BLOCK;
  const int64_t count = static_cast<int64_t>(rows.size());
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<const float*> shifted(count);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * COLUMN_BLOCK, width = std::min(COLUMN_BLOCK, m - c0);
      float* acc = out + c0;
      if (bias != nullptr) {
        for (int64_t i = 0; i < width; ++i) acc[i] = bias[c0 + i];
      } else {
        std::fill(acc, acc + width, 0.f);
      }
      for (int64_t j = 0; j < count; ++j) shifted[j] = rows[j] + c0;
      axpy_rows(acc, width, shifted.data(), scale.data(), count);
    }
  });
}

const float* optional_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

// ---- threshold (TEAL) ------------------------------------------------------------------------------
// out[m] (+ bias) = sum over k with |x[k]| > threshold of x[k] * rows[k, :]
void threshold_row(const float* x, int64_t k_dim, const float* rows, int64_t m, float threshold, const float* bias,
                   float* out) {
  std::vector<const float*> kept;
  std::vector<float> scale;
  kept.reserve(k_dim);
  scale.reserve(k_dim);
  for (int64_t k = 0; k < k_dim; ++k) {
    if (std::fabs(x[k]) > threshold) {
      kept.push_back(rows + k * m);
      scale.push_back(x[k]);
    }
  }
  sum_rows(out, m, kept, scale, bias);
}

at::Tensor threshold_gemv(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& threshold,
                          const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && rows.dim() == 2 && x.size(1) == rows.size(0), "threshold_gemv: bad shapes");
  TORCH_CHECK(x.is_contiguous() && rows.is_contiguous() && x.scalar_type() == at::kFloat, "threshold_gemv: operands");
  const int64_t n = x.size(0), k_dim = x.size(1), m = rows.size(1);
  auto out = at::empty({n, m}, x.options());
  const float th = threshold.item<float>();
  for (int64_t t = 0; t < n; ++t)
    threshold_row(x.data_ptr<float>() + t * k_dim, k_dim, rows.data_ptr<float>(), m, th, optional_ptr(bias),
                  out.data_ptr<float>() + t * m);
  return out;
}

at::Tensor threshold_ffn(const at::Tensor& x, const at::Tensor& rows_in, const c10::optional<at::Tensor>& rows_gate,
                         const at::Tensor& rows_out, const c10::optional<at::Tensor>& b_in,
                         const c10::optional<at::Tensor>& b_gate, const c10::optional<at::Tensor>& b_out,
                         const at::Tensor& threshold_in, const at::Tensor& threshold_hidden, int64_t activation) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "threshold_ffn: x");
  const int64_t n = x.size(0), d = x.size(1), d_ff = rows_in.size(1);
  const float th_in = threshold_in.item<float>(), th_hidden = threshold_hidden.item<float>();
  const float* gate_rows = optional_ptr(rows_gate);
  auto out = at::empty({n, d}, x.options());
  std::vector<float> up(d_ff), gate(gate_rows ? d_ff : 0);
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x.data_ptr<float>() + t * d;
    std::vector<const float*> kept_in, kept_gate;
    std::vector<float> scale;
    for (int64_t k = 0; k < d; ++k) {
      if (std::fabs(xt[k]) > th_in) {
        kept_in.push_back(rows_in.data_ptr<float>() + k * d_ff);
        if (gate_rows) kept_gate.push_back(gate_rows + k * d_ff);
        scale.push_back(xt[k]);
      }
    }
    sum_rows(up.data(), d_ff, kept_in, scale, optional_ptr(b_in));
    if (gate_rows) sum_rows(gate.data(), d_ff, kept_gate, scale, optional_ptr(b_gate));
    std::vector<const float*> kept_out;
    std::vector<float> hidden;
    for (int64_t j = 0; j < d_ff; ++j) {
      const float h = neuron(up[j], gate_rows ? &gate[j] : nullptr, activation);
      if (std::fabs(h) > th_hidden) {
        kept_out.push_back(rows_out.data_ptr<float>() + j * d);
        hidden.push_back(h);
      }
    }
    sum_rows(out.data_ptr<float>() + t * d, d, kept_out, hidden, optional_ptr(b_out));
  }
  return out;
}

// ---- mixture of experts ------------------------------------------------------------------------------
constexpr int64_t ROW_BLOCK = 32;  // neurons per task of the up projection

// Several tokens: the (token, expert) pairs are taken expert by expert, so an expert's rows are read
// from memory once and reused from cache by the other tokens that chose it (a block of 32 rows, and an
// expert's down-projection rows, stay in L2). Each token's outputs are summed in that order.
at::Tensor moe_ffn(const at::Tensor& x, const at::Tensor& expert_ids, const c10::optional<at::Tensor>& expert_weights,
                   const at::Tensor& w_in, const c10::optional<at::Tensor>& w_gate, const at::Tensor& w_out,
                   const c10::optional<at::Tensor>& b_in, const c10::optional<at::Tensor>& b_gate,
                   const c10::optional<at::Tensor>& b_out, int64_t activation) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "moe_ffn: x");
  TORCH_CHECK(expert_ids.dim() == 2 && expert_ids.scalar_type() == at::kLong && expert_ids.is_contiguous(), "moe_ffn: ids");
  const int64_t n = x.size(0), d = x.size(1), k = expert_ids.size(1), pairs = n * k;
  const int64_t experts = w_in.size(0), de = w_in.size(1);
  const float* xs = x.data_ptr<float>();
  const float* win = w_in.data_ptr<float>();
  const float* wgate = optional_ptr(w_gate);
  const float* wout = w_out.data_ptr<float>();
  const float* bin = optional_ptr(b_in);
  const float* bgate = optional_ptr(b_gate);
  const float* bout = optional_ptr(b_out);
  const float* weights = optional_ptr(expert_weights);
  const int64_t* ids = expert_ids.data_ptr<int64_t>();
  for (int64_t p = 0; p < pairs; ++p)
    TORCH_CHECK(ids[p] >= 0 && ids[p] < experts, "moe_ffn: expert ids must be in [0, ", experts, "), got ", ids[p]);
  auto out = at::empty({n, d}, x.options());
  float* outs = out.data_ptr<float>();
  // pairs sorted by expert (stable), and the runs of one expert
  std::vector<int64_t> order(pairs);
  for (int64_t p = 0; p < pairs; ++p) order[p] = p;
  if (n > 1) std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
  std::vector<int64_t> run_start;
  for (int64_t i = 0; i < pairs; ++i)
    if (i == 0 || ids[order[i]] != ids[order[i - 1]]) run_start.push_back(i);
  const int64_t runs = static_cast<int64_t>(run_start.size());
  run_start.push_back(pairs);
  // up (and gate) projections: tasks of (expert, block of rows), each over the tokens that chose it
  std::vector<float> up(pairs * de), gate(wgate ? pairs * de : 0);
  const int64_t blocks_per_run = (de + ROW_BLOCK - 1) / ROW_BLOCK;
  at::parallel_for(0, runs * blocks_per_run, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t u = b / blocks_per_run, r0 = (b % blocks_per_run) * ROW_BLOCK;
      const int64_t count = std::min(ROW_BLOCK, de - r0);
      const int64_t offset = ids[order[run_start[u]]] * de + r0;
      for (int64_t i = run_start[u]; i < run_start[u + 1]; ++i) {
        const int64_t p = order[i];
        const float* xt = xs + (p / k) * d;
        dot_rows(win + offset * d, count, d, xt, up.data() + p * de + r0);
        if (wgate) dot_rows(wgate + offset * d, count, d, xt, gate.data() + p * de + r0);
      }
    }
  });
  // hidden values, routing weight applied; the rows of the down projection each pair reads (silent
  // neurons, exactly 0, are skipped), in expert order
  std::vector<const float*> rows;
  std::vector<float> hidden;
  std::vector<int64_t> pair_start(pairs + 1, 0), pair_token(pairs);
  rows.reserve(pairs * de);
  hidden.reserve(pairs * de);
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t p = order[i], e = ids[p];
    const float w = weights ? weights[p] : 1.f;
    pair_start[i] = static_cast<int64_t>(rows.size());
    pair_token[i] = p / k;
    for (int64_t r = 0; r < de; ++r) {
      const int64_t q = p * de + r;
      float u = up[q];
      if (bin) u += bin[e * de + r];
      float g = 0.f;
      if (wgate) {
        g = gate[q];
        if (bgate) g += bgate[e * de + r];
      }
      const float h = neuron(u, wgate ? &g : nullptr, activation) * w;
      if (h != 0.f) {  // a silent neuron's row adds nothing: skipped
        rows.push_back(wout + (e * de + r) * d);
        hidden.push_back(h);
      }
    }
  }
  pair_start[pairs] = static_cast<int64_t>(rows.size());
  // down projection: column blocks (one per thread), pairs in expert order within each
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), d / MIN_COLUMNS));
  const int64_t block = ((d + threads - 1) / threads + 15) / 16 * 16;
  const int64_t blocks = (d + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t c_lo, int64_t c_hi) {
    std::vector<const float*> shifted;
    for (int64_t c = c_lo; c < c_hi; ++c) {
      const int64_t c0 = c * block, width = std::min(block, d - c0);
      for (int64_t t = 0; t < n; ++t) {
        float* acc = outs + t * d + c0;
        if (bout != nullptr) {
          for (int64_t i = 0; i < width; ++i) acc[i] = bout[c0 + i];
        } else {
          std::fill(acc, acc + width, 0.f);
        }
      }
      for (int64_t i = 0; i < pairs; ++i) {
        const int64_t count = pair_start[i + 1] - pair_start[i];
        shifted.resize(count);
        for (int64_t j = 0; j < count; ++j) shifted[j] = rows[pair_start[i] + j] + c0;
        axpy_rows(outs + pair_token[i] * d + c0, width, shifted.data(), hidden.data() + pair_start[i], count);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(cpmctl_sparse_ffn, m) {
  m.def("moe_ffn(Tensor x, Tensor expert_ids, Tensor? expert_weights, Tensor w_in, Tensor? w_gate, Tensor w_out, "
        "Tensor? b_in, Tensor? b_gate, Tensor? b_out, int activation) -> Tensor");
  m.def("threshold_gemv(Tensor x, Tensor rows, Tensor threshold, Tensor? bias) -> Tensor");
  m.def("threshold_ffn(Tensor x, Tensor rows_in, Tensor? rows_gate, Tensor rows_out, Tensor? b_in, Tensor? b_gate, "
        "Tensor? b_out, Tensor threshold_in, Tensor threshold_hidden, int activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpmctl_sparse_ffn, CPU, m) {
  m.impl("moe_ffn", &moe_ffn);
  m.impl("threshold_gemv", &threshold_gemv);
  m.impl("threshold_ffn", &threshold_ffn);
}
