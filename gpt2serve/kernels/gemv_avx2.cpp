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
// - matmul_panels / matmul_int8_panels: the same products for any number of rows (batched decode,
//   prompts) on weights packed in 16-column panels, int8 still exact (see "many rows" below).
// - decode_attention: one query per sequence over its context, read in place from the paged cache
//   (fp32, bf16 or int8 with scales), gemv.cpp's two passes in 8 lanes.
// - decode_layers (every block of a decode step in one call), kv_write, argmax_rows, gelu_tanh_ and
//   prefill_attention (flash style, fp32) as gemv.cpp's.
// Not here: gemv.cpp's matmul_int8 (torch._int_mm, no fast path without VNNI) and the bf16 / AMX
// products (no native bf16: bf16 models run in fp32 arithmetic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
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

// ------------------------------------------------------------------------------------ many rows

// Batched decode and prompts: y (M, N) = act(x W + bias) (+ residual) for any M, on weights packed
// once into panels of 16 output columns (two ymm vectors), each thread taking whole panels, the
// rows in groups of at most 6: a 6 x 16 tile of sums in 12 registers while the panel streams past
// (BLIS's Haswell kernel shape; 16 registers in all). The rows are spread evenly over the groups
// (32 = 6 + 6 + 5 + 5 + 5 + 5), as a group of 2 leaves the FMA units waiting on its few chains.
// The first group of a panel reads it from memory (prefetched 2 KiB ahead into L2), the others
// from cache. Why by hand, measured on the Zen 3 machine (48 block matmuls of GPT-2 124M, taking
// turns in one process): fp32 against oneDNN's packed linear 17.5 vs 21.6 ms at 8 rows, 34.7-47.1
// vs 50.6-53.2 at 32, alike at 128-512; in the engine fp32 batch 8 106 -> 164 tok/s, batch 32
// 216 -> 284 (with decode_layers taking those steps). int8 runs near fbgemm's speed (0.95-1.25x its
// time at 32 rows), but fbgemm quantises the whole batch with one 7-bit scale, so that a row's
// result depends on the rest of its batch, and it leaves decode_layers out. Zen 3 issues vpmaddwd
// (16 products), vpmaddubsw and FMAs 2 a cycle each, vpaddd 4, vpmovsxbw ~1 (measured there): this
// tile's 12 vpmaddwd, 12 vpaddd and 2 widenings per pair of inputs fill its four vector pipes in
// ~6.5 cycles, and it makes ~20 products a cycle alone at 32 rows (fbgemm 22, ~16 and ~19.5 with
// both cores); 8-column panels with 10-12-row tiles (one widening per 10-12 vpmaddwd) were slower.
constexpr int64_t kPanel = 16;
constexpr int kGroupRows = 6;

// f(m0, rows) for M rows in ceil(M / 6) groups of near-equal size
template <typename F>
void for_row_groups(int64_t M, F&& f) {
  const int64_t groups = (M + kGroupRows - 1) / kGroupRows, base = M / groups, extra = M % groups;
  for (int64_t g = 0, m0 = 0; g < groups; ++g) {
    const int64_t rows = base + (g < extra ? 1 : 0);
    f(m0, rows);
    m0 += rows;
  }
}

// fp32: panels (ceil(N / 16), K, 16) fp32, the last zero-padded (pack_panels in gpt2.py with width 16)
template <int MR>
void f32_panel_tile(const float* x, int64_t K, const float* panel, int64_t m0, int64_t n0, int64_t N, const float* bias,
                    const float* res, float* y, int64_t act, bool stream) {
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const float* xr = x + m0 * K;
#pragma GCC unroll 2  // as gemv.cpp's panels: without it GCC moves the accumulators between registers every step
  for (int64_t k = 0; k < K; ++k) {
    if (stream) _mm_prefetch(reinterpret_cast<const char*>(panel + k * kPanel) + kPrefetch, _MM_HINT_T1);
    const __m256 w0 = _mm256_loadu_ps(panel + k * kPanel), w1 = _mm256_loadu_ps(panel + k * kPanel + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 xb = _mm256_broadcast_ss(xr + r * K + k);
      acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
    }
  }
  // out of registers through a plain array: indexing acc by a run-time h made GCC keep a copy of
  // every accumulator on the stack, stored each step
  alignas(32) float sums[MR][16];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(sums[r], acc[r][0]);
    _mm256_store_ps(sums[r] + 8, acc[r][1]);
  }
  for (int h = 0; h < 2; ++h) {
    const int64_t n = n0 + 8 * h;
    if (n >= N) break;  // the last panel's zero padding
    for (int r = 0; r < MR; ++r) finish8(y, N, m0 + r, n, std::min<int64_t>(8, N - n), _mm256_load_ps(sums[r] + 8 * h), bias, res, act);
  }
}

// x: (M, K) fp32; w: (ceil(N / 16), K, 16) fp32 panels, N columns of which are real; bias fp32 (N,)
// or none; residual (M, N) fp32 or none; returns y (M, N) fp32. gemv.cpp's schema (its panels are 32 wide).
at::Tensor matmul_panels(const at::Tensor& x, const at::Tensor& w, int64_t N, const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& residual, int64_t act) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && w.size(2) == kPanel && x.size(1) == w.size(1) && x.size(0) >= 1,
              "matmul_panels: x (M, K) and w (ceil(N/16), K, 16) expected");
  TORCH_CHECK(N > kPanel * (w.size(0) - 1) && N <= kPanel * w.size(0), "matmul_panels: N does not match the panels");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "matmul_panels: contiguous fp32 x and packed fp32 w (the AVX2 build)");
  const int64_t M = x.size(0), K = x.size(1);
  check_epilogue("matmul_panels", M, N, bias, residual, at::kFloat, act);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const float* rp = residual ? residual->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // written out here and in matmul_int8_panels: through one shared helper taking the tile as a
  // lambda, GCC kept this tile's accumulators on the stack (c_fc at 32 rows 3.3 vs 1.1 ms)
  at::parallel_for(0, w.size(0), 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for_row_groups(M, [&](int64_t m0, int64_t rows) {
        with_rows<kGroupRows>(rows, [&](auto r) {
          f32_panel_tile<decltype(r)::value>(xp, K, wp + p * K * kPanel, m0, p * kPanel, N, bp, rp, yp, act, m0 == 0);
        });
      });
  });
  return y;
}

// int8: x quantised per row as the GEMV does (quantize_row: the same q and scale), then widened to
// int16; W in panels (ceil(N / 16), K / 2, 16, 2) int8 (pack_int8_panels with width 16): each pair
// of inputs of the 16 columns side by side, 32 bytes, widened to int16 in two vpmovsxbw, and
// vpmaddwd multiplies them by a broadcast pair of x: 8 columns' int32 sums of two exact products.
// So the dot products are the GEMV's integers (exact, any order) and the epilogue its own:
// (dot * xs) * ws, then finish8, so that a row's result is the GEMV's to the bit. Per pair of
// inputs: two loads with widening, 6 broadcasts, 12 vpmaddwd, 12 vpaddd. (vpmaddubsw, twice the
// products per instruction, would need the GEMV's sign trick per row and vector, or 7-bit
// activations as fbgemm's: no faster, or not the same numbers.)
template <int MR>
void int8_panel_tile(const int16_t* xq, const float* xs, int64_t K, const int8_t* panel, const float* wscale, int64_t m0,
                     int64_t n0, int64_t N, const float* bias, const float* res, float* y, int64_t act, bool stream) {
  __m256i acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const int16_t* xr = xq + m0 * K;
#pragma GCC unroll 2  // see f32_panel_tile
  for (int64_t g = 0; g < K / 2; ++g) {
    if (stream && (g & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(panel + g * 32) + kPrefetch, _MM_HINT_T1);
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(panel + g * 32)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(panel + g * 32 + 16)));
    for (int r = 0; r < MR; ++r) {
      int32_t x2;
      std::memcpy(&x2, xr + r * K + 2 * g, 4);
      const __m256i xb = _mm256_set1_epi32(x2);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(w0, xb));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(w1, xb));
    }
  }
  alignas(32) int32_t sums[MR][16];  // see f32_panel_tile
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(sums[r]), acc[r][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(sums[r] + 8), acc[r][1]);
  }
  for (int h = 0; h < 2; ++h) {
    const int64_t n = n0 + 8 * h;
    if (n >= N) break;  // the last panel's zero padding
    const int64_t nb = std::min<int64_t>(8, N - n);
    alignas(32) float ws[8] = {};
    std::memcpy(ws, wscale + n, nb * sizeof(float));
    const __m256 wsv = _mm256_load_ps(ws);
    for (int r = 0; r < MR; ++r) {
      const __m256i dot = _mm256_load_si256(reinterpret_cast<const __m256i*>(sums[r] + 8 * h));
      const __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(xs[m0 + r])), wsv);
      finish8(y, N, m0 + r, n, nb, v, bias, res, act);
    }
  }
}

// x: (M, K) fp32, K a multiple of 16; w: (ceil(N / 16), K / 2, 16, 2) int8 panels of the GEMV's (N, K)
// weights; wsum unused (gemv.cpp's VNNI zero point; the schema is gemv.cpp's); wscale (N,); returns y (M, N)
at::Tensor matmul_int8_panels(const at::Tensor& x, const at::Tensor& w, const at::Tensor& wsum, const at::Tensor& wscale,
                              const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual, int64_t act) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 4 && w.size(2) == kPanel && w.size(3) == 2 && x.size(1) == 2 * w.size(1) && x.size(0) >= 1,
              "matmul_int8_panels: x (M, K) and w (ceil(N/16), K/2, 16, 2) expected (the AVX2 build)");
  TORCH_CHECK(x.size(1) % 16 == 0, "matmul_int8_panels: K must be a multiple of 16");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && w.scalar_type() == at::kChar && w.is_contiguous(),
              "matmul_int8_panels: contiguous fp32 x, int8 w");
  const int64_t N = wscale.numel(), M = x.size(0), K = x.size(1);
  TORCH_CHECK(N > kPanel * (w.size(0) - 1) && N <= kPanel * w.size(0), "matmul_int8_panels: N does not match the panels");
  TORCH_CHECK(wscale.scalar_type() == at::kFloat && wscale.is_contiguous(), "matmul_int8_panels: fp32 wscale (N,)");
  (void)wsum;
  check_epilogue("matmul_int8_panels", M, N, bias, residual, at::kFloat, act);
  std::unique_ptr<int16_t[]> xq(new int16_t[M * K]);
  std::vector<float> xs(M);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {  // decode batches (<= 64 rows) on this thread
    std::vector<int8_t> q(K);
    for (int64_t m = m0; m < m1; ++m) {
      xs[m] = quantize_row(xp + m * K, K, q.data());
      for (int64_t k = 0; k < K; k += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq.get() + m * K + k),
                            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q.data() + k))));
    }
  });
  at::Tensor y = at::empty({M, N}, x.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = wscale.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const float* rp = residual ? residual->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, w.size(0), 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for_row_groups(M, [&](int64_t m0, int64_t rows) {
        with_rows<kGroupRows>(rows, [&](auto r) {
          int8_panel_tile<decltype(r)::value>(xq.get(), xs.data(), K, wp + p * K * kPanel, sp, m0, p * kPanel, N, bp, rp, yp, act,
                                              m0 == 0);
        });
      });
  });
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

// gemv.cpp's decode attention in 8 lanes: the same two passes per (sequence, head), scores of 8
// keys at a time summed across lanes in one transpose tree, the next block of keys prefetched, and
// every head of a sequence per task where the batch gives each thread a few sequences. Why: one
// horizontal sum per key and head, each key's head fetched only one key ahead at a stride of a
// slot's row (2HD values, across pages), left this latency-bound: 12 layers of batch 32 at a context
// of 96 took 31 ms over an fp32 cache on the Zen 3 machine (~7 GB/s of its ~20).

// Lane i of the result: the sum of the 8 lanes of v[i] (6 hadd, 2 lane swaps, 1 add for 8 sums)
inline __m256 sum_lanes8(const __m256 (&v)[8]) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // [v0..v3 low halves | v0..v3 high]
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

template <typename T>
inline void prefetch_head(const T* p, int64_t D) {  // one head's D values of one slot, into L2
  for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p) + off, _MM_HINT_T1);
}

// An 8-bit cache (T = int8_t) holds each slot's K and V per head as int8 values and one fp32 scale
// (ks: (S, 2, H), K's H scales then V's); float caches pass ks = nullptr.
// The scores of keys [j0, j0 + n) of head h, n <= 8 (rows past n repeat the last), scaled, into s[0..8).
template <typename T, int64_t DC>
inline void score8(const float* qh, const T* kv, const float* ks, const int64_t* slots, int64_t row, int64_t j0, int64_t n,
                   int64_t H, int64_t D_, int64_t h, float scale, float* s) {
  const int64_t D = DC ? DC : D_;
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) {
    const T* k = kv + slots[j0 + std::min<int64_t>(i, n - 1)] * row + h * D;
    acc[i] = _mm256_mul_ps(_mm256_loadu_ps(qh), load8(k));
    for (int64_t d = 8; d < D; d += 8) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), load8(k + d), acc[i]);
  }
  __m256 sc = _mm256_mul_ps(sum_lanes8(acc), _mm256_set1_ps(scale));
  if constexpr (std::is_same<T, int8_t>::value) {
    alignas(32) float f[8];
    for (int i = 0; i < 8; ++i) f[i] = ks[slots[j0 + std::min<int64_t>(i, n - 1)] * 2 * H + h];
    sc = _mm256_mul_ps(sc, _mm256_load_ps(f));
  }
  _mm256_storeu_ps(s, sc);
}

// Head h's softmax over its len scores sh (overwritten by the unnormalised probabilities; room for
// len rounded up to 8) and the weighted sum of its V rows into out (D), the output in registers.
template <typename T, int64_t DC>
inline void softmax_values(float* sh, int64_t len, const T* kv, const float* ks, const int64_t* slots, int64_t H, int64_t D_,
                           int64_t h, float* out) {
  const int64_t D = DC ? DC : D_;
  const int64_t row = 2 * H * D;
  for (int64_t j = len; j < (len + 7) / 8 * 8; ++j) sh[j] = -INFINITY;  // the last block's padding
  __m256 mx = _mm256_set1_ps(-INFINITY);
  for (int64_t j = 0; j < len; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(sh + j));
  const __m256 m = _mm256_set1_ps(hmax8(mx));
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < len; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sh + j), m));  // the padding's -inf: exp8 clamps to e^-80
    _mm256_storeu_ps(sh + j, e);
    if (j + 8 <= len) {
      sum = _mm256_add_ps(sum, e);
    } else {
      alignas(32) float t[8] = {};
      std::memcpy(t, sh + j, (len - j) * sizeof(float));
      sum = _mm256_add_ps(sum, _mm256_load_ps(t));
    }
  }
  const float inv = 1.f / hsum8(sum);
  __m256 acc[16];
  const int64_t nd = D / 8;
  for (int64_t d = 0; d < nd; ++d) acc[d] = _mm256_setzero_ps();
  for (int64_t j = 0; j < len; ++j) {
    if (j + 8 < len) prefetch_head(kv + slots[j + 8] * row + H * D + h * D, D);
    const T* v = kv + slots[j] * row + H * D + h * D;
    float p = sh[j] * inv;
    if constexpr (std::is_same<T, int8_t>::value) p *= ks[slots[j] * 2 * H + H + h];
    const __m256 w = _mm256_set1_ps(p);
    for (int64_t d = 0; d < nd; ++d) acc[d] = _mm256_fmadd_ps(w, load8(v + 8 * d), acc[d]);
  }
  for (int64_t d = 0; d < nd; ++d) _mm256_storeu_ps(out + 8 * d, acc[d]);
}

// One (sequence, head), for batches too small to give each thread whole sequences: the next block's
// K and V of the head prefetched (a stride the hardware prefetchers do not follow).
template <typename T, int64_t DC>
void attend(const float* q, const T* kv, const float* ks, const int64_t* slots, int64_t len, int64_t H, int64_t D_,
            int64_t h, float scale, float* scores, float* out) {
  const int64_t D = DC ? DC : D_;
  const int64_t row = 2 * H * D;
  for (int64_t j0 = 0; j0 < len; j0 += 8) {
    for (int64_t j = j0 + 8; j < std::min<int64_t>(j0 + 16, len); ++j) {
      prefetch_head(kv + slots[j] * row + h * D, D);
      prefetch_head(kv + slots[j] * row + H * D + h * D, D);  // its V, for the second pass
    }
    score8<T, DC>(q, kv, ks, slots, row, j0, std::min<int64_t>(8, len - j0), H, D, h, scale, scores + j0);
  }
  softmax_values<T, DC>(scores, len, kv, ks, slots, H, D, h, out);
}

// Every head of one sequence: a slot's K and V of all heads are one contiguous row, each block of 8
// slots' rows prefetched into L2 while the block before it is scored (spread over its heads), so
// the second pass reads V from L2. scores: (H, len rounded up to 8); out: (H, D).
template <typename T, int64_t DC>
void attend_seq(const float* q, const T* kv, const float* ks, const int64_t* slots, int64_t len, int64_t H, int64_t D_,
                float scale, float* scores, float* out) {
  const int64_t D = DC ? DC : D_;
  const int64_t row = 2 * H * D, Lp = (len + 7) / 8 * 8;
  const int64_t lines = (row * static_cast<int64_t>(sizeof(T)) + 63) / 64;  // cache lines of a slot's row
  const int64_t per_head = (8 * lines + H - 1) / H;                         // the next block's lines per head
  for (int64_t j0 = 0; j0 < len; j0 += 8) {
    const int64_t n = std::min<int64_t>(8, len - j0), nn = std::min<int64_t>(8, len - j0 - 8);
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t l = h * per_head; l < std::min<int64_t>((h + 1) * per_head, nn * lines); ++l)
        _mm_prefetch(reinterpret_cast<const char*>(kv + slots[j0 + 8 + l / lines] * row) + 64 * (l % lines), _MM_HINT_T1);
      if constexpr (std::is_same<T, int8_t>::value)  // an 8-bit cache's scales of the next block
        if (h == 0)
          for (int64_t i = 0; i < nn; ++i) _mm_prefetch(reinterpret_cast<const char*>(ks + slots[j0 + 8 + i] * 2 * H), _MM_HINT_T1);
      score8<T, DC>(q + h * D, kv, ks, slots, row, j0, n, H, D, h, scale, scores + h * Lp + j0);
    }
  }
  for (int64_t h = 0; h < H; ++h) softmax_values<T, DC>(scores + h * Lp, len, kv, ks, slots, H, D, h, out + h * D);
}

// decode_attention without the checks, for arguments check_paged has passed (decode_layers checks a
// step's slots once, not once per layer)
at::Tensor decode_attention_unchecked(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& slots, const at::Tensor& lens,
                                      const c10::optional<at::Tensor>& kv_scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), L = slots.size(1), Lp = (L + 7) / 8 * 8;
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, H, D}, qf.options());
  const float* qp = qf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t threads = at::get_num_threads();
  // dc: the head size compiled in where it is 64 (with_head_size), as in gemv.cpp
  auto run = [&](const auto* kvp, const float* ks, auto dc) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(kvp)>>;
    constexpr int64_t DC = decltype(dc)::value;
    if (B >= 2 * threads) {  // a few whole sequences per thread, handed out one at a time (lengths differ)
      std::atomic<int64_t> next{0};
      at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
        std::vector<float> scores(H * Lp);
        for (int64_t b; (b = next.fetch_add(1)) < B;)
          attend_seq<T, DC>(qp + b * H * D, kvp, ks, sp + b * L, lp[b], H, D, scale, scores.data(), op + b * H * D);
      });
      return;
    }
    at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores(Lp);
      for (int64_t i = i0; i < i1; ++i)
        attend<T, DC>(qp + i * D, kvp, ks, sp + (i / H) * L, lp[i / H], H, D, i % H, scale, scores.data(), op + i * D);
    });
  };
  with_head_size(D, [&](auto dc) { with_cache(kv, kv_scale, [&](const auto* kvp, const float* ks) { run(kvp, ks, dc); }); });
  return out.to(q.scalar_type());
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& slots, const at::Tensor& lens,
                            const c10::optional<at::Tensor>& kv_scale) {
  TORCH_CHECK(q.dim() == 3, "decode_attention: q (B, H, D) and kv (S, 2, H, D) expected");
  check_paged(q.size(0), q.size(1), q.size(2), kv, slots, lens, kv_scale);
  return decode_attention_unchecked(q, kv, slots, lens, kv_scale);
}

// ------------------------------------------------------------------------------ K/V writes

// n fp32 values (a multiple of 16) rounded to bf16 as Tensor.to does: to nearest, ties to even (a NaN
// becomes 0x7fc0, c10::BFloat16's own; torch's vectorised copy writes 0xffff)
inline void to_bf16(const float* x, uint16_t* y, int64_t n) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff), qnan = _mm256_set1_epi32(0x7fc0);
  for (int64_t i = 0; i < n; i += 16) {
    __m256i r[2];
    for (int h = 0; h < 2; ++h) {
      const __m256 f = _mm256_loadu_ps(x + i + 8 * h);
      const __m256i u = _mm256_castps_si256(f);
      const __m256i t = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one))), 16);
      r[h] = _mm256_blendv_epi8(t, qnan, _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
    }
    // packus packs within 128-bit halves (r0 0-3, r1 0-3 | r0 4-7, r1 4-7): the permute restores the order
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xD8));
  }
}

// cache[slots[n]] = kv[n] (rounded to the cache's dtype as Tensor.to does), or for an int8 cache each
// head's D values as symmetric int8 with scale max|x| / 127 (gemv.cpp's quantize_head, same bits).
// fp32 K/V into a bf16 cache (int8 models here) are rounded on the way, without Tensor.to's copy
// (a call from Python, AMD Zen 3: one token 7.1 -> 4.0 us, 32 tokens 24.9 -> 7.4 us; 12 a step)
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
  if (kv.scalar_type() == at::kFloat && cache.scalar_type() == at::kBFloat16) {
    const float* xp = kv.data_ptr<float>();
    uint16_t* cp = reinterpret_cast<uint16_t*>(cache.data_ptr<at::BFloat16>());
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) to_bf16(xp + n * kv.stride(0), cp + sp[n] * row, row);
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

// ------------------------------------------------------------------------- prefill attention

// A prompt chunk's causal attention: T queries at positions L-T .. L-1 against keys 0 .. L-1 (the
// chunk's own K/V when L == T, the whole gathered context for a continuation chunk), query i seeing
// keys up to L-T+i: gemv.cpp's flash-attention tasks (per head and block of queries, key blocks of
// 64 with an online softmax, blocks wholly above the diagonal skipped, scores kept transposed as
// S[key][query] so that every step broadcasts one scalar against 8 queries), in 8 lanes and with
// blocks of 32 queries, whose 3-key x 4-vector tiles fit AVX2's 16 registers. fp32 arithmetic; bf16
// K/V are widened a key block at a time. Why by hand, on the AMD Zen 3 machine (2 threads, 12 layers
// of a 512-token prompt, H 12, D 64, in turns): torch's SDPA (its CPU flash kernel, fp32) 80-95 ms,
// here 43-50 (an int8 prefill of 512 tokens 1083-1143 -> 1265-1324 tok/s).
constexpr int64_t kQB = 32, kKB = 64;  // queries per task (4 vectors), keys per block

// S[j][0..32) = sum_d K[j][d] * Qt[d][0..32) for keys j of [0, nk), three keys at a time (12 sums and
// the three broadcasts in registers; two keys, 8 sums, left the FMAs waiting on their latency:
// 12 layers of a 512-token prompt 57 -> 43 ms with the weighted sum's three rows below); K rows `ks` floats apart
inline void scores_block(const float* qt, const float* k, int64_t ks, int64_t nk, int64_t D, float* S) {
  for (int64_t j0 = 0; j0 < nk; j0 += 3) {
    const float* k0 = k + j0 * ks;
    const float* k1 = k + std::min(j0 + 1, nk - 1) * ks;  // past nk: a valid row, result unused
    const float* k2 = k + std::min(j0 + 2, nk - 1) * ks;
    __m256 a0[4], a1[4], a2[4];
    for (int v = 0; v < 4; ++v) a0[v] = a1[v] = a2[v] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const __m256 b0 = _mm256_broadcast_ss(k0 + d), b1 = _mm256_broadcast_ss(k1 + d), b2 = _mm256_broadcast_ss(k2 + d);
      for (int v = 0; v < 4; ++v) {
        const __m256 qv = _mm256_loadu_ps(qt + d * kQB + 8 * v);
        a0[v] = _mm256_fmadd_ps(b0, qv, a0[v]);
        a1[v] = _mm256_fmadd_ps(b1, qv, a1[v]);
        a2[v] = _mm256_fmadd_ps(b2, qv, a2[v]);
      }
    }
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(S + j0 * kQB + 8 * v, a0[v]);
    if (j0 + 1 < nk)
      for (int v = 0; v < 4; ++v) _mm256_storeu_ps(S + (j0 + 1) * kQB + 8 * v, a1[v]);
    if (j0 + 2 < nk)
      for (int v = 0; v < 4; ++v) _mm256_storeu_ps(S + (j0 + 2) * kQB + 8 * v, a2[v]);
  }
}

// O[i][dc..dc+8NV) = O[i][..] * alpha[i] + sum_j P[j][i] * V[j][dc..] for query rows i of [0, nq), three
// rows at a time (3NV sums in registers). A last group of fewer rows computes the missing ones from
// whatever follows in P (the next key's first probabilities; past P's end, kPSlack floats of slack)
// and does not store them.
constexpr int64_t kPSlack = 8;
template <int NV>
inline void weighted_sum_block(const float* P, const float* vb, int64_t vs, int64_t nk, int64_t nq, int64_t D, int64_t dc,
                               const float* alpha, float* O) {
  for (int64_t i0 = 0; i0 < nq; i0 += 3) {
    const int64_t ni = std::min<int64_t>(3, nq - i0);
    float* o0 = O + i0 * D + dc;
    float* o1 = O + (ni > 1 ? i0 + 1 : i0) * D + dc;
    float* o2 = O + (ni > 2 ? i0 + 2 : i0) * D + dc;
    const __m256 s0 = _mm256_set1_ps(alpha[i0]), s1 = _mm256_set1_ps(ni > 1 ? alpha[i0 + 1] : 0.f),
                 s2 = _mm256_set1_ps(ni > 2 ? alpha[i0 + 2] : 0.f);
    __m256 a0[NV], a1[NV], a2[NV];
    for (int v = 0; v < NV; ++v) {
      a0[v] = _mm256_mul_ps(s0, _mm256_loadu_ps(o0 + 8 * v));
      a1[v] = _mm256_mul_ps(s1, _mm256_loadu_ps(o1 + 8 * v));
      a2[v] = _mm256_mul_ps(s2, _mm256_loadu_ps(o2 + 8 * v));
    }
    for (int64_t j = 0; j < nk; ++j) {
      const float* pj = P + j * kQB + i0;
      const __m256 p0 = _mm256_broadcast_ss(pj), p1 = _mm256_broadcast_ss(pj + 1), p2 = _mm256_broadcast_ss(pj + 2);
      for (int v = 0; v < NV; ++v) {
        const __m256 vv = _mm256_loadu_ps(vb + j * vs + dc + 8 * v);
        a0[v] = _mm256_fmadd_ps(p0, vv, a0[v]);
        a1[v] = _mm256_fmadd_ps(p1, vv, a1[v]);
        a2[v] = _mm256_fmadd_ps(p2, vv, a2[v]);
      }
    }
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(o0 + 8 * v, a0[v]);
    if (ni > 1)
      for (int v = 0; v < NV; ++v) _mm256_storeu_ps(o1 + 8 * v, a1[v]);
    if (ni > 2)
      for (int v = 0; v < NV; ++v) _mm256_storeu_ps(o2 + 8 * v, a2[v]);
  }
}

inline void store_row(float* y, const float* x, int64_t D) { std::memcpy(y, x, D * sizeof(float)); }
inline void store_row(at::BFloat16* y, const float* x, int64_t D) { to_bf16(x, reinterpret_cast<uint16_t*>(y), D); }

// one head, queries [q0, q0 + nq) of the chunk; buffers: qt (D x 32), S (64 x 32 + kPSlack), O (32 x D), kf, vf (64 x D)
template <typename TQ, typename TK>
void prefill_task(const TQ* q, int64_t qs, const TK* k, const TK* v, int64_t ks, TQ* out, int64_t os, int64_t offset,
                  int64_t q0, int64_t nq, int64_t D, float scale, float* qt, float* S, float* O, float* kf, float* vf) {
  queries_transposed<kQB>(q, qs, q0, nq, D, scale, qt);
  std::fill(O, O + kQB * D, 0.f);
  __m256 m[4], l[4];
  for (int vi = 0; vi < 4; ++vi) m[vi] = _mm256_set1_ps(-INFINITY), l[vi] = _mm256_setzero_ps();
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  const int64_t ke = offset + q0 + nq;  // keys [0, ke) are seen by some query of the block
  alignas(32) float alpha[kQB];
  for (int64_t kb = 0; kb < ke; kb += kKB) {
    const int64_t nk = std::min(kKB, ke - kb);
    const float* kp;
    const float* vp;
    int64_t stride;
    if constexpr (std::is_same<TK, float>::value) {
      kp = k + kb * ks, vp = v + kb * ks, stride = ks;
    } else {  // widen the block's bf16 K and V once for every use below
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t d = 0; d < D; d += 8) {
          _mm256_storeu_ps(kf + j * D + d, load8(k + (kb + j) * ks + d));
          _mm256_storeu_ps(vf + j * D + d, load8(v + (kb + j) * ks + d));
        }
      kp = kf, vp = vf, stride = D;
    }
    scores_block(qt, kp, stride, nk, D, S);
    // causal: key kb + j is hidden from query i while kb + j > offset + q0 + i
    const bool diagonal = kb + nk - 1 > offset + q0;
    __m256 mx[4];
    for (int vi = 0; vi < 4; ++vi) mx[vi] = m[vi];
    for (int64_t j = 0; j < nk; ++j)
      for (int vi = 0; vi < 4; ++vi) {
        __m256 sv = _mm256_loadu_ps(S + j * kQB + 8 * vi);
        if (diagonal) {  // lanes i < kb + j - offset - q0 are hidden
          const __m256i hid = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(kb + j - offset - q0)),
                                                 _mm256_add_epi32(iota, _mm256_set1_epi32(8 * vi)));
          sv = _mm256_blendv_ps(sv, ninf, _mm256_castsi256_ps(hid));
          _mm256_storeu_ps(S + j * kQB + 8 * vi, sv);
        }
        mx[vi] = _mm256_max_ps(mx[vi], sv);
      }
    for (int vi = 0; vi < 4; ++vi) {
      // the first block holds key 0, seen by every query: mx is finite from then on
      _mm256_store_ps(alpha + 8 * vi, exp8(_mm256_sub_ps(m[vi], mx[vi])));
      l[vi] = _mm256_mul_ps(l[vi], _mm256_load_ps(alpha + 8 * vi));
      m[vi] = mx[vi];
    }
    for (int64_t j = 0; j < nk; ++j)
      for (int vi = 0; vi < 4; ++vi) {
        const __m256 sv = _mm256_loadu_ps(S + j * kQB + 8 * vi);
        // hidden keys (-inf) give exactly 0, not exp8's clamped e^-80
        const __m256 p = _mm256_and_ps(_mm256_cmp_ps(sv, ninf, _CMP_NEQ_OQ), exp8(_mm256_sub_ps(sv, mx[vi])));
        _mm256_storeu_ps(S + j * kQB + 8 * vi, p);
        l[vi] = _mm256_add_ps(l[vi], p);
      }
    for (int64_t dc = 0; dc < D; dc += 32) {  // D is a multiple of 16
      if (D - dc >= 32) weighted_sum_block<4>(S, vp, stride, nk, nq, D, dc, alpha, O);
      else weighted_sum_block<2>(S, vp, stride, nk, nq, D, dc, alpha, O);
    }
  }
  alignas(32) float lsum[kQB];
  for (int vi = 0; vi < 4; ++vi) _mm256_store_ps(lsum + 8 * vi, l[vi]);
  for (int64_t i = 0; i < nq; ++i) {
    const __m256 inv = _mm256_set1_ps(1.f / lsum[i]);
    float* oi = O + i * D;
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(oi + d, _mm256_mul_ps(_mm256_loadu_ps(oi + d), inv));
    store_row(out + (q0 + i) * os, oi, D);
  }
}

// Returns (T, H, D) in q's dtype. `bf16` (bf16 products, gemv.cpp's vdpbf16ps / AMX path) is ignored:
// without native bf16 the products run in fp32.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& kv, bool bf16) {
  (void)bf16;
  check_prefill(q, kv);
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), L = kv.size(0);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  return prefill_tasks<kQB>(q, kv, D * kQB + kKB * kQB + kPSlack + kQB * D + 2 * kKB * D,
                            [&](auto* qh, auto* kh, auto* vh, auto* oh, int64_t q0, int64_t nq, float* buf) {
    using TQ = std::remove_const_t<std::remove_pointer_t<decltype(qh)>>;
    using TK = std::remove_const_t<std::remove_pointer_t<decltype(kh)>>;
    float *qt = buf, *S = qt + D * kQB, *O = S + kKB * kQB + kPSlack, *kf = O + kQB * D, *vf = kf + kKB * D;
    prefill_task<TQ, TK>(qh, q.stride(0), kh, vh, kv.stride(0), oh, H * D, L - T, q0, nq, D, scale, qt, S, O, kf, vf);
  });
}

// ------------------------------------------------------------------------------ decode layers

// Every transformer block of a decode step in one call, as gemv.cpp's decode_layers: the ops the
// Python blocks run (gpt2.py), in the same order on the same inputs (same result to the bit),
// without ~15 torch ops a block from Python (measured on the AMD Zen 3 machine, int8 batch 1: see
// the model's DecodeLayers). Up to 4 sequences on the GEMV; more with `many` on the panels above
// (matmul_int8_panels, matmul_panels): many = 1 or, int8, 4 (alike: this build has no matmul_int8,
// so its int8 panels take every row count, as the model's modules do here). params: 24 tensors per layer, as gemv.cpp's (ln_1 weight, bias,
// ln_2 weight, bias, then 5 per projection: mode 0 (int8) q, row sums, scales, bias (or empty),
// panels (or empty); mode 2 (fp32) w, bias, -, -, panels).
at::Tensor decode_layers(const at::Tensor& x_in, const std::vector<at::Tensor>& params, const at::Tensor& kv,
                         const at::Tensor& slot_mapping, const at::Tensor& slots, const at::Tensor& lens,
                         int64_t mode, double eps, int64_t n_head, int64_t act, int64_t many,
                         const c10::optional<at::Tensor>& kv_scale) {
  constexpr int64_t kPer = 24, kGemvRows = 4;
  const int64_t n_layer = kv.size(0), B = x_in.size(0), C = x_in.size(1), H = n_head, D = C / n_head;
  TORCH_CHECK(mode == 0 || mode == 2, "decode_layers: mode is 0 (int8) or 2 (fp32) in the AVX2 build");
  TORCH_CHECK(many == 0 || many == 1 || (many == 4 && mode == 0),
              "decode_layers: many is 0 (none), 1 (the panels) or 4 (int8: the panels) in the AVX2 build");
  check_decode_layers(params, kPer, kv, B, H, D, act, B <= kMaxRows || many);
  TORCH_CHECK(!kv_scale || (kv_scale->dim() == 4 && kv_scale->size(0) == n_layer), "decode_layers: kv_scale (n_layer, S, 2, H)");
  auto opt = [](const at::Tensor& t) { return t.numel() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
  // one projection as the module of that mode computes it: the GEMV up to 4 rows (all rows without
  // `many`), above them the panels p[4]
  auto proj = [&](const at::Tensor* p, const at::Tensor& x, int64_t a, const at::Tensor* residual) -> at::Tensor {
    const c10::optional<at::Tensor> res = residual ? c10::optional<at::Tensor>(residual->contiguous()) : c10::nullopt;
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    if (many && B > kGemvRows)
      return mode == 0 ? matmul_int8_panels(xf, p[4], p[1], p[2], opt(p[3]), res, a) : matmul_panels(xf, p[4], p[0].size(0), opt(p[1]), res, a);
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
  m.def("matmul_panels(Tensor x, Tensor w, int n, Tensor? bias, Tensor? residual, int act) -> Tensor");
  m.def("matmul_int8_panels(Tensor x, Tensor w, Tensor wsum, Tensor wscale, Tensor? bias, Tensor? residual, int act) -> Tensor");
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
  m.impl("matmul_panels", &matmul_panels);
  m.impl("matmul_int8_panels", &matmul_int8_panels);
  m.impl("gelu_tanh_", &gelu_tanh_);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("decode_attention", &decode_attention);
  m.impl("prefill_attention", &prefill_attention);
  m.impl("kv_write", &kv_write);
  m.impl("decode_layers", &decode_layers);
}
