// Decode kernels for x86 CPUs with AVX2 and FMA but no AVX-512 (AMD Zen 2 and 3, Intel client CPUs
// since Alder Lake: most laptops): the part of gemv.cpp that batch-1 decode spends its time in,
// registered as torch.ops.gpt2serve_avx2 with gemv.cpp's schemas, so the model calls either alike.
//
// Why by hand, measured on an AMD EPYC Zen 3 (2 cores, ~13 GB/s read), int8 batch 1: fbgemm's
// dynamic linear of one row was ~70% of a step and read its weights at ~8 GB/s; gathering each
// layer's context (index_select) for SDPA another ~20%. Here:
// - gemv_int8 / gemv_f32: y = act(x W^T + bias) (+ residual) for 1 to 8 rows (gemv_f32's W in fp32,
//   or in bf16 for a bf16 model, widened in registers), W (out, in) streamed
//   once, front to back, with prefetch, as gemv.cpp does. int8 has no VNNI here: vpmaddubsw
//   multiplies u8 by s8 into saturating int16 pairs, so x (quantised per row to [-127, 127], as
//   gemv.cpp's quantize_row) goes in as |x| and W as W * sign(x) (vpsignb): each pair sums to at
//   most 2 * 127 * 127 < 2^15, so the int32 dot product is exact, the same integers gemv.cpp's VNNI
//   sums give, and the epilogue is gemv.cpp's in the same order.
// - decode_attention: one query per sequence over its context, read in place from the paged cache
//   (fp32, bf16 or int8 with scales), one (sequence, head) per task.
// - decode_layers (every block of a decode step of <= 8 sequences in one call), kv_write,
//   argmax_rows, gelu_tanh_ as gemv.cpp's; prefill_attention is torch's SDPA with the chunk's causal
//   mask (on this CPU its flash kernel is what we would write).
// Not here (torch's kernels take these on AVX2 CPUs): the many-row matmuls (panels) and bf16 / AMX
// products (no native bf16: bf16 models run in fp32 arithmetic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

#include "common.h"

constexpr int64_t kMaxRows = 8;
constexpr int kPrefetch = 2048;  // bytes ahead within a weight row's stream, into L2 (as gemv.cpp)

void check_common(const char* name, const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& residual, int64_t act, int64_t align) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), name, ": x (M, K) and w (N, K) expected");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, name, ": 1 to 8 rows");
  TORCH_CHECK(x.size(1) % align == 0, name, ": K must be a multiple of ", align);
  TORCH_CHECK(w.is_contiguous() && x.is_contiguous(), name, ": contiguous x and w expected");
  check_epilogue(name, x.size(0), w.size(0), bias, residual, x.scalar_type(), act);
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline int32_t hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}
inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// exp(x) for 8 floats, gemv.cpp's exp16 (Cephes' polynomial, inputs clamped to +-80 so nothing is
// subnormal) with 2^n built in the exponent bits (no vscalefps before AVX-512)
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(80.f)), _mm256_set1_ps(-80.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);  // 2^n, |n| <= 116
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// GPT-2's GELU: 0.5 v (1 + tanh(z)) = v / (1 + exp(-2z)), z = sqrt(2/pi) (v + 0.044715 v^3)
inline __m256 gelu_tanh8(__m256 v) {
  const __m256 z = _mm256_mul_ps(_mm256_set1_ps(-2.f * 0.7978845608028654f),
                                 _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v), _mm256_mul_ps(v, v), v));
  return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(z)));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {  // bf16 -> fp32: the 16 bits go to the top of each lane
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline __m256 load8(const int8_t* p) {  // an 8-bit KV cache's values, before their scale
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// y[m, n + j] = act(v[j] + bias[n + j]) + residual[m, n + j] for j < nb <= 8 (fp32 outputs)
inline void finish8(float* y, int64_t N, int64_t m, int64_t n, int64_t nb, __m256 v, const float* bias, const float* res, int64_t act) {
  alignas(32) float t[8];
  if (nb == 8) {
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n));
    if (act == 1) v = gelu_tanh8(v);
    _mm256_store_ps(t, v);
  } else {
    _mm256_store_ps(t, v);
    for (int64_t j = 0; j < nb; ++j) t[j] += bias ? bias[n + j] : 0.f;
    if (act == 1) _mm256_store_ps(t, gelu_tanh8(_mm256_load_ps(t)));
  }
  if (act == 2)
    for (int64_t j = 0; j < nb; ++j) t[j] = 0.5f * t[j] * (1.0f + std::erf(t[j] * 0.7071067811865476f));
  for (int64_t j = 0; j < nb; ++j) y[m * N + n + j] = res ? t[j] + res[m * N + n + j] : t[j];
}

// Called after output row n of [n0, n1): finishes the block of 8 it completes (or the last, shorter one).
template <int M>
inline void flush8(const float (&v)[M][8], float* y, int64_t N, int64_t n, int64_t n0, int64_t n1, const float* bias,
                   const float* res, int64_t act) {
  if ((n - n0) % 8 != 7 && n + 1 != n1) return;
  const int64_t nb = (n - n0) % 8 + 1;
  for (int m = 0; m < M; ++m) finish8(y, N, m, n + 1 - nb, nb, _mm256_loadu_ps(v[m]), bias, res, act);
}

// ---------------------------------------------------------------------------------------- int8

// gemv.cpp's quantize_row<false>: s = max|x| / 127, q = round(x / s) to nearest even in [-127, 127]
inline float quantize_row(const float* x, int64_t K, int8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 amax = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
  const float mx = hmax8(amax);
  const float s = mx > 0.f ? mx / 127.f : 1.f;
  const __m256 inv = _mm256_set1_ps(1.f / s);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  for (int64_t k = 0; k < K; k += 8) {
    __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), inv));  // MXCSR: nearest even
    v = _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(w16, w16));
  }
  return s;
}

// 32 exact products q * w summed in pairs, then in 8 int32 lanes: |q| (u8) by w * sign(q) (s8)
inline __m256i dot32(__m256i acc, __m256i q, __m256i w) {
  const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(w, q));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

template <int M>
void int8_rows(const int8_t* xq, const float* xs, const int8_t* w, const float* wscale, const float* bias, const float* res,
               float* y, int64_t K, int64_t N, int64_t n0, int64_t n1, int64_t act) {
  alignas(32) float v[M][8];
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    __m256i acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    for (int64_t k = 0; k < K; k += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + k) + kPrefetch, _MM_HINT_T1);
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k + 32));
      for (int m = 0; m < M; ++m) {
        acc[m][0] = dot32(acc[m][0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + k)), w0);
        acc[m][1] = dot32(acc[m][1], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + k + 32)), w1);
      }
    }
    for (int m = 0; m < M; ++m) {
      const int32_t dot = hsum8i(_mm256_add_epi32(acc[m][0], acc[m][1]));
      // gemv.cpp's finish_int8_16: (dot * xs) * ws, then bias
      v[m][(n - n0) % 8] = static_cast<float>(dot) * xs[m] * wscale[n];
    }
    flush8<M>(v, y, N, n, n0, n1, bias, res, act);
  }
}

// wsum is gemv.cpp's (its VNNI zero point); unused here but kept in the schema, so callers are alike
at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& wsum, const at::Tensor& wscale,
                     const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual, int64_t act) {
  check_common("gemv_int8", x, w, bias, residual, act, 64);
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kChar, "gemv_int8: fp32 x, int8 w");
  TORCH_CHECK(wscale.scalar_type() == at::kFloat && wscale.is_contiguous() && wscale.numel() == w.size(0), "gemv_int8: fp32 wscale (N,)");
  (void)wsum;
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  std::vector<int8_t> xq(M * K);
  std::vector<float> xs(M);
  for (int64_t m = 0; m < M; ++m) xs[m] = quantize_row(x.data_ptr<float>() + m * K, K, xq.data() + m * K);
  at::Tensor y = at::empty({M, N}, x.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = wscale.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const float* rp = residual ? residual->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    with_rows(M, [&](auto rows) { int8_rows<decltype(rows)::value>(xq.data(), xs.data(), wp, sp, bp, rp, yp, K, N, n0, n1, act); });
  });
  return y;
}

// ---------------------------------------------------------------------------------------- fp32

// fp32 arithmetic over fp32 weights, or bf16 weights widened in registers (a bf16 model on this CPU:
// half the bytes to stream at batch 1, the same products as the fp32 model of those weights)
template <int M, typename W>
void f32_rows(const float* x, const W* w, const float* bias, const float* res, float* y, int64_t K, int64_t N,
              int64_t n0, int64_t n1, int64_t act) {
  alignas(32) float v[M][8];
  for (int64_t n = n0; n < n1; ++n) {
    const W* wr = w + n * K;
    __m256 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + k) + kPrefetch, _MM_HINT_T1);
      const __m256 w0 = load8(wr + k), w1 = load8(wr + k + 8);
      for (int m = 0; m < M; ++m) {
        acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), w0, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k + 8), w1, acc[m][1]);
      }
    }
    for (int m = 0; m < M; ++m) v[m][(n - n0) % 8] = hsum8(_mm256_add_ps(acc[m][0], acc[m][1]));
    flush8<M>(v, y, N, n, n0, n1, bias, res, act);
  }
}

// x fp32, w (N, K) fp32 or bf16; y fp32
at::Tensor gemv_f32(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& residual, int64_t act) {
  check_common("gemv_f32", x, w, bias, residual, act, 16);
  TORCH_CHECK(x.scalar_type() == at::kFloat && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "gemv_f32: fp32 x, fp32 or bf16 w");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const float* rp = residual ? residual->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  auto run = [&](const auto* wp) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(wp)>>;
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
      with_rows(M, [&](auto rows) { f32_rows<decltype(rows)::value, W>(xp, wp, bp, rp, yp, K, N, n0, n1, act); });
    });
  };
  if (w.scalar_type() == at::kFloat) run(w.data_ptr<float>());
  else run(w.data_ptr<at::BFloat16>());
  return y;
}

// ---------------------------------------------------------------------------------- GELU, argmax

void gelu_tanh_(at::Tensor x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "gelu_tanh_: contiguous fp32");
  float* p = x.data_ptr<float>();
  const int64_t n = x.numel();
  at::parallel_for(0, (n + 7) / 8, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i = 8 * b;
      if (i + 8 <= n) {
        _mm256_storeu_ps(p + i, gelu_tanh8(_mm256_loadu_ps(p + i)));
      } else {
        alignas(32) float t[8] = {};
        std::memcpy(t, p + i, (n - i) * sizeof(float));
        _mm256_store_ps(t, gelu_tanh8(_mm256_load_ps(t)));
        std::memcpy(p + i, t, (n - i) * sizeof(float));
      }
    }
  });
}

// each row's index of its maximum, the first on ties (torch.argmax's); a NaN is never chosen
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) >= 1 && x.size(1) < (1LL << 31),
              "argmax_rows: contiguous fp32 (M, V) expected");
  const int64_t M = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({M}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* r = xp + m * V;
      __m256 best = _mm256_set1_ps(-INFINITY);
      __m256i idx = _mm256_setzero_si256();  // each lane's index of its maximum so far
      __m256i at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      int64_t v = 0;
      for (; v + 8 <= V; v += 8, at = _mm256_add_epi32(at, _mm256_set1_epi32(8))) {
        const __m256 a = _mm256_loadu_ps(r + v);
        const __m256 gt = _mm256_cmp_ps(a, best, _CMP_GT_OQ);  // strictly greater: the first of equal values stays
        best = _mm256_blendv_ps(best, a, gt);
        idx = _mm256_blendv_epi8(idx, at, _mm256_castps_si256(gt));
      }
      alignas(32) float bv[8];
      alignas(32) int32_t bi[8];
      _mm256_store_ps(bv, best);
      _mm256_store_si256(reinterpret_cast<__m256i*>(bi), idx);
      float mx = -INFINITY;
      int64_t arg = 0;
      for (int j = 0; j < 8; ++j)
        if (bv[j] > mx || (bv[j] == mx && bi[j] < arg)) mx = bv[j], arg = bi[j];
      for (; v < V; ++v)
        if (r[v] > mx) mx = r[v], arg = v;
      op[m] = arg;
    }
  });
  return out;
}

// ------------------------------------------------------------------------- decode attention

template <typename T>
inline __m256 load_scaled8(const T* p, float s) { return load8(p); }
template <>
inline __m256 load_scaled8<int8_t>(const int8_t* p, float s) { return _mm256_mul_ps(load8(p), _mm256_set1_ps(s)); }

// One head of one sequence: softmax(q K^T / sqrt(D)) V over its len slots. ks: an int8 cache's
// scales (S, 2, H), else null. scores: len floats of scratch. D is a multiple of 8, at most 128.
template <typename T>
void attend(const float* q, const T* kv, const float* ks, const int64_t* slots, int64_t len, int64_t H, int64_t D, int64_t h,
            float scale, float* scores, float* out) {
  const int64_t row = 2 * H * D, nv = D / 8;
  __m256 qv[16];
  for (int64_t i = 0; i < nv; ++i) qv[i] = _mm256_mul_ps(_mm256_loadu_ps(q + 8 * i), _mm256_set1_ps(scale));
  float mx = -INFINITY;
  for (int64_t j = 0; j < len; ++j) {
    const T* k = kv + slots[j] * row + h * D;
    if (j + 1 < len) _mm_prefetch(reinterpret_cast<const char*>(kv + slots[j + 1] * row + h * D), _MM_HINT_T0);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nv; ++i) acc = _mm256_fmadd_ps(qv[i], load8(k + 8 * i), acc);
    float s = hsum8(acc);
    if (ks) s *= ks[slots[j] * 2 * H + h];
    scores[j] = s;
    mx = std::max(mx, s);
  }
  float sum = 0.f;
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), _mm256_set1_ps(mx)));
    _mm256_storeu_ps(scores + j, e);
    sum += hsum8(e);
  }
  for (; j < len; ++j) sum += (scores[j] = std::exp(scores[j] - mx));
  __m256 acc[16];
  for (int64_t i = 0; i < nv; ++i) acc[i] = _mm256_setzero_ps();
  for (j = 0; j < len; ++j) {
    const T* v = kv + slots[j] * row + H * D + h * D;
    if (j + 1 < len) _mm_prefetch(reinterpret_cast<const char*>(kv + slots[j + 1] * row + H * D + h * D), _MM_HINT_T0);
    const __m256 p = _mm256_set1_ps(ks ? scores[j] * ks[slots[j] * 2 * H + H + h] : scores[j]);
    for (int64_t i = 0; i < nv; ++i) acc[i] = _mm256_fmadd_ps(p, load8(v + 8 * i), acc[i]);
  }
  const __m256 inv = _mm256_set1_ps(1.f / sum);
  for (int64_t i = 0; i < nv; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(acc[i], inv));
}

// decode_attention without the checks, for arguments check_paged has passed (decode_layers checks a
// step's slots once, not once per layer)
at::Tensor decode_attention_unchecked(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& slots, const at::Tensor& lens,
                                      const c10::optional<at::Tensor>& kv_scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), L = slots.size(1);
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, H, D}, qf.options());
  const float* qp = qf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  auto run = [&](const auto* kvp, const float* ks) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(kvp)>>;
    at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores(L);
      for (int64_t i = i0; i < i1; ++i)
        attend<T>(qp + i * D, kvp, ks, sp + (i / H) * L, lp[i / H], H, D, i % H, scale, scores.data(), op + i * D);
    });
  };
  if (kv.scalar_type() == at::kFloat) run(kv.data_ptr<float>(), nullptr);
  else if (kv.scalar_type() == at::kBFloat16) run(kv.data_ptr<at::BFloat16>(), nullptr);
  else run(kv.data_ptr<int8_t>(), kv_scale->data_ptr<float>());
  return out.to(q.scalar_type());
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& slots, const at::Tensor& lens,
                            const c10::optional<at::Tensor>& kv_scale) {
  TORCH_CHECK(q.dim() == 3, "decode_attention: q (B, H, D) and kv (S, 2, H, D) expected");
  check_paged(q.size(0), q.size(1), q.size(2), kv, slots, lens, kv_scale);
  return decode_attention_unchecked(q, kv, slots, lens, kv_scale);
}

// ------------------------------------------------------------------------- prefill attention

// A prompt chunk's causal attention, q (T, H, D) at positions L-T .. L-1 over kv (L, 2, H, D):
// torch's SDPA (its flash kernel on CPU) in fp32, with the chunk's mask when it continues a context.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& kv, bool bf16) {
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 4 && kv.size(1) == 2 && kv.size(2) == q.size(1) && kv.size(3) == q.size(2),
              "prefill_attention: q (T, H, D) and kv (L, 2, H, D) expected");
  const int64_t T = q.size(0), L = kv.size(0);
  TORCH_CHECK(T >= 1 && L >= T, "prefill_attention: 1 <= T <= L");
  (void)bf16;  // bf16 products need native bf16, which this CPU lacks
  const at::Tensor qp = q.to(at::kFloat).transpose(0, 1).unsqueeze(0);  // (1, H, T, D)
  const at::Tensor kf = kv.to(at::kFloat);
  const at::Tensor k = kf.select(1, 0).transpose(0, 1).unsqueeze(0), v = kf.select(1, 1).transpose(0, 1).unsqueeze(0);
  at::Tensor o;
  if (L == T) {
    o = at::scaled_dot_product_attention(qp, k, v, c10::nullopt, 0.0, true);
  } else {  // query i sees keys up to L - T + i
    const at::Tensor mask = at::arange(L, q.options().dtype(at::kLong)).unsqueeze(0) <=
                            (at::arange(T, q.options().dtype(at::kLong)) + (L - T)).unsqueeze(1);
    o = at::scaled_dot_product_attention(qp, k, v, mask);
  }
  return o.squeeze(0).transpose(0, 1).contiguous().to(q.scalar_type());  // (T, H, D)
}

// ------------------------------------------------------------------------------ K/V writes

// cache[slots[n]] = kv[n] (rounded to the cache's dtype as Tensor.to does), or for an int8 cache each
// head's D values as symmetric int8 with scale max|x| / 127 (gemv.cpp's quantize_head, same bits)
void kv_write(at::Tensor& cache, const at::Tensor& slots, const at::Tensor& kv, const c10::optional<at::Tensor>& scale) {
  check_kv_write(cache, slots, kv, scale);
  const int64_t N = kv.size(0), H = cache.size(2), D = cache.size(3), row = 2 * H * D;
  const int64_t* sp = slots.data_ptr<int64_t>();
  if (scale) {
    const at::Tensor src = kv.to(at::kFloat);  // rows of 2HD contiguous values
    const float* xp = src.data_ptr<float>();
    int8_t* cp = cache.data_ptr<int8_t>();
    float* scp = scale->data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t i = 0; i < 2 * H; ++i) {  // K's heads, then V's
          const float* x = xp + n * src.stride(0) + i * D;
          float mx = 0.f;
          for (int64_t d = 0; d < D; ++d) mx = std::max(mx, std::fabs(x[d]));
          scp[sp[n] * 2 * H + i] = mx / 127.f;
          const float inv = mx > 0.f ? 127.f / mx : 0.f;
          for (int64_t d = 0; d < D; ++d) cp[sp[n] * row + i * D + d] = static_cast<int8_t>(std::nearbyint(x[d] * inv));
        }
    });
    return;
  }
  const at::Tensor src = kv.to(cache.scalar_type());
  const int64_t bytes = row * cache.element_size();
  const char* xp = static_cast<const char*>(src.data_ptr());
  char* cp = static_cast<char*>(cache.data_ptr());
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) std::memcpy(cp + sp[n] * bytes, xp + n * src.stride(0) * src.element_size(), bytes);
  });
}

// ------------------------------------------------------------------------------ decode layers

// Every transformer block of a decode step of <= 4 sequences in one call, as gemv.cpp's
// decode_layers without its many-row kernels: the ops the Python blocks run (gpt2.py), in the same
// order on the same inputs (same result to the bit), without ~15 torch ops a block from Python
// (measured on the AMD Zen 3 machine, int8 batch 1: see the model's DecodeLayers). params: 24
// tensors per layer, as gemv.cpp's (ln_1 weight, bias, ln_2 weight, bias, then 5 per projection:
// mode 0 (int8) q, row sums, scales, bias (or empty), panels (empty); mode 2 (fp32) w, bias, -, -, -).
at::Tensor decode_layers(const at::Tensor& x_in, const std::vector<at::Tensor>& params, const at::Tensor& kv,
                         const at::Tensor& slot_mapping, const at::Tensor& slots, const at::Tensor& lens,
                         int64_t mode, double eps, int64_t n_head, int64_t act, int64_t many,
                         const c10::optional<at::Tensor>& kv_scale) {
  constexpr int64_t kPer = 24;
  const int64_t n_layer = kv.size(0), B = x_in.size(0), C = x_in.size(1), H = n_head, D = C / n_head;
  TORCH_CHECK(mode == 0 || mode == 2, "decode_layers: mode is 0 (int8) or 2 (fp32) in the AVX2 build");
  TORCH_CHECK(many == 0, "decode_layers: the AVX2 build has no many-row kernels (many = 0)");
  check_decode_layers(params, kPer, kv, B, H, D, act, B <= kMaxRows);
  TORCH_CHECK(!kv_scale || (kv_scale->dim() == 4 && kv_scale->size(0) == n_layer), "decode_layers: kv_scale (n_layer, S, 2, H)");
  auto opt = [](const at::Tensor& t) { return t.numel() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
  auto proj = [&](const at::Tensor* p, const at::Tensor& x, int64_t a, const at::Tensor* residual) -> at::Tensor {
    const c10::optional<at::Tensor> res = residual ? c10::optional<at::Tensor>(residual->contiguous()) : c10::nullopt;
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    return mode == 0 ? gemv_int8(xf, p[0], p[1], p[2], opt(p[3]), res, a) : gemv_f32(xf, p[0], opt(p[1]), res, a);
  };
  auto layer_scale = [&](int64_t i) { return kv_scale ? c10::optional<at::Tensor>(kv_scale->select(0, i)) : c10::nullopt; };
  check_paged(B, H, D, kv.select(0, 0), slots, lens, layer_scale(0));  // the same slots and lengths in every layer
  at::Tensor x = x_in;
  for (int64_t i = 0; i < n_layer; ++i) {
    const at::Tensor* p = params.data() + i * kPer;
    at::Tensor kv_l = kv.select(0, i);  // (S, 2, H, D), contiguous
    at::Tensor h = at::layer_norm(x, {C}, p[0], p[1], eps);
    at::Tensor qkv = proj(p + 4, h, 0, nullptr);  // (B, 3C) = [q | k | v]
    const c10::optional<at::Tensor> scale_l = layer_scale(i);
    kv_write(kv_l, slot_mapping, qkv.narrow(1, C, 2 * C).view({B, 2, H, D}), scale_l);
    at::Tensor o = decode_attention_unchecked(qkv.narrow(1, 0, C).view({B, H, D}), kv_l, slots, lens, scale_l);  // (B, H, D)
    x = proj(p + 9, o.reshape({B, C}), 0, &x);
    h = at::layer_norm(x, {C}, p[2], p[3], eps);
    x = proj(p + 19, proj(p + 14, h, act, nullptr), 0, &x);
  }
  return x;
}

}  // namespace

TORCH_LIBRARY(gpt2serve_avx2, m) {
  m.def("gemv_int8(Tensor x, Tensor w, Tensor wsum, Tensor wscale, Tensor? bias, Tensor? residual, int act) -> Tensor");
  m.def("gemv_f32(Tensor x, Tensor w, Tensor? bias, Tensor? residual, int act) -> Tensor");
  m.def("gelu_tanh_(Tensor(a!) x) -> ()");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor kv, Tensor slots, Tensor lens, Tensor? kv_scale=None) -> Tensor");
  m.def("prefill_attention(Tensor q, Tensor kv, bool bf16=True) -> Tensor");
  m.def("kv_write(Tensor(a!) cache, Tensor slots, Tensor kv, Tensor(b!)? scale=None) -> ()");
  m.def("decode_layers(Tensor x, Tensor[] params, Tensor(a!) kv, Tensor slot_mapping, Tensor slots, Tensor lens, "
        "int mode, float eps, int n_head, int act, int many, Tensor(b!)? kv_scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt2serve_avx2, CPU, m) {
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_f32", &gemv_f32);
  m.impl("gelu_tanh_", &gelu_tanh_);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("decode_attention", &decode_attention);
  m.impl("prefill_attention", &prefill_attention);
  m.impl("kv_write", &kv_write);
  m.impl("decode_layers", &decode_layers);
}
