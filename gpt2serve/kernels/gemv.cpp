// Decode kernels for x86 CPUs with AVX-512 (VNNI, BF16): small-batch matrix-vector products (int8,
// bf16 and fp32 weights), GPT-2's GELU, and attention over the paged KV cache (at the end of this file).
//
// Why by hand: batch-1 decode reads every weight once per token, so it runs at the speed the
// weights stream from memory. torch's kernels for one row do not stream bf16 or int8 weights well
// on our machines: measured over the 49 weight matmuls of a GPT-2 124M step, oneDNN's packed bf16
// linear reads 10-11 GB/s and fbgemm's int8 dynamic linear ~15, where a plain fp32 `x @ W` reads
// 24-25 on the Intel machines (and ~16 on the AMD one, where MKL takes no AVX-512 path). These
// kernels do one thing: y[m, n] = act(sum_k x[m, k] * W[n, k] + bias[n]) (+ residual) for 1 to 8
// rows, W in (out, in) row-major order. Each output row's weights are read once, front to back,
// with software prefetch 2 KiB ahead (the hardware prefetcher alone leaves the memory system idle
// between rows; +20-30% measured), and applied to every row of x while in registers. Work is split
// over output rows with at::parallel_for, i.e. torch's own OpenMP threads.
//
// int8: W is symmetric int8 with one scale per output row; x is quantised per row to u8 with a
// zero point of 128 (VNNI's vpdpbusd multiplies u8 by s8), and the zero point comes back out
// through the precomputed row sums of W: sum((q + 128) * w) - 128 * sum(w) = sum(q * w).
// bf16: x is in bf16 and vdpbf16ps accumulates pairs of products in fp32. fp32: plain FMAs (dot64).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

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
// the projection modules' row counts (gpt2.py): the GEMV up to gemv_rows = 4, int8's matmul_int8
// from matmul_rows = 64 unless the panels take every row count (decode_layers computes as the modules do)
constexpr int64_t kGemvRows = 4, kInt8MatmulRows = 64;
// bytes ahead of the current read, within the same weight stream, into L2 (_MM_HINT_T1): on the
// Zen 4 machine the 49 one-row GEMVs of a step took 7.6 -> 6.8 ms bf16 and 4.9 -> 4.2 ms int8 against
// 4096 bytes into L1 (T0), whose few fill buffers these many streams' prefetches overrun
constexpr int kPrefetch = 2048;


void check_common(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& residual, int64_t act, int64_t align) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv: x (M, K) and w (N, K) expected");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "gemv: 1 to 8 rows");
  TORCH_CHECK(x.size(1) % align == 0, "gemv: K must be a multiple of ", align);
  TORCH_CHECK(w.is_contiguous() && x.is_contiguous(), "gemv: contiguous x and w expected");
  check_epilogue("gemv", x.size(0), w.size(0), bias, residual, x.scalar_type(), act);
}

// exp(x) for 16 floats: x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' degree-6 polynomial (within
// ~2 ulp of expf), times 2^n by vscalefps. Inputs are clamped to +-80 so that neither the result
// nor its reciprocal is ever subnormal: a subnormal costs a microcode assist per lane (10x slower
// here with GPT-2's large negative pre-activations), and the one use below needs 1 + exp(x) only.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(80.f)), _mm512_set1_ps(-80.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts: exact first product
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// 2^t for 16 floats t <= 0 in the lanes of m (0 in the others), to ~4e-5 relative: for softmax
// weights rounded to bf16 next (an ulp of 4e-3), where exp16's accuracy costs 5 more instructions.
// t = n + f, |f| <= 1/2, 2^f by its degree-4 Taylor polynomial, times 2^n by vscalefps; t is
// clamped at -100, so no result is subnormal (see exp16).
inline __m512 exp2_16(__m512 t, __mmask16 m) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-100.f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(9.6181291e-3f);  // ln(2)^k / k!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(m, p, n);
}

// GPT-2's GELU for 16 floats: 0.5 v (1 + tanh(z)) = v / (1 + exp(-2z)), z = sqrt(2/pi) (v + 0.044715 v^3)
inline __m512 gelu_tanh16(__m512 v) {
  const __m512 z = _mm512_mul_ps(_mm512_set1_ps(-2.f * 0.7978845608028654f),
                                 _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), v), _mm512_mul_ps(v, v), v));  // -2z
  // v / d with d = 1 + exp(-2z) >= 1: rcp14 and one Newton step (~1 ulp; vdivps is 4x slower)
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), exp16(z));
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
  return _mm512_mul_ps(v, r);
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {  // bf16 -> fp32: the 16 bits go to the top of each lane
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m512 load16(const int8_t* p) {  // an 8-bit KV cache's values, before their scale
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 k) {  // bf16 -> fp32: the 16 bits go to the top of each lane
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}
// The first n of 16 lanes (n >= 16: all).
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }
inline void store16(float* p, __mmask16 k, __m512 v) { _mm512_mask_storeu_ps(p, k, v); }
inline void store16(at::BFloat16* p, __mmask16 k, __m512 v) {  // round to nearest even, as c10's float -> bf16
  _mm256_mask_storeu_epi16(p, k, (__m256i)_mm512_cvtneps_pbh(v));
}

// y[m, n + j] = act(v[j] + bias[n + j]) + residual[m, n + j] for j < nb <= 16, written in the
// output's dtype: a kernel finishes its output rows 16 at a time. One at a time, with the scalar
// std::tanh, the finish of c_fc's 3072 rows cost about as long as streaming their int8 weights.
// Exact GELU ("gelu" checkpoints) of nb <= 16 floats, one at a time: no vector erf here. Out of
// line, so that its stack array and calls do not weigh on finish16's common paths in every kernel
// (the AMX int8 kernel's finish took 2.2 -> 1.8 ms for 512 x 768 x 3072 on one thread without it
// inline).
__attribute__((noinline)) __m512 gelu_erf16(__m512 v, int64_t nb) {
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  for (int64_t j = 0; j < nb; ++j) t[j] = 0.5f * t[j] * (1.0f + std::erf(t[j] * 0.7071067811865476f));
  return _mm512_load_ps(t);
}

template <typename Out>
inline void finish16(Out* y, int64_t N, int64_t m, int64_t n, int64_t nb, __m512 v, const float* bias,
                     const Out* res, int64_t act) {
  const __mmask16 k = static_cast<__mmask16>((1u << nb) - 1);
  if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, bias + n));
  if (act == 1) v = gelu_tanh16(v);
  else if (act == 2) v = gelu_erf16(v, nb);
  if (res) v = _mm512_add_ps(v, load16(res + m * N + n, k));
  store16(y + m * N + n, k, v);
}

// Called after output row n of [n0, n1): finishes the block of 16 it completes (or the last, shorter one).
template <int M, typename Out>
inline void flush16(const float (&v)[M][16], Out* y, int64_t N, int64_t n, int64_t n0, int64_t n1, const float* bias,
                    const Out* res, int64_t act) {
  if ((n - n0) % 16 != 15 && n + 1 != n1) return;
  const int64_t nb = (n - n0) % 16 + 1;
  const __mmask16 k = static_cast<__mmask16>((1u << nb) - 1);
  for (int m = 0; m < M; ++m) finish16<Out>(y, N, m, n + 1 - nb, nb, _mm512_maskz_loadu_ps(k, v[m]), bias, res, act);
}

// The int8 kernels' finish of 16 outputs of row m: exact int32 dot products (the activations' zero
// point already out) to fp32, times the row's scale xs and the columns' scales ws (from
// column_scales16, loaded once by callers that finish many rows), then finish16.
inline void finish_int8_16(float* y, int64_t N, int64_t m, int64_t n, int64_t nb, __m512i dot, float xs, __m512 ws,
                           const float* bias, const float* res, int64_t act) {
  finish16<float>(y, N, m, n, nb, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(xs)), ws), bias, res, act);
}

// The weights' scales of columns [n, n + nb), nb <= 16.
inline __m512 column_scales16(const float* wscale, int64_t n, int64_t nb) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << nb) - 1), wscale + n);
}

// 128 times the weights' row sums of columns [n, n + nb): the activations' zero point (u8 = q + 128),
// to subtract from the VNNI / AMX sums: sum((q + 128) * w) - 128 * sum(w) = sum(q * w).
inline __m512i zero_points16(const int32_t* wsum, int64_t n, int64_t nb) {
  return _mm512_mullo_epi32(_mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << nb) - 1), wsum + n), _mm512_set1_epi32(128));
}

inline void prefetch2(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + kPrefetch, _MM_HINT_T1);
  _mm_prefetch(static_cast<const char*>(p) + kPrefetch + 64, _MM_HINT_T1);
}


// ---------------------------------------------------------------------------------------- int8

// One row of activations to symmetric int8: s = max|x| / 127, q = round(x / s) in [-127, 127] (to
// nearest even, as std::nearbyint). Returns s. Offset: store q + 128 as u8 (the GEMV's VNNI operand)
// instead of q. K is a multiple of 16. The GEMV and matmul_int8 quantise with this one function, so
// a row's int8 result does not depend on which of them ran it, nor on the other rows of the batch.
template <bool Offset>
inline float quantize_row(const float* x, int64_t K, int8_t* q) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  const float mx = _mm512_reduce_max_ps(amax);
  const float s = mx > 0.f ? mx / 127.f : 1.f;
  const __m512 inv = _mm512_set1_ps(1.f / s);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t k = 0; k < K; k += 16) {
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), inv));  // MXCSR: nearest even
    v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
    if (Offset) v = _mm512_add_epi32(v, _mm512_set1_epi32(128));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(v));
  }
  return s;
}

// What every int8 kernel call reads besides the weights: x's rows quantised (u8 = q + 128, VNNI's
// u8 operand) with their scales, the weights' row sums and scales, and the epilogue's bias and
// residual (fp32, or null). xq holds a multiple of `row_multiple` rows, the extra rows zero (the
// AMX kernel's tiles are 16 rows high). Rows are quantised on torch's threads, 64 at a time: a
// prompt's x is large (512 x 3072 fp32 is 6 MB), and on one thread its quantisation took 0.5 ms of
// the MLP's 1.3 ms down projection on the AMX Xeon. xq is not zero-filled first (only its padding).
struct Int8Args {
  struct Bytes {
    std::unique_ptr<uint8_t[]> p;
    uint8_t* data() const { return p.get(); }
  } xq;
  std::vector<float> xs;
  const int32_t* wsum;
  const float* wscale;
  const float* bias;
  const float* res;
  Int8Args(const at::Tensor& x, const at::Tensor& wsum_t, const at::Tensor& wscale_t, const c10::optional<at::Tensor>& b,
           const c10::optional<at::Tensor>& r, int64_t row_multiple = 1)
      : xs(x.size(0)), wsum(wsum_t.data_ptr<int32_t>()), wscale(wscale_t.data_ptr<float>()),
        bias(b ? b->data_ptr<float>() : nullptr), res(r ? r->data_ptr<float>() : nullptr) {
    const int64_t M = x.size(0), K = x.size(1);
    const int64_t Mp = (M + row_multiple - 1) / row_multiple * row_multiple;
    xq.p.reset(new uint8_t[Mp * K]);  // uninitialised: every real row is written below
    std::memset(xq.data() + M * K, 0, (Mp - M) * K);
    const float* xp = x.data_ptr<float>();
    uint8_t* qp = xq.data();
    at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {  // decode batches (<= 64 rows) on this thread
      for (int64_t m = m0; m < m1; ++m) xs[m] = quantize_row<true>(xp + m * K, K, reinterpret_cast<int8_t*>(qp + m * K));
    });
  }
};

template <int M>
void int8_rows(const uint8_t* xq, const float* xs, const int8_t* w, const int32_t* wsum, const float* wscale,
               const float* bias, const float* res, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1, int64_t act) {
  alignas(64) float v[M][16];
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    __m512i acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 128) {
      prefetch2(wr + k);
      const __m512i w0 = _mm512_loadu_si512(wr + k), w1 = _mm512_loadu_si512(wr + k + 64);
      for (int m = 0; m < M; ++m) {
        acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], _mm512_loadu_si512(xq + m * K + k), w0);
        acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], _mm512_loadu_si512(xq + m * K + k + 64), w1);
      }
    }
    for (int m = 0; m < M; ++m) {
      const int32_t dot = _mm512_reduce_add_epi32(_mm512_add_epi32(acc[m][0], acc[m][1])) - 128 * wsum[n];
      v[m][(n - n0) % 16] = static_cast<float>(dot) * xs[m] * wscale[n];
    }
    flush16<M>(v, y, N, n, n0, n1, bias, res, act);
  }
}

at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& wsum, const at::Tensor& wscale,
                     const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual, int64_t act) {
  check_common(x, w, bias, residual, act, 128);
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kChar, "gemv_int8: fp32 x, int8 w");
  TORCH_CHECK(wsum.scalar_type() == at::kInt && wscale.scalar_type() == at::kFloat, "gemv_int8: int32 wsum, fp32 wscale");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const Int8Args a(x, wsum, wscale, bias, residual);
  at::Tensor y = at::empty({M, N}, x.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    with_rows(M, [&](auto rows) {
      int8_rows<decltype(rows)::value>(a.xq.data(), a.xs.data(), wp, a.wsum, a.wscale, a.bias, a.res, yp, K, N, n0, n1, act);
    });
  });
  return y;
}

// Many rows (prompts, large decode batches): the GEMV's int8 arithmetic, with the product on torch's
// int8 GEMM (at::_int_mm: oneDNN's VNNI kernels) instead of fbgemm's dynamic linear. Activations are
// quantised per row (quantize_row, as in the GEMV), products are exact in int32, and the epilogue
// is the GEMV's: y = act(dot * xs[m] * wscale[n] + bias[n]) + residual, in the same order. So a
// row's result is the same to the bit whether it ran here or in gemv_int8, and whatever else is in
// the batch (fbgemm quantises the whole batch with one scale, to 7 bits). w: (N, K) int8 as the
// GEMV's.
at::Tensor matmul_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& wscale,
                       const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual, int64_t act) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.size(0) >= 1, "matmul_int8: x (M, K) and w (N, K) expected");
  TORCH_CHECK(x.size(1) % 16 == 0, "matmul_int8: K must be a multiple of 16");
  TORCH_CHECK(w.is_contiguous() && x.is_contiguous(), "matmul_int8: contiguous x and w expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kChar, "matmul_int8: fp32 x, int8 w");
  TORCH_CHECK(wscale.scalar_type() == at::kFloat && wscale.is_contiguous() && wscale.numel() == w.size(0), "matmul_int8: fp32 wscale (N,)");
  check_epilogue("matmul_int8", x.size(0), w.size(0), bias, residual, at::kFloat, act);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kChar));
  std::vector<float> xs(M);
  const float* xp = x.data_ptr<float>();
  int8_t* qp = xq.data_ptr<int8_t>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) xs[m] = quantize_row<false>(xp + m * K, K, qp + m * K);
  });
  const at::Tensor acc = at::_int_mm(xq, w.t());  // (M, N) int32
  at::Tensor y = at::empty({M, N}, x.options());
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* sc = wscale.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const float* rp = residual ? residual->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = 0; n < N; n += 16) {
        const int64_t nb = std::min<int64_t>(16, N - n);
        const __m512i dot = _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << nb) - 1), ap + m * N + n);
        finish_int8_16(yp, N, m, n, nb, dot, xs[m], column_scales16(sc, n, nb), bp, rp, act);
      }
  });
  return y;
}

// The prefetches of k step g of a many-row panel kernel (each step reads 128 bytes of its panel of
// panel_bytes): the first 8-row group streams its own panel 2 KiB ahead, and with more than 8 rows
// each group (`group` of `groups`) also fetches its share of the next panel into L2, <= 64 bytes a
// step, so the weights stream while the later groups compute on the cached panel.
inline void panel_step_prefetch(const void* panel, int64_t panel_bytes, int64_t g, int64_t group, int64_t groups) {
  const char* p = reinterpret_cast<const char*>(panel);
  if (groups > 1) _mm_prefetch(p + panel_bytes + group * panel_bytes / groups + g * 128 / groups, _MM_HINT_T1);
  if (group == 0) {
    _mm_prefetch(p + g * 128 + kPrefetch, _MM_HINT_T1);
    _mm_prefetch(p + g * 128 + kPrefetch + 64, _MM_HINT_T1);
  }
}

// int8 for 5 to ~63 rows (batched decode, short prompts): the GEMV's arithmetic again (x per row to
// u8 + 128 by quantize_row, exact int32 dot products, the same epilogue, so a row's result is the
// GEMV's to the bit), but tiled: weights in panels of 32 output columns, each k-group of 4 inputs
// one 128-byte row (32 columns x 4 bytes, vpdpbusd's layout), an 8 x 32 tile of int32 sums in 16
// registers; per 4 k: two loads, 8 broadcasts of 4 x bytes, 16 vpdpbusd.
// With more than 8 rows the panel is read once per 8-row group, from memory only by the first
// (panel_step_prefetch).
template <int MR>
void int8_panel_tile(const uint8_t* xq, const float* xs, int64_t K, const int8_t* panel, const int32_t* wsum,
                     const float* wscale, int64_t m0, int64_t n0, int64_t N, const float* bias, const float* res,
                     float* y, int64_t act, int64_t group = 0, int64_t groups = 1) {
  __m512i acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
  const uint8_t* xr = xq + m0 * K;
#pragma GCC unroll 2  // GCC otherwise copies every accumulator between registers each iteration: 32 rows 6.9 -> 5.6 ms
  for (int64_t g = 0; g < K / 4; ++g) {
    panel_step_prefetch(panel, K * 32, g, group, groups);
    const __m512i w0 = _mm512_loadu_si512(panel + g * 128), w1 = _mm512_loadu_si512(panel + g * 128 + 64);
    for (int r = 0; r < MR; ++r) {
      int32_t x4;
      std::memcpy(&x4, xr + r * K + 4 * g, 4);
      const __m512i xb = _mm512_set1_epi32(x4);
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], xb, w0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], xb, w1);
    }
  }
  for (int h = 0; h < 2; ++h) {
    const int64_t n = n0 + 16 * h;
    if (n >= N) break;  // the last panel's zero padding
    const int64_t nb = std::min<int64_t>(16, N - n);
    const __m512i zp = zero_points16(wsum, n, nb);
    const __m512 ws = column_scales16(wscale, n, nb);
    for (int r = 0; r < MR; ++r)
      finish_int8_16(y, N, m0 + r, n, nb, _mm512_sub_epi32(acc[r][h], zp), xs[m0 + r], ws, bias, res, act);
  }
}

// The arguments of the int8 panel kernels (matmul_int8_panels, matmul_int8_amx): x (M, K) fp32 with K a
// multiple of k_multiple, the panels of the GEMV's (N, K) weights, wsum / wscale (N,). Returns N.
int64_t check_int8_panels(const char* name, const at::Tensor& x, const at::Tensor& w, const at::Tensor& wsum,
                          const at::Tensor& wscale, const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& residual, int64_t act, int64_t k_multiple) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 4 && w.size(2) == 32 && w.size(3) == 4 && x.size(1) == 4 * w.size(1) && x.size(0) >= 1,
              name, ": x (M, K) and w (ceil(N/32), K/4, 32, 4) expected");
  TORCH_CHECK(x.size(1) % k_multiple == 0, name, ": K must be a multiple of ", k_multiple);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && w.scalar_type() == at::kChar && w.is_contiguous(),
              name, ": contiguous fp32 x, int8 w");
  const int64_t N = wsum.numel();
  TORCH_CHECK(N > 32 * (w.size(0) - 1) && N <= 32 * w.size(0), name, ": N does not match the panels");
  TORCH_CHECK(wsum.scalar_type() == at::kInt && wsum.is_contiguous() && wscale.scalar_type() == at::kFloat && wscale.is_contiguous() &&
              wscale.numel() == N, name, ": int32 wsum, fp32 wscale (N,)");
  check_epilogue(name, x.size(0), N, bias, residual, at::kFloat, act);
  return N;
}

// x: (M, K) fp32; w: (ceil(N / 32), K / 4, 32, 4) int8 panels (pack_int8_panels in gpt2.py) of the
// GEMV's (N, K) weights, wsum / wscale their row sums and scales (N,); returns y (M, N) fp32
at::Tensor matmul_int8_panels(const at::Tensor& x, const at::Tensor& w, const at::Tensor& wsum, const at::Tensor& wscale,
                              const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual, int64_t act) {
  const int64_t N = check_int8_panels("matmul_int8_panels", x, w, wsum, wscale, bias, residual, act, 16);
  const int64_t M = x.size(0), K = x.size(1);
  const Int8Args a(x, wsum, wscale, bias, residual);
  at::Tensor y = at::empty({M, N}, x.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, w.size(0), 1, [&](int64_t p0, int64_t p1) {
    const int64_t groups = (M + 7) / 8;
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t m0 = 0; m0 < M; m0 += 8)
        with_rows(std::min<int64_t>(8, M - m0), [&](auto rows) {
          int8_panel_tile<decltype(rows)::value>(a.xq.data(), a.xs.data(), K, wp + p * K * 32, a.wsum, a.wscale, m0, p * 32, N,
                                                 a.bias, a.res, yp, act, m0 / 8, p + 1 < p1 ? groups : 1);
        });
  });
  return y;
}

// ------------------------------------------------------------------------------ bf16 and fp32

// One step of a row's dot product: 64 bytes of x against 64 bytes of W. bf16: vdpbf16ps adds pairs
// of products into 16 fp32 lanes; fp32: plain FMAs. fp32 because MKL's `x @ W` streams fp32 weights
// at ~26 GB/s on the Intel machines but ~17 on the AMD Zen 4 one (no AVX-512 path on AMD CPUs),
// where this loop reads ~30.
inline __m512 dot64(__m512 acc, const float* x, __m512i w) { return _mm512_fmadd_ps(_mm512_loadu_ps(x), _mm512_castsi512_ps(w), acc); }
inline __m512 dot64(__m512 acc, const at::BFloat16* x, __m512i w) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x), (__m512bh)w);
}

template <int M, typename T>
void float_rows(const T* x, const T* w, const float* bias, const T* res, T* y,
                int64_t K, int64_t N, int64_t n0, int64_t n1, int64_t act) {
  constexpr int64_t kVec = 64 / sizeof(T);  // elements per 64-byte vector; a step reads two
  alignas(64) float v[M][16];
  for (int64_t n = n0; n < n1; ++n) {
    const T* wr = w + n * K;
    __m512 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 2 * kVec) {
      prefetch2(wr + k);
      const __m512i w0 = _mm512_loadu_si512(wr + k), w1 = _mm512_loadu_si512(wr + k + kVec);
      for (int m = 0; m < M; ++m) {
        acc[m][0] = dot64(acc[m][0], x + m * K + k, w0);
        acc[m][1] = dot64(acc[m][1], x + m * K + k + kVec, w1);
      }
    }
    for (int m = 0; m < M; ++m) v[m][(n - n0) % 16] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
    flush16<M>(v, y, N, n, n0, n1, bias, res, act);
  }
}

// gemv_bf16 (T = at::BFloat16) and gemv_f32 (T = float): x, W, residual and y all of type T
template <typename T>
at::Tensor gemv_float(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& residual, int64_t act) {
  constexpr bool bf16 = std::is_same<T, at::BFloat16>::value;
  const char* name = bf16 ? "gemv_bf16" : "gemv_f32";
  const at::ScalarType dt = bf16 ? at::kBFloat16 : at::kFloat;
  check_common(x, w, bias, residual, act, 128 / sizeof(T));
  TORCH_CHECK(x.scalar_type() == dt && w.scalar_type() == dt, name, ": ", bf16 ? "bf16" : "fp32", " x and w");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const T* rp = residual ? residual->data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    with_rows(M, [&](auto rows) { float_rows<decltype(rows)::value, T>(xp, wp, bp, rp, yp, K, N, n0, n1, act); });
  });
  return y;
}

// ------------------------------------------------------------------ bf16 and fp32 weights, many rows

// y (M, N) = act(x W + bias) (+ residual) for any M, W in bf16, arithmetic in fp32 FMAs: for CPUs
// whose bf16 dot product (vdpbf16ps) runs at half the FMA rate, as the Intel Xeon without AMX we
// measured, where oneDNN's bf16 linear made 166 GFLOP/s against its fp32 one's 327 at 512 rows.
// W is packed once (pack_panels in gpt2.py) into panels of 32 output columns, each panel
// K rows of 64 bytes, a row interleaving columns c and c + 16 in each 32-bit pair: one 64-byte load
// then widens to two fp32 vectors (columns 0-15: shift left 16; 16-31: the high halves masked),
// one instruction per 16 weights. An 8 x 32 tile of y lives in 16 registers while the panel and x
// stream past: per k, one load, two widenings, 8 broadcasts of x and 16 FMAs.
// Also for fp32 weights (W = float: panels of 32 columns in order, two loads per k), where it beat
// oneDNN's fp32 linear at 8-32 rows (48 block matmuls: 8 rows 8.5 vs 11.0 ms, 32 rows 20.9 vs 23.1).

// the two fp32 vectors of panel row k: bf16 pairs widened (W = uint32_t), or fp32 as stored (W = float)
inline void panel_row(const uint32_t* panel, int64_t k, __m512& w0, __m512& w1) {
  const __m512i w = _mm512_loadu_si512(panel + k * 16);
  w0 = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  w1 = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline void panel_row(const float* panel, int64_t k, __m512& w0, __m512& w1) {
  w0 = _mm512_loadu_ps(panel + k * 32);
  w1 = _mm512_loadu_ps(panel + k * 32 + 16);
  _mm_prefetch(reinterpret_cast<const char*>(panel + k * 32) + kPrefetch + 64, _MM_HINT_T1);
}

// y's rows m0.. m0 + MR, columns n0 .. n0 + 32 from an MR x 32 tile of sums (two vectors a row); the
// last panel's columns past N are zero padding: not written
template <int MR, typename T>
inline void finish_tile32(const __m512 (&acc)[MR][2], T* y, int64_t N, int64_t m0, int64_t n0, const float* bias,
                          const T* res, int64_t act) {
  for (int r = 0; r < MR; ++r) {
    if (n0 < N) finish16<T>(y, N, m0 + r, n0, std::min<int64_t>(16, N - n0), acc[r][0], bias, res, act);
    if (n0 + 16 < N) finish16<T>(y, N, m0 + r, n0 + 16, std::min<int64_t>(16, N - n0 - 16), acc[r][1], bias, res, act);
  }
}

template <int MR, typename T, typename W>
void panel_tile(const float* x, int64_t K, const W* panel, int64_t m0, int64_t n0, int64_t N, const float* bias,
              const T* res, T* y, int64_t act) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const float* xr = x + m0 * K;
  constexpr int64_t kRow = std::is_same<W, float>::value ? 32 : 16;  // W elements per panel row
  for (int64_t k = 0; k < K; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(panel + k * kRow) + kPrefetch, _MM_HINT_T1);
    __m512 w0, w1;
    panel_row(panel, k, w0, w1);
    for (int r = 0; r < MR; ++r) {
      const __m512 xb = _mm512_set1_ps(xr[r * K + k]);
      acc[r][0] = _mm512_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xb, w1, acc[r][1]);
    }
  }
  finish_tile32<MR, T>(acc, y, N, m0, n0, bias, res, act);
}

// x: (M, K) fp32 or bf16; w: (ceil(N / 32), K, 32) bf16 or fp32 panels (see above), N columns of which are
// real (the rest zero); bias fp32 (N,) or none; residual (M, N) in x's dtype or none; returns y
// (M, N) in x's dtype
at::Tensor matmul_panels(const at::Tensor& x, const at::Tensor& w, int64_t N, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& residual, int64_t act) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && w.size(2) == 32 && x.size(1) == w.size(1) && x.size(0) >= 1,
              "matmul_panels: x (M, K) and w (ceil(N/32), K, 32) expected");
  TORCH_CHECK(N > 32 * (w.size(0) - 1) && N <= 32 * w.size(0), "matmul_panels: N does not match the panels");
  TORCH_CHECK((w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat) && w.is_contiguous(), "matmul_panels: packed bf16 or fp32 w");
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && x.is_contiguous(), "matmul_panels: contiguous fp32 or bf16 x");
  const int64_t M = x.size(0), K = x.size(1);
  check_epilogue("matmul_panels", M, N, bias, residual, x.scalar_type(), act);
  const at::Tensor xf = x.to(at::kFloat).contiguous();  // broadcast from fp32: a bf16 x is widened once
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = xf.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  auto run = [&](auto* yp, const auto* rp) {
    using T = std::remove_pointer_t<decltype(yp)>;
    auto panels = [&](const auto* wp, int64_t per_panel) {
      using W = std::remove_const_t<std::remove_pointer_t<decltype(wp)>>;
      // each thread takes whole panels: a panel (K x 64 or 128 bytes) stays in L1/L2 for every tile of
      // rows (blocking the rows by 64 as well, so that prompts' x stays in L2, measured slower)
      at::parallel_for(0, w.size(0), 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const W* panel = wp + p * per_panel;
          for (int64_t m0 = 0; m0 < M; m0 += 8)
            with_rows(std::min<int64_t>(8, M - m0), [&](auto rows) {
              panel_tile<decltype(rows)::value, T, W>(xp, K, panel, m0, p * 32, N, bp, rp, yp, act);
            });
        }
      });
    };
    if (w.scalar_type() == at::kBFloat16) panels(reinterpret_cast<const uint32_t*>(w.data_ptr<at::BFloat16>()), K * 16);
    else panels(w.data_ptr<float>(), K * 32);
  };
  if (x.scalar_type() == at::kFloat)
    run(y.data_ptr<float>(), residual ? residual->data_ptr<float>() : static_cast<const float*>(nullptr));
  else
    run(y.data_ptr<at::BFloat16>(), residual ? residual->data_ptr<at::BFloat16>() : static_cast<const at::BFloat16*>(nullptr));
  return y;
}

// y (M, N) = act(x W + bias) (+ residual), x and W bf16, on vdpbf16ps (AVX-512 BF16): for CPUs whose
// bf16 dot product runs at twice the fp32 FMA rate, as AMD Zen 4 (measured: 3.7 G vdpbf16ps/s on one
// core, 235 GFLOP/s, where oneDNN's bf16 linear made ~130 a core at 32 rows). W in the AMX kernel's
// panels (pack_amx_bf16: 32 columns, each pair of inputs side by side), so one 64-byte load is 16
// columns x 2 inputs, and a row of x is read as 32-bit pairs, broadcast. An 8 x 32 tile of y lives
// in 16 registers: per input pair, two loads, 8 broadcasts and 16 dot products. With more than 8
// rows the panel is read once per 8-row group (panel_step_prefetch).
template <int MR, typename T>
void dot_tile(const at::BFloat16* x, int64_t K, const uint32_t* panel, int64_t m0, int64_t n0, int64_t N, const float* bias,
              const T* res, T* y, int64_t act, int64_t group = 0, int64_t groups = 1) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const int32_t* xr = reinterpret_cast<const int32_t*>(x + m0 * K);  // pairs of inputs
  const int64_t G = K / 2;
  for (int64_t g = 0; g < G; ++g) {  // panel row g: 32 uint32, columns 0-15 then 16-31, each two inputs
    panel_step_prefetch(panel, G * 128, g, group, groups);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + g * 32), w1 = (__m512bh)_mm512_loadu_si512(panel + g * 32 + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(xr[r * G + g]);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
    }
  }
  finish_tile32<MR, T>(acc, y, N, m0, n0, bias, res, act);
}

// The arguments of the kernels on pair-layout bf16 panels (matmul_bf16_dot, matmul_bf16_amx): x (M,
// K) bf16, w (ceil(N / 32), K / 2, 32, 2) bf16 (pack_amx_bf16), N columns of which are real.
void check_bf16_pairs(const char* name, const at::Tensor& x, const at::Tensor& w, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 4 && w.size(2) == 32 && w.size(3) == 2 && x.size(1) == 2 * w.size(1) && x.size(0) >= 1,
              name, ": x (M, K) and w (ceil(N/32), K/2, 32, 2) expected");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && w.scalar_type() == at::kBFloat16 && w.is_contiguous(),
              name, ": contiguous bf16 x and w");
  TORCH_CHECK(N > 32 * (w.size(0) - 1) && N <= 32 * w.size(0), name, ": N does not match the panels");
}

// x: (M, K) bf16; w: (ceil(N / 32), K / 2, 32, 2) bf16 (pack_amx_bf16); bias fp32 (N,) or none;
// residual (M, N) bf16 or none; returns y (M, N) bf16
at::Tensor matmul_bf16_dot(const at::Tensor& x, const at::Tensor& w, int64_t N, const c10::optional<at::Tensor>& bias,
                           const c10::optional<at::Tensor>& residual, int64_t act) {
  check_bf16_pairs("matmul_bf16_dot", x, w, N);
  const int64_t M = x.size(0), K = x.size(1);
  check_epilogue("matmul_bf16_dot", M, N, bias, residual, x.scalar_type(), act);
  at::Tensor y = at::empty({M, N}, x.options());
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(w.data_ptr<at::BFloat16>());
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const at::BFloat16* rp = residual ? residual->data_ptr<at::BFloat16>() : nullptr;
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  // each thread takes whole panels, as matmul_panels (16-row tiles against half panels: 16 x 16
  // columns, one load per 16 dot products, measured faster with the panel in cache, 32 rows 0.67 ->
  // 0.40 ms for 768 x 3072, but slower streaming the weights from memory, 48 block matmuls 17 -> 20 ms)
  at::parallel_for(0, w.size(0), 1, [&](int64_t p0, int64_t p1) {
    const int64_t groups = (M + 7) / 8;
    for (int64_t p = p0; p < p1; ++p) {
      const uint32_t* panel = wp + p * K * 16;
      for (int64_t m0 = 0; m0 < M; m0 += 8)
        with_rows(std::min<int64_t>(8, M - m0), [&](auto rows) {
          dot_tile<decltype(rows)::value, at::BFloat16>(xp, K, panel, m0, p * 32, N, bp, rp, yp, act, m0 / 8,
                                                        p + 1 < p1 ? groups : 1);
        });
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------- GELU

// GPT-2's GELU (tanh approximation, gelu_tanh16), in place. torch's vectorised tanh made this 123 us
// for a (32, 3072) batch-32 activation here, ~12% of an int8 batch-32 step; this is a few us.
void gelu_tanh_(at::Tensor x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "gelu_tanh_: contiguous fp32 expected");
  float* p = x.data_ptr<float>();
  const int64_t n = x.numel();
  at::parallel_for(0, (n + 15) / 16, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i = b * 16;
      const __mmask16 mask = i + 16 <= n ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
      _mm512_mask_storeu_ps(p + i, mask, gelu_tanh16(_mm512_maskz_loadu_ps(mask, p + i)));
    }
  });
}

// ---------------------------------------------------------------------------------------- argmax

// Each row's index of its maximum, the first on ties (as torch.argmax): x (M, V) fp32 -> (M,) int64.
// Why: greedy decoding takes it over the 50,257 logits of every sequence each step, and torch's
// max(dim).indices took ~0.8-0.9 ms for 32 rows on AMD Zen 4 (2-3% of a batch-32 step). Per lane the
// first of equal values is kept (strictly greater replaces), then the lowest index among the lanes
// holding the maximum. NaN compares false: a NaN logit is never chosen (torch would choose it).
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) >= 1 && x.size(1) < (1LL << 31),
              "argmax_rows: contiguous fp32 (M, V) expected");
  const int64_t M = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({M}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t m = m0; m < m1; ++m) {
      const float* r = xp + m * V;
      __m512 best = _mm512_set1_ps(-INFINITY);
      __m512i idx = _mm512_setzero_si512();  // each lane's index of its maximum so far
      for (int64_t v = 0; v < V; v += 16) {
        const __mmask16 k = first_lanes(V - v);
        const __m512 a = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, r + v);
        const __mmask16 gt = _mm512_cmp_ps_mask(a, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, gt, a);
        idx = _mm512_mask_mov_epi32(idx, gt, _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(v))));
      }
      const float mx = _mm512_reduce_max_ps(best);
      op[m] = _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(best, _mm512_set1_ps(mx), _CMP_EQ_OQ), idx);
    }
  });
  return out;
}

// ------------------------------------------------------------------------- decode attention

// One query per sequence against its context in the paged cache, read in place: the torch path
// gathers every context's K/V into a new tensor (read + write) and SDPA reads that copy again, so
// the context crosses the memory bus three times; here once. kv: (S, 2, H, D) of one layer (K then
// V of each slot), slots: (B, L) int64 cache slots of each context (padded), lens: (B,) int64.
// Two passes per (sequence, head): scores and their softmax, then the weighted sum of V, in fp32.

template <_mm_hint Hint = _MM_HINT_T0, typename T>
inline void prefetch_head(const T* p, int64_t D) {  // one head's D values of one slot
  for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p) + off, Hint);
}

// Lane i of the result: the sum of the 16 lanes of v[bitrev4(i)] (v is overwritten). A tree of 15
// pair combinations, 4 instructions each, where 16 separate horizontal sums take ~10 with long
// dependency chains: the scores of 16 keys for the price of ~4 horizontal sums.
inline __m512 sum_lanes16(__m512 (&v)[16]) {
  // combine(a, b) over blocks of 2s lanes: the lower s lanes of each block a's pair sums, the upper b's
  auto combine = [](__m512 a, __m512 b, __mmask16 upper, auto swap) {
    return _mm512_add_ps(_mm512_mask_blend_ps(upper, a, b), swap(_mm512_mask_blend_ps(upper, b, a)));
  };
  auto swap8 = [](__m512 x) { return _mm512_shuffle_f32x4(x, x, 0x4E); };
  auto swap4 = [](__m512 x) { return _mm512_shuffle_f32x4(x, x, 0xB1); };
  auto swap2 = [](__m512 x) { return _mm512_permute_ps(x, 0x4E); };
  auto swap1 = [](__m512 x) { return _mm512_permute_ps(x, 0xB1); };
  for (int i = 0; i < 8; ++i) v[i] = combine(v[2 * i], v[2 * i + 1], 0xFF00, swap8);
  for (int i = 0; i < 4; ++i) v[i] = combine(v[2 * i], v[2 * i + 1], 0xF0F0, swap4);
  for (int i = 0; i < 2; ++i) v[i] = combine(v[2 * i], v[2 * i + 1], 0xCCCC, swap2);
  return combine(v[0], v[1], 0xAAAA, swap1);
}
constexpr int kBitrev4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

// Decode attention's arithmetic for one (sequence, head), shared by both ways of splitting the work
// (attend: one head per task; attend_seq: every head of a sequence per task), so a sequence's
// result does not depend on how many others share its batch. Why this shape: one horizontal sum
// and one scalar exp per (key, head), and the output re-read from memory per key, made the bf16
// cache's attention compute-bound (batch 32, a context of 96, 12 layers: 8.3-8.9 ms, ~13 GB/s;
// 5.5 ms over an 8-bit cache).
//
// An 8-bit cache (T = int8_t) holds each slot's K and V per head as int8 values and one fp32 scale
// (ks: (S, 2, H), K's H scales then V's): a score is the int8 dot product times the K scale, and a
// V row's weight is its probability times the V scale. Float caches pass ks = nullptr.

// The scores of 16 keys of head h (keys j0 + i for i < n; kr[i]: the slot row of key j0 +
// bitrev4(i), repeated past n), scaled, into s[0..16): 16 dot products summed across lanes at once.
template <typename T, int64_t DC>
inline void score16(const float* qh, const T* const (&kr)[16], const float* ks, const int64_t* slots, int64_t j0, int64_t n,
                    int64_t H, int64_t D_, int64_t h, float scale, float* s) {
  const int64_t D = DC ? DC : D_;
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) {
    acc[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(qh + d), load16(kr[i] + h * D + d), acc[i]);
  }
  __m512 sc = _mm512_mul_ps(sum_lanes16(acc), _mm512_set1_ps(scale));  // acc[i] held key bitrev4(i): lane i is key i
  if constexpr (std::is_same<T, int8_t>::value) {
    alignas(64) float f[16];
    for (int i = 0; i < 16; ++i) f[i] = ks[slots[j0 + std::min<int64_t>(i, n - 1)] * 2 * H + h];
    sc = _mm512_mul_ps(sc, _mm512_load_ps(f));
  }
  _mm512_storeu_ps(s, sc);
}

// kr for the block of keys [j0, j0 + n): slot rows in bitrev4 order (score16)
template <typename T>
inline void block_rows(const T* kv, const int64_t* slots, int64_t row, int64_t j0, int64_t n, const T* (&kr)[16]) {
  for (int i = 0; i < 16; ++i) kr[i] = kv + slots[j0 + std::min<int64_t>(kBitrev4[i], n - 1)] * row;
}

// Head h's softmax over its len scores sh (overwritten by the probabilities, unnormalised) and the
// weighted sum of its V rows into out (D), with the output in registers.
template <typename T, int64_t DC>
inline void softmax_values(float* sh, int64_t len, const T* kv, const float* ks, const int64_t* slots, int64_t H, int64_t D_,
                           int64_t h, float* out) {
  const int64_t D = DC ? DC : D_;
  const int64_t row = 2 * H * D;
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < len; j += 16)
    mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), first_lanes(len - j), sh + j));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; j += 16) {
    const __m512 e = _mm512_maskz_mov_ps(first_lanes(len - j), exp16(_mm512_sub_ps(_mm512_loadu_ps(sh + j), m)));
    _mm512_storeu_ps(sh + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  const float inv = 1.f / _mm512_reduce_add_ps(sum);
  __m512 acc[8];
  const int64_t nd = D / 16;
  for (int64_t d = 0; d < nd; ++d) acc[d] = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; ++j) {
    if (j + 8 < len) prefetch_head(kv + slots[j + 8] * row + H * D + h * D, D);  // from L2 (or further) into L1
    const T* v = kv + slots[j] * row + H * D + h * D;
    float p = sh[j] * inv;
    if constexpr (std::is_same<T, int8_t>::value) p *= ks[slots[j] * 2 * H + H + h];
    const __m512 w = _mm512_set1_ps(p);
    for (int64_t d = 0; d < nd; ++d) acc[d] = _mm512_fmadd_ps(w, load16(v + 16 * d), acc[d]);
  }
  for (int64_t d = 0; d < nd; ++d) _mm512_storeu_ps(out + 16 * d, acc[d]);
}

// One (sequence, head): for batches too small to give each thread whole sequences. The next block's
// K and V of the head are prefetched: a slot's head sits 2HD elements from the next one's, a stride
// the hardware prefetchers do not follow (1.6x measured). scores: (len rounded up to 16).
template <typename T, int64_t DC>
void attend(const float* q, const T* kv, const float* ks, const int64_t* slots, int64_t len, int64_t H, int64_t D_,
            int64_t h, float scale, float* scores, float* out) {
  const int64_t D = DC ? DC : D_;
  const int64_t row = 2 * H * D;
  for (int64_t j0 = 0; j0 < len; j0 += 16) {
    for (int64_t j = j0 + 16; j < std::min<int64_t>(j0 + 32, len); ++j) {  // into L2: a burst this long overruns L1's fill buffers
      prefetch_head<_MM_HINT_T1>(kv + slots[j] * row + h * D, D);
      prefetch_head<_MM_HINT_T1>(kv + slots[j] * row + H * D + h * D, D);  // its V, for the second pass
      if constexpr (std::is_same<T, int8_t>::value) _mm_prefetch(reinterpret_cast<const char*>(ks + slots[j] * 2 * H + h), _MM_HINT_T1);
    }
    const int64_t n = std::min<int64_t>(16, len - j0);
    const T* kr[16];
    block_rows(kv, slots, row, j0, n, kr);
    score16<T, DC>(q, kr, ks, slots, j0, n, H, D, h, scale, scores + j0);
  }
  softmax_values<T, DC>(scores, len, kv, ks, slots, H, D, h, out);
}

// Every head of one sequence at once, for batches with a few sequences per thread: a slot's K and V
// of all heads are one contiguous row (1.5-3 KiB), each block of 16 slots' rows prefetched into L2
// while the block before it is scored, spread over its heads, so the second pass reads V from L2.
// Batch 32, a context of 96, 12 layers (Zen 4): bf16 cache 8.3-8.9 -> 4.9-5.1 ms, 8-bit 5.5 -> 3.9.
// scores: (H, len rounded up to 16) scratch; out: (H, D).
template <typename T, int64_t DC>
void attend_seq(const float* q, const T* kv, const float* ks, const int64_t* slots, int64_t len, int64_t H, int64_t D_,
                float scale, float* scores, float* out) {
  const int64_t D = DC ? DC : D_;
  const int64_t row = 2 * H * D, Lp = (len + 15) / 16 * 16;
  const int64_t lines = (row * static_cast<int64_t>(sizeof(T)) + 63) / 64;  // cache lines of a slot's row
  const int64_t per_head = (16 * lines + H - 1) / H;                        // the next block's lines per head
  for (int64_t j0 = 0; j0 < len; j0 += 16) {
    const int64_t n = std::min<int64_t>(16, len - j0), nn = std::min<int64_t>(16, len - j0 - 16);
    const T* kr[16];
    block_rows(kv, slots, row, j0, n, kr);
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t l = h * per_head; l < std::min<int64_t>((h + 1) * per_head, nn * lines); ++l)
        _mm_prefetch(reinterpret_cast<const char*>(kv + slots[j0 + 16 + l / lines] * row) + 64 * (l % lines), _MM_HINT_T1);
      if constexpr (std::is_same<T, int8_t>::value)  // an 8-bit cache's scales of the next block, spread over the heads
        for (int64_t i = h * 16 / H; i < std::min<int64_t>((h + 1) * 16 / H, nn); ++i)
          for (int64_t off = 0; off < 2 * H * 4; off += 64) _mm_prefetch(reinterpret_cast<const char*>(ks + slots[j0 + 16 + i] * 2 * H) + off, _MM_HINT_T1);
      score16<T, DC>(q + h * D, kr, ks, slots, j0, n, H, D, h, scale, scores + h * Lp + j0);
    }
  }
  for (int64_t h = 0; h < H; ++h) softmax_values<T, DC>(scores + h * Lp, len, kv, ks, slots, H, D, h, out + h * D);
}


// decode_attention without the checks: for arguments check_paged has passed (decode_layers checks
// a step's slots once, not once per layer).
at::Tensor decode_attention_unchecked(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& slots, const at::Tensor& lens,
                                      const c10::optional<at::Tensor>& kv_scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), L = slots.size(1);
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, H, D}, qf.options());
  const float* qp = qf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t threads = at::get_num_threads();
  // dc: the head size compiled in where it is 64 (with_head_size). With it the loops over D unroll
  // and q's 4 vectors stay in registers across a block's 16 keys: 12 layers of batch 32 at a context
  // of 100 on 2 threads (Xeon with AMX), bf16 cache 6.8-7.8 -> 6.4-7.6 ms, fp32 12.3-13.2 ->
  // 10.7-11.4, int8 10.9-11.5 -> 10.2. That machine streams K/V at ~20 GB/s; with them in L2 the
  // arithmetic alone went 5.7 -> 3.6 ms on one thread (without attend_seq's prefetches, which there
  // cost more than the arithmetic: 10-16 ms with them). With the K/V in memory the prefetches measured
  // alike over a bf16 cache and cost 1.3x over fp32 on that machine, and paid 1.6x on Zen 4: they stay.
  with_head_size(D, [&](auto dc) {
    constexpr int64_t DC = decltype(dc)::value;
    with_cache(kv, kv_scale, [&](const auto* kvp, const float* ks) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(kvp)>>;
      if (B >= 2 * threads) {  // a few whole sequences per thread
        // handed out one at a time: contexts differ in length (a served batch holds requests at every
        // stage), and equal halves of the batch would leave one thread waiting for the other
        std::atomic<int64_t> next{0};
        at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
          std::vector<float> scores(H * ((L + 15) / 16 * 16));
          for (int64_t b; (b = next.fetch_add(1)) < B;)
            attend_seq<T, DC>(qp + b * H * D, kvp, ks, sp + b * L, lp[b], H, D, scale, scores.data(), op + b * H * D);
        });
        return;
      }
      at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
        std::vector<float> scores((L + 15) / 16 * 16);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t b = i / H, h = i % H;
          attend<T, DC>(qp + (b * H + h) * D, kvp, ks, sp + b * L, lp[b], H, D, h, scale, scores.data(), op + (b * H + h) * D);
        }
      });
    });
  });
  return out.to(q.scalar_type());
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& slots, const at::Tensor& lens,
                            const c10::optional<at::Tensor>& kv_scale) {
  TORCH_CHECK(q.dim() == 3, "decode_attention: q (B, H, D) and kv (S, 2, H, D) expected");
  check_paged(q.size(0), q.size(1), q.size(2), kv, slots, lens, kv_scale);
  return decode_attention_unchecked(q, kv, slots, lens, kv_scale);
}

// ------------------------------------------------------------------------- prefill attention

// Causal attention of a prompt chunk: T queries at positions L-T .. L-1 against keys 0 .. L-1 (the
// chunk's own K/V when L == T, the whole gathered context for a continuation chunk), query i seeing
// keys up to L-T+i. Flash-attention style: per (head, block of 64 queries), key blocks of 64 with an
// online softmax, nothing of size T x L in memory, and blocks wholly above the diagonal skipped.
// Why by hand: torch's CPU flash attention ran a 512-token prompt's 12 layers in 52 ms fp32 and
// 68-73 ms bf16 on our machines (bf16 no faster), ~90 GFLOP/s; the blocked torch version
// (causal_attention in gpt2.py) 45-68 ms.
// Layout: the scores are kept transposed, S[key][query], so that every step is "broadcast one
// scalar, FMA against 16 queries": the scores broadcast K[j][d] against Qt[d][queries], the softmax
// runs down the keys with the queries in the vector lanes (no horizontal reductions), and the
// weighted sum broadcasts P[j][i] against V[j][d..d+15]. Arithmetic in fp32; bf16 K/V are widened
// one key block at a time.
constexpr int64_t kQB = 64, kKB = 64;  // queries per task (4 vectors), keys per block

// S[j][0..64) = sum_d K[j][d] * Qt[d][0..64) for keys j of [0, nk); K rows `ks` floats apart
inline void scores_block(const float* qt, const float* k, int64_t ks, int64_t nk, int64_t D, float* S) {
  for (int64_t j0 = 0; j0 < nk; j0 += 4) {
    const float* kr[4];
    for (int jj = 0; jj < 4; ++jj) kr[jj] = k + std::min(j0 + jj, nk - 1) * ks;  // past nk: a valid row, result unused
    __m512 acc[4][4];
    for (int jj = 0; jj < 4; ++jj)
      for (int v = 0; v < 4; ++v) acc[jj][v] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      __m512 qv[4];
      for (int v = 0; v < 4; ++v) qv[v] = _mm512_loadu_ps(qt + d * kQB + 16 * v);
      for (int jj = 0; jj < 4; ++jj) {
        const __m512 kb = _mm512_set1_ps(kr[jj][d]);
        for (int v = 0; v < 4; ++v) acc[jj][v] = _mm512_fmadd_ps(kb, qv[v], acc[jj][v]);
      }
    }
    for (int jj = 0; jj < 4 && j0 + jj < nk; ++jj)
      for (int v = 0; v < 4; ++v) _mm512_storeu_ps(S + (j0 + jj) * kQB + 16 * v, acc[jj][v]);
  }
}

// O[i][dc..dc+16NV) = O[i][..] * alpha[i] + sum_j P[j][i] * V[j][dc..] for query rows i of [0, nq)
template <int NV>
inline void weighted_sum_block(const float* P, const float* vb, int64_t vs, int64_t nk, int64_t nq, int64_t D, int64_t dc,
                               const float* alpha, float* O) {
  for (int64_t i0 = 0; i0 < nq; i0 += 4) {
    const int ni = static_cast<int>(std::min<int64_t>(4, nq - i0));
    __m512 acc[4][NV];
    for (int ii = 0; ii < 4; ++ii) {
      const __m512 a = _mm512_set1_ps(ii < ni ? alpha[i0 + ii] : 0.f);
      for (int v = 0; v < NV; ++v)
        acc[ii][v] = ii < ni ? _mm512_mul_ps(a, _mm512_loadu_ps(O + (i0 + ii) * D + dc + 16 * v)) : _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < nk; ++j) {
      __m512 vv[NV];
      for (int v = 0; v < NV; ++v) vv[v] = _mm512_loadu_ps(vb + j * vs + dc + 16 * v);
      const float* pj = P + j * kQB + i0;
      for (int ii = 0; ii < 4; ++ii) {
        const __m512 pb = _mm512_set1_ps(pj[ii]);  // rows past nq: P is 0 there, acc unused
        for (int v = 0; v < NV; ++v) acc[ii][v] = _mm512_fmadd_ps(pb, vv[v], acc[ii][v]);
      }
    }
    for (int ii = 0; ii < ni; ++ii)
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(O + (i0 + ii) * D + dc + 16 * v, acc[ii][v]);
  }
}

// one head, queries [q0, q0 + nq) of the chunk; buffers: qt (D x 64), S (64 x 64), O (64 x D), kf, vf (64 x D)
template <typename TQ, typename TK>
void prefill_task(const TQ* q, int64_t qs, const TK* k, const TK* v, int64_t ks, TQ* out, int64_t os, int64_t offset,
                  int64_t q0, int64_t nq, int64_t D, float scale, float* qt, float* S, float* O, float* kf, float* vf) {
  queries_transposed<kQB>(q, qs, q0, nq, D, scale, qt);
  std::fill(O, O + kQB * D, 0.f);
  __m512 m[4], l[4];
  for (int v = 0; v < 4; ++v) m[v] = _mm512_set1_ps(-INFINITY), l[v] = _mm512_setzero_ps();
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t ke = offset + q0 + nq;  // keys [0, ke) are seen by some query of the block
  alignas(64) float alpha[kQB];
  for (int64_t kb = 0; kb < ke; kb += kKB) {
    const int64_t nk = std::min(kKB, ke - kb);
    const float* kp;
    const float* vp;
    int64_t stride;
    if constexpr (std::is_same<TK, float>::value) {
      kp = k + kb * ks, vp = v + kb * ks, stride = ks;
    } else {  // widen the block's bf16 K and V once for every use below
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t d = 0; d < D; d += 16) {
          _mm512_storeu_ps(kf + j * D + d, load16(k + (kb + j) * ks + d));
          _mm512_storeu_ps(vf + j * D + d, load16(v + (kb + j) * ks + d));
        }
      kp = kf, vp = vf, stride = D;
    }
    scores_block(qt, kp, stride, nk, D, S);
    // causal: key kb + j is hidden from query i while kb + j > offset + q0 + i
    const bool diagonal = kb + nk - 1 > offset + q0;
    __m512 mx[4];
    for (int vi = 0; vi < 4; ++vi) mx[vi] = m[vi];
    for (int64_t j = 0; j < nk; ++j)
      for (int vi = 0; vi < 4; ++vi) {
        __m512 sv = _mm512_loadu_ps(S + j * kQB + 16 * vi);
        if (diagonal) {  // lanes i < kb + j - offset - q0 are hidden
          const __mmask16 hid = _mm512_cmplt_epi32_mask(_mm512_add_epi32(iota, _mm512_set1_epi32(16 * vi)),
                                                        _mm512_set1_epi32(static_cast<int>(kb + j - offset - q0)));
          sv = _mm512_mask_mov_ps(sv, hid, _mm512_set1_ps(-INFINITY));
          _mm512_storeu_ps(S + j * kQB + 16 * vi, sv);
        }
        mx[vi] = _mm512_max_ps(mx[vi], sv);
      }
    for (int vi = 0; vi < 4; ++vi) {
      // the first block holds key 0, seen by every query: mx is finite from then on
      _mm512_store_ps(alpha + 16 * vi, exp16(_mm512_sub_ps(m[vi], mx[vi])));
      l[vi] = _mm512_mul_ps(l[vi], _mm512_load_ps(alpha + 16 * vi));
      m[vi] = mx[vi];
    }
    for (int64_t j = 0; j < nk; ++j)
      for (int vi = 0; vi < 4; ++vi) {
        const __m512 sv = _mm512_loadu_ps(S + j * kQB + 16 * vi);
        // hidden keys (-inf) give exactly 0, not exp16's clamped e^-80
        const __m512 p = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(sv, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ),
                                             exp16(_mm512_sub_ps(sv, mx[vi])));
        _mm512_storeu_ps(S + j * kQB + 16 * vi, p);
        l[vi] = _mm512_add_ps(l[vi], p);
      }
    for (int64_t dc = 0; dc < D; dc += 64) {
      switch (std::min<int64_t>(4, (D - dc) / 16)) {
        case 4: weighted_sum_block<4>(S, vp, stride, nk, nq, D, dc, alpha, O); break;
        case 3: weighted_sum_block<3>(S, vp, stride, nk, nq, D, dc, alpha, O); break;
        case 2: weighted_sum_block<2>(S, vp, stride, nk, nq, D, dc, alpha, O); break;
        default: weighted_sum_block<1>(S, vp, stride, nk, nq, D, dc, alpha, O); break;
      }
    }
  }
  alignas(64) float lsum[kQB];
  for (int vi = 0; vi < 4; ++vi) _mm512_store_ps(lsum + 16 * vi, l[vi]);
  for (int64_t i = 0; i < nq; ++i) {
    const __m512 inv = _mm512_set1_ps(1.f / lsum[i]);
    for (int64_t d = 0; d < D; d += 16) store16(out + (q0 + i) * os + d, 0xFFFF, _mm512_mul_ps(_mm512_loadu_ps(O + i * D + d), inv));
  }
}

// prefill_attention on AVX-512 (checked arguments). Returns (T, H, D) in q's dtype.
at::Tensor prefill_attention_avx(const at::Tensor& q, const at::Tensor& kv) {
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), L = kv.size(0);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  return prefill_tasks<kQB>(q, kv, D * kQB + kQB * kKB + kQB * D + 2 * kKB * D,
                            [&](auto* qh, auto* kh, auto* vh, auto* oh, int64_t q0, int64_t nq, float* buf) {
    using TQ = std::remove_const_t<std::remove_pointer_t<decltype(qh)>>;
    using TK = std::remove_const_t<std::remove_pointer_t<decltype(kh)>>;
    float *qt = buf, *S = qt + D * kQB, *O = S + kQB * kKB, *kf = O + kQB * D, *vf = kf + kKB * D;
    prefill_task<TQ, TK>(qh, q.stride(0), kh, vh, kv.stride(0), oh, H * D, L - T, q0, nq, D, scale, qt, S, O, kf, vf);
  });
}

// ------------------------------------------------------------------------- decode layers

// ------------------------------------------------------------------------------------------ AMX
// Projections of 5+ rows on CPUs with AMX (Sapphire Rapids and later): the tiles' dot products
// (tdpbusd: u8 x s8 -> int32; tdpbf16ps: bf16 pairs -> fp32) over the same panels of 32 output
// columns the AVX-512 panel kernels read. Why our own: on the 2-core AMX machine oneDNN's AMX
// kernels, behind torch's int8 and bf16 linears, ran the 48 block matmuls of a 32-row step in
// 9.2-9.7 ms (int8) and 13.5 ms (bf16), where the weights alone stream in ~3.5 and ~7: with packed
// panels a tile kernel is bound by that stream at decode sizes. And int8 keeps the GEMV's
// arithmetic (quantize_row, exact int32 sums, the same epilogue): a row's result is the same to
// the bit on the GEMV, the VNNI panels or here, whatever else is in the batch.
//
// Tiles: 0-3 hold a 32 x 32 block of sums (rows m0..m0+31 x the panel's 32 columns, 16 x 16 each),
// 4-5 two 16-row slices of x, 6-7 the panel's two 16-column halves for one k step (int8: 64 inputs,
// bf16: 32). A panel row holds one k step's 4 (int8) or 2 (bf16) inputs of all 32 columns: 128
// bytes, so each half is a strided tile load of 16 x 64 bytes, and a k step's weights are 2 KiB
// in a row. Rows of x are padded with zeros to a multiple of 16 (a tile's height).

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) colsb[t] = 64, rows[t] = 16;
  }
};

// Whether this CPU has AMX (tile, int8, bf16) and Linux lets this process use it: the tile data is
// handed to a process only on request (arch_prctl ARCH_REQ_XCOMP_PERM), once per process.
bool amx_ready() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1) || !((d >> 24) & 1) || !((d >> 25) & 1)) return false;  // AMX-BF16, AMX-TILE, AMX-INT8
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return ok;
}

// tile C += tile A . tile B: u8 x s8 (int8) or bf16 pairs. A macro: GCC's tile intrinsics paste the
// tile numbers into their assembly as written, so they cannot be template parameters.
#define GPT2SERVE_TILE_DOT(INT8, C, A, B) \
  do {                                    \
    if (INT8) _tile_dpbusd(C, A, B);      \
    else _tile_dpbf16ps(C, A, B);         \
  } while (0)

// The sums of rows [m0, m0 + 16 * MB) of x (Mp, K) against one panel, into c (16 * MB, 32): int8
// x is u8 (q + 128) and the panel (K / 4, 32, 4) s8; bf16 x and the panel (K / 2, 32, 2) bf16.
// between(i, steps) runs after k step i of `steps`: the previous block's epilogue, a slice at a
// time, so that its vector instructions overlap the tiles' dot products instead of following them.
template <bool Int8, int MB, typename Between>
__attribute__((target("amx-tile,amx-int8,amx-bf16"))) inline void amx_block(const void* xv, int64_t K, const void* pv,
                                                                          int64_t m0, void* c, Between&& between) {
  constexpr int64_t kStep = Int8 ? 64 : 32;  // inputs per k step
  constexpr int64_t kEl = Int8 ? 1 : 2;      // bytes per input
  const char* x = static_cast<const char*>(xv) + m0 * K * kEl;
  const char* panel = static_cast<const char*>(pv);
  const int64_t xs = K * kEl;
  _tile_zero(0);
  _tile_zero(1);
  if (MB == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t k = 0; k < K; k += kStep) {
    const char* b = panel + k * kEl * 32;  // this k step's 16 panel rows of 128 bytes
    _mm_prefetch(b + 4096, _MM_HINT_T0);
    _tile_loadd(6, b, 128);
    _tile_loadd(7, b + 64, 128);
    _tile_loadd(4, x + k * kEl, xs);
    GPT2SERVE_TILE_DOT(Int8, 0, 4, 6);
    GPT2SERVE_TILE_DOT(Int8, 1, 4, 7);
    if (MB == 2) {
      _tile_loadd(5, x + 16 * xs + k * kEl, xs);
      GPT2SERVE_TILE_DOT(Int8, 2, 5, 6);
      GPT2SERVE_TILE_DOT(Int8, 3, 5, 7);
    }
    between(k / kStep, K / kStep);
  }
  char* cc = static_cast<char*>(c);
  _tile_stored(0, cc, 128);
  _tile_stored(1, cc + 64, 128);
  if (MB == 2) {
    _tile_stored(2, cc + 16 * 128, 128);
    _tile_stored(3, cc + 16 * 128 + 64, 128);
  }
}

// Every row block of x against panels [p0, p1), each block's sums finished by finish(m0, rows, n,
// nb, sums) per 16 columns (row r's at sums + 32 r) for its real rows: a finisher loads what
// belongs to the columns (scales, zero points) once for all its rows. A block's epilogue runs
// during the next block's dot products (amx_block's `between`), 4 rows x 16 columns at a time, from
// the other of two sums buffers: bias, GELU, residual and rounding cost as much as the tiles'
// work on c_fc (512 x 768 x 3072, one thread: 2.4 ms plain, 3.4 with bias and GELU after the
// tiles). Runs on one thread: loads the tile configuration first (oneDNN's AMX kernels load their
// own) and releases the tiles after.
template <bool Int8, typename Finish>
__attribute__((target("amx-tile,amx-int8,amx-bf16"))) void amx_panels(const void* x, int64_t M, int64_t K, const void* w,
                                                                    int64_t p0, int64_t p1, int64_t N, Finish&& finish) {
  static const TileConfig cfg;
  _tile_loadconfig(&cfg);
  alignas(64) int32_t c[2][32 * 32];  // int32 or fp32 sums, (32, 32), the current block's and the previous one's
  const int64_t panel_bytes = K * 32 * (Int8 ? 1 : 2);
  struct Block {
    int64_t p = -1, m0 = 0, mb = 0;
  } prev;
  constexpr int kUnits = 16;  // a block's epilogue: 8 groups of 4 rows x 2 halves of 16 columns
  // units [u0, u1) of block b's epilogue from sums s
  auto finish_units = [&](const Block& b, const int32_t* s, int u0, int u1) {
    for (int u = u0; u < u1; ++u) {
      const int64_t r0 = (u >> 1) * 4, n = b.p * 32 + 16 * (u & 1);
      if (r0 >= b.mb || n >= N) continue;  // rows past M; the last panel's zero padding
      finish(b.m0 + r0, std::min<int64_t>(4, b.mb - r0), n, std::min<int64_t>(16, N - n), s + 32 * r0 + 16 * (u & 1));
    }
  };
  // Rows in chunks of <= 1 MiB of x, each against every panel: x is re-read for every panel, and
  // a prompt's 512 x 3072 bf16 (3 MiB) does not stay in a core's 2 MiB L2 (c_proj of the MLP ran
  // at ~2/3 of c_fc's rate); the panels, re-read once per chunk, are the smaller stream.
  const int64_t chunk = std::max<int64_t>(32, (int64_t{1} << 20) / (K * (Int8 ? 1 : 2)) / 32 * 32);
  // Deferred only for prompts: at decode sizes (<= 32 rows, one block per panel) the weights stream
  // from memory and the slices cost more than they hide (48 block matmuls at 32 rows 4-6% slower).
  const bool defer = M > 32;
  int cur = 0;
  for (int64_t c0 = 0; c0 < M; c0 += chunk)
  for (int64_t p = p0; p < p1; ++p) {
    const char* panel = static_cast<const char*>(w) + p * panel_bytes;
    for (int64_t m0 = c0; m0 < std::min(M, c0 + chunk); m0 += 32) {
      const int64_t mb = std::min<int64_t>(32, M - m0);
      const int32_t* ps = c[cur ^ 1];
      auto between = [&](int64_t i, int64_t steps) {
        if (defer && prev.p >= 0) finish_units(prev, ps, static_cast<int>(i * kUnits / steps), static_cast<int>((i + 1) * kUnits / steps));
      };
      if (mb > 16) amx_block<Int8, 2>(x, K, panel, m0, c[cur], between);
      else amx_block<Int8, 1>(x, K, panel, m0, c[cur], between);
      if (!defer) finish_units({p, m0, mb}, c[cur], 0, kUnits);
      prev = {p, m0, mb};
      cur ^= 1;
    }
  }
  if (defer && prev.p >= 0) finish_units(prev, c[cur ^ 1], 0, kUnits);
  _tile_release();
}

// int8 on the tiles: x (M, K) fp32; w the int8 panels of matmul_int8_panels (pack_int8_panels),
// wsum / wscale (N,); K a multiple of 64. Returns y (M, N) fp32, each row as gemv_int8 computes it.
at::Tensor matmul_int8_amx(const at::Tensor& x, const at::Tensor& w, const at::Tensor& wsum, const at::Tensor& wscale,
                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual, int64_t act) {
  TORCH_CHECK(amx_ready(), "matmul_int8_amx: this CPU or kernel offers no AMX");
  const int64_t N = check_int8_panels("matmul_int8_amx", x, w, wsum, wscale, bias, residual, act, 64);
  const int64_t M = x.size(0), K = x.size(1);
  const Int8Args a(x, wsum, wscale, bias, residual, 16);
  at::Tensor y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, w.size(0), 1, [&](int64_t p0, int64_t p1) {
    amx_panels<true>(a.xq.data(), M, K, w.data_ptr<int8_t>(), p0, p1, N,
                     [&](int64_t m0, int64_t rows, int64_t n, int64_t nb, const int32_t* s) {
      const __m512i zp = zero_points16(a.wsum, n, nb);
      const __m512 ws = column_scales16(a.wscale, n, nb);
      for (int64_t r = 0; r < rows; ++r)
        finish_int8_16(yp, N, m0 + r, n, nb, _mm512_sub_epi32(_mm512_load_si512(s + 32 * r), zp), a.xs[m0 + r], ws, a.bias, a.res,
                       act);
    });
  });
  return y;
}

// bf16 on the tiles: x (M, K) bf16; w (ceil(N / 32), K / 2, 32, 2) bf16 panels (pack_amx_bf16 in
// gpt2.py: each k pair of the 32 columns side by side, the tiles' operand layout); K a multiple of
// 32. Returns y (M, N) bf16 = act(x @ W + bias) + residual, summed in fp32.
at::Tensor matmul_bf16_amx(const at::Tensor& x, const at::Tensor& w, int64_t N, const c10::optional<at::Tensor>& bias,
                           const c10::optional<at::Tensor>& residual, int64_t act) {
  TORCH_CHECK(amx_ready(), "matmul_bf16_amx: this CPU or kernel offers no AMX");
  check_bf16_pairs("matmul_bf16_amx", x, w, N);
  TORCH_CHECK(x.size(1) % 32 == 0, "matmul_bf16_amx: K must be a multiple of 32");
  const int64_t M = x.size(0), K = x.size(1);
  check_epilogue("matmul_bf16_amx", M, N, bias, residual, at::kBFloat16, act);
  const int64_t Mp = (M + 15) / 16 * 16;
  at::Tensor xp = x;  // rows padded with zeros to a tile's height
  if (Mp != M) xp = at::cat({x, at::zeros({Mp - M, K}, x.options())});
  at::Tensor y = at::empty({M, N}, x.options());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const at::BFloat16* rp = residual ? residual->data_ptr<at::BFloat16>() : nullptr;
  at::parallel_for(0, w.size(0), 1, [&](int64_t p0, int64_t p1) {
    amx_panels<false>(xp.data_ptr<at::BFloat16>(), M, K, w.data_ptr<at::BFloat16>(), p0, p1, N,
                      [&](int64_t m0, int64_t rows, int64_t n, int64_t nb, const int32_t* s) {
                        for (int64_t r = 0; r < rows; ++r)
                          finish16<at::BFloat16>(yp, N, m0 + r, n, nb, _mm512_load_ps(reinterpret_cast<const float*>(s + 32 * r)), bp, rp, act);
                      });
  });
  return y;
}

// ------------------------------------------------------------------- prompt attention on the tiles
// prefill_attention over a bf16 cache (the bf16 and int8 modes') on AMX, or the same sums on
// vdpbf16ps without it (dot_sums: AMD Zen 4, 12 layers of a 512-token prompt 34-36 ms in the fp32
// kernel -> 18-21): per head, per block of 16
// queries, S = Q K^T on tdpbf16ps (fp32 sums), an exact softmax of each query's row in fp32 over all
// its keys at once (a row of at most n_ctx scores sits in L1/L2, so no online rescaling), the
// probabilities rounded to bf16, and O = P V on the tiles, divided by the sum of the rounded
// probabilities (the weights actually applied). Keys past a block's last query are skipped, as in
// the AVX-512 kernel, and a key is seen only by the queries at or after it (a later key moves no
// earlier query's output). Queries are rounded to bf16 (int8 mode's are fp32).
// Why: 12 layers of a 512-token prompt took 29-30 ms in the AVX-512 kernel and 12.5-14 ms here
// (AMX Xeon, 2 threads; ~40% of it the softmax's exponentials, which no tile computes); engine
// prefill 512, old and new code in turn: bf16 3960-4150 -> 4815-5035 tok/s, int8 3910-4175 -> 4850-5500.
// The tiles' B operand holds pairs along the summed dimension side by side, so each head's K and V
// are laid out once first (the per-head buffers of AmxAttention):
//   kt (D/2, Lk): kt[r][j] = K[j][2r .. 2r+1] as one 32-bit word (K's word pairs transposed);
//   vv (Lv/2, D): vv[p][d] = V[2p][d], V[2p+1][d] side by side.
// Tiles: 0-3 sums (S: 64 keys of 16 queries; O: 64 dims), 4 the A operand (Q or P, 16 x 32), 6-7 B.


// Tiles 0 .. n-1 (n <= 4) = the bf16 dot products of A, 16 rows of 64 bytes (as apart) at a + i a_step
// in k step i, with B_t, 16 rows of 64 bytes (bs apart) at b + i b_step + 64 t, over `steps` k steps;
// stored as fp32 rows (cs bytes apart) at c + 16 t. A in tile 4, the B operands in 6 and 7 by turns.
__attribute__((target("amx-tile,amx-int8,amx-bf16"))) inline void tile_sums(const char* a, int64_t as, int64_t a_step,
                                                                          const char* b, int64_t bs, int64_t b_step,
                                                                          int64_t steps, int64_t n, float* c, int64_t cs) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t i = 0; i < steps; ++i, a += a_step, b += b_step) {
    _tile_loadd(4, a, as);
    _tile_loadd(6, b, bs);
    _tile_dpbf16ps(0, 4, 6);
    if (n > 1) {
      _tile_loadd(7, b + 64, bs);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (n > 2) {
      _tile_loadd(6, b + 128, bs);
      _tile_dpbf16ps(2, 4, 6);
    }
    if (n > 3) {
      _tile_loadd(7, b + 192, bs);
      _tile_dpbf16ps(3, 4, 7);
    }
  }
  _tile_stored(0, c, cs);
  if (n > 1) _tile_stored(1, c + 16, cs);
  if (n > 2) _tile_stored(2, c + 32, cs);
  if (n > 3) _tile_stored(3, c + 48, cs);
}

// tile_sums on AVX-512 BF16, for CPUs without AMX (AMD Zen 4): the same sums of the same operands,
// C[i][16t + c] += A[i][2r] B[r][2c] + A[i][2r + 1] B[r][2c + 1], by vdpbf16ps with A's pair
// broadcast against B's row of 16 pairs. N tiles (1-4) as a template argument, 4 rows of C at a
// time: 16 accumulators, per pair of k 4 loads and 4 broadcasts for 16 vdpbf16ps, B's 16 x 64 bytes
// per k step staying in L1 across the 4 row groups. Zen 4 runs vdpbf16ps at twice its fp32 FMA rate.
template <int N>
inline void dot_sums(const char* a, int64_t as, int64_t a_step, const char* b, int64_t bs, int64_t b_step, int64_t steps,
                     float* c, int64_t cs) {
  for (int64_t i0 = 0; i0 < 16; i0 += 4) {
    __m512 acc[4][N];
    for (int ii = 0; ii < 4; ++ii)
      for (int t = 0; t < N; ++t) acc[ii][t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < steps; ++i) {
      const char* ai = a + i0 * as + i * a_step;
      const char* bi = b + i * b_step;
      for (int64_t r = 0; r < 16; ++r) {
        __m512bh bv[N];
        for (int t = 0; t < N; ++t) bv[t] = (__m512bh)_mm512_loadu_si512(bi + r * bs + 64 * t);
        for (int ii = 0; ii < 4; ++ii) {
          int32_t pair;
          std::memcpy(&pair, ai + ii * as + 4 * r, 4);
          const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
          for (int t = 0; t < N; ++t) acc[ii][t] = _mm512_dpbf16_ps(acc[ii][t], av, bv[t]);
        }
      }
    }
    for (int ii = 0; ii < 4; ++ii)
      for (int t = 0; t < N; ++t) _mm512_storeu_ps(c + (i0 + ii) * (cs / 4) + 16 * t, acc[ii][t]);
  }
}

// tile_sums (Tiles: on AMX, the tile configuration loaded) or dot_sums, for n <= 4 tiles.
template <bool Tiles>
inline void block_sums(const char* a, int64_t as, int64_t a_step, const char* b, int64_t bs, int64_t b_step, int64_t steps,
                       int64_t n, float* c, int64_t cs) {
  if constexpr (Tiles) {
    tile_sums(a, as, a_step, b, bs, b_step, steps, n, c, cs);
  } else {
    switch (n) {
      case 4: dot_sums<4>(a, as, a_step, b, bs, b_step, steps, c, cs); break;
      case 3: dot_sums<3>(a, as, a_step, b, bs, b_step, steps, c, cs); break;
      case 2: dot_sums<2>(a, as, a_step, b, bs, b_step, steps, c, cs); break;
      default: dot_sums<1>(a, as, a_step, b, bs, b_step, steps, c, cs); break;
    }
  }
}

struct AmxAttention {
  // keys, head dim; row lengths of kt and S (keys to a multiple of 64, S's blocks) and of P (to 32,
  // P V's k steps), each one cache line longer: rows a power of two apart share the same few L1 sets
  int64_t L, D, Lk, Lv;
  std::vector<uint32_t> kt, vv;
  std::vector<at::BFloat16> qb, P;  // (16, D) queries, (16, Lv) probabilities
  std::vector<float> S, O;          // (16, Lk) scores, (16, D) sums
  AmxAttention(int64_t L_, int64_t D_)
      : L(L_), D(D_), Lk((L_ + 63) / 64 * 64 + 16), Lv((L_ + 31) / 32 * 32 + 32), kt(D_ / 2 * Lk, 0), vv(Lv / 2 * D_, 0),
        qb(16 * D_), P(16 * Lv), S(16 * Lk), O(16 * D_) {}

  // one head's K and V (rows ks elements apart) into kt and vv; the padding stays zero
  void load_head(const at::BFloat16* k, const at::BFloat16* v, int64_t ks) {
    // kt's row r for 16 keys at a time is one gather of their r-th words (16x faster than a
    // scalar transpose, whose stores fall Lk words apart)
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(ks / 2)));
    for (int64_t j = 0; j < L; j += 16) {
      const __mmask16 m = first_lanes(L - j);
      const uint32_t* kr = reinterpret_cast<const uint32_t*>(k + j * ks);
      for (int64_t r = 0; r < D / 2; ++r)
        _mm512_storeu_si512(kt.data() + r * Lk + j, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, rows, kr + r, 4));
    }
    for (int64_t j = 0; j < L; j += 2) {
      const at::BFloat16* v0 = v + j * ks;
      for (int64_t d = 0; d < D; d += 16) {
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + d)));
        const __m512i hi = j + 1 < L ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                                             reinterpret_cast<const __m256i*>(v0 + ks + d))), 16)
                                     : _mm512_setzero_si512();
        _mm512_storeu_si512(vv.data() + j / 2 * D + d, _mm512_or_si512(lo, hi));
      }
    }
  }

  // queries [q0, q0 + nq) of the head (rows qs elements apart), at positions offset + q0 + i, into
  // out (rows os apart); the tile configuration is loaded
  // (Tiles: on AMX, the tile configuration loaded; else on vdpbf16ps)
  template <typename TQ, bool Tiles>
  void block(const TQ* q, int64_t qs, TQ* out, int64_t os, int64_t offset, int64_t q0, int64_t nq, float scale) {
    for (int64_t i = 0; i < 16; ++i)
      for (int64_t d = 0; d < D; d += 16)
        store16(qb.data() + i * D + d, 0xFFFF, i < nq ? load16(q + (q0 + i) * qs + d) : _mm512_setzero_ps());
    const int64_t ke = offset + q0 + nq;  // keys [0, ke) are seen by some query of the block
    // S = Q K^T, 64 keys (four 16-key tiles) at a time, 32 dims per k step
    for (int64_t j0 = 0; j0 < ke; j0 += 64)
      block_sums<Tiles>(reinterpret_cast<const char*>(qb.data()), D * 2, 64, reinterpret_cast<const char*>(kt.data() + j0), Lk * 4,
                16 * Lk * 4, D / 32, std::min<int64_t>(4, (ke - j0 + 15) / 16), S.data() + j0, Lk * 4);
    // each row's softmax over its c = offset + q0 + i + 1 keys; P is zero past them, to a multiple of 32
    const int64_t kp = (ke + 31) / 32 * 32;
    alignas(64) float inv[16];
    for (int64_t i = 0; i < 16; ++i) {
      at::BFloat16* p = P.data() + i * Lv;
      if (i >= nq) {
        std::fill(p, p + kp, at::BFloat16(0.f));
        continue;
      }
      const float* s = S.data() + i * Lk;
      const int64_t c = offset + q0 + i + 1;
      __m512 mx = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < c; j += 16) {
        mx = _mm512_mask_max_ps(mx, first_lanes(c - j), mx, _mm512_loadu_ps(s + j));
      }
      // e^(scale (s - max)) = 2^(s c - max c), c = scale log2(e)
      const float c2 = scale * 1.44269504088896341f;
      const __m512 base = _mm512_set1_ps(_mm512_reduce_max_ps(mx) * c2), sc = _mm512_set1_ps(c2);
      __m512 sum = _mm512_setzero_ps();
      int64_t j = 0;
      for (; j < c; j += 16) {
        const __m256bh pb = _mm512_cvtneps_pbh(exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), sc, base), first_lanes(c - j)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)pb);
        sum = _mm512_add_ps(sum, load16(p + j));
      }
      for (; j < kp; j += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), _mm256_setzero_si256());
      inv[i] = 1.f / _mm512_reduce_add_ps(sum);
    }
    // O = P V, 64 dims (four 16-dim tiles) at a time, 32 keys per k step
    for (int64_t dc = 0; dc < D; dc += 64)
      block_sums<Tiles>(reinterpret_cast<const char*>(P.data()), Lv * 2, 64, reinterpret_cast<const char*>(vv.data() + dc), D * 4,
                16 * D * 4, kp / 32, std::min<int64_t>(4, (D - dc) / 16), O.data() + dc, D * 4);
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t d = 0; d < D; d += 16)
        store16(out + (q0 + i) * os + d, 0xFFFF, _mm512_mul_ps(_mm512_loadu_ps(O.data() + i * D + d), _mm512_set1_ps(inv[i])));
  }
};

// One thread's share of prefill_bf16: heads taken from `next` until none is left, each head's K and V
// laid out once for all its query blocks.
template <typename TQ, bool Tiles>
void bf16_heads(const at::Tensor& q, const at::Tensor& kv, at::Tensor& out, std::atomic<int64_t>& next) {
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), L = kv.size(0);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const TQ* qp = q.data_ptr<TQ>();
  TQ* op = out.data_ptr<TQ>();
  const at::BFloat16* kvp = kv.data_ptr<at::BFloat16>();
  AmxAttention a(L, D);
  for (int64_t h; (h = next.fetch_add(1)) < H;) {
    a.load_head(kvp + h * D, kvp + kv.stride(1) + h * D, kv.stride(0));
    for (int64_t q0 = 0; q0 < T; q0 += 16)
      a.block<TQ, Tiles>(qp + h * D, q.stride(0), op + h * D, H * D, L - T, q0, std::min<int64_t>(16, T - q0), scale);
  }
}

// bf16_heads on the tiles: loads the tile configuration first and releases the tiles.
template <typename TQ>
__attribute__((target("amx-tile,amx-int8,amx-bf16"))) void amx_heads(const at::Tensor& q, const at::Tensor& kv, at::Tensor& out,
                                                                    std::atomic<int64_t>& next) {
  static const TileConfig cfg;
  _tile_loadconfig(&cfg);
  bf16_heads<TQ, true>(q, kv, out, next);
  _tile_release();
}

// prefill_attention in bf16 products (checked arguments, bf16 kv, D a multiple of 32): on the tiles
// where the CPU has them, else on vdpbf16ps; heads handed out one at a time.
at::Tensor prefill_bf16(const at::Tensor& q, const at::Tensor& kv) {
  at::Tensor out = at::empty(q.sizes(), q.options());
  std::atomic<int64_t> next{0};
  const bool tiles = amx_ready(), qf = q.scalar_type() == at::kFloat;
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), q.size(1)), 1, [&](int64_t, int64_t) {
    if (tiles && qf) amx_heads<float>(q, kv, out, next);
    else if (tiles) amx_heads<at::BFloat16>(q, kv, out, next);
    else if (qf) bf16_heads<float, false>(q, kv, out, next);
    else bf16_heads<at::BFloat16, false>(q, kv, out, next);
  });
  return out;
}

// The causal attention of a prompt chunk: with `bf16` over a bf16 cache (head_dim a multiple of 32),
// queries and probabilities rounded to bf16 and the products on the AMX tiles or vdpbf16ps
// (prefill_bf16); else all in fp32 on AVX-512 (prefill_attention_avx).
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& kv, bool bf16) {
  check_prefill(q, kv);
  if (!(bf16 && kv.scalar_type() == at::kBFloat16 && q.size(2) % 32 == 0)) return prefill_attention_avx(q, kv);
  return prefill_bf16(q, kv);
}

// ------------------------------------------------------------------------------ K/V writes
// cache[slots[n]] = kv[n] for each of N rows: cache (S, 2, H, D) fp32 or bf16, contiguous; kv
// (N, 2, H, D) fp32 or bf16 with each row's 2HD values contiguous (a view of the fused qkv
// projection's output), rounded to the cache's dtype as Tensor.to does. Why: index_copy_ wrote a
// 512-token prompt's rows at ~4.4 GB/s (0.27-0.35 ms a layer, after a separate .to for int8 mode's
// fp32 rows: 0.29 ms more).
//
// An 8-bit cache (int8, with scale (S, 2, H) fp32) takes each head's D values of K and of V as
// symmetric int8, scale = max|x| / 127, q = round(x / scale) (to nearest even): half a bf16 cache's
// bytes for decode attention to read (quantize_head).
template <typename T>
inline void quantize_head(const T* x, int64_t D, int8_t* q, float* scale) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x + d)));
  const float mx = _mm512_reduce_max_ps(amax);
  *scale = mx / 127.f;
  const __m512 inv = _mm512_set1_ps(mx > 0.f ? 127.f / mx : 0.f);
  for (int64_t d = 0; d < D; d += 16) {
    const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x + d), inv));  // MXCSR: nearest even; |v| <= 127
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + d), _mm512_cvtepi32_epi8(v));
  }
}

// 16 floats to bf16 rounded as c10 (and Tensor.to) rounds: to nearest even, NaN to 0x7fc0, and
// subnormals kept, where vcvtneps2bf16 flushes subnormal inputs to zero (a K/V value of 1e-40 came
// out 0 instead of Tensor.to's bf16 subnormal, found by test_kv_write_is_index_copy on Zen 4).
inline __m256i to_bf16_exact(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

void kv_write(at::Tensor& cache, const at::Tensor& slots, const at::Tensor& kv, const c10::optional<at::Tensor>& scale) {
  check_kv_write(cache, slots, kv, scale);
  const int64_t N = kv.size(0), H = cache.size(2), D = cache.size(3), row = 2 * H * D;
  const int64_t* sp = slots.data_ptr<int64_t>();
  if (scale) {
    int8_t* cp = cache.data_ptr<int8_t>();
    float* scp = scale->data_ptr<float>();
    auto quantize = [&](const auto* src) {
      at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t i = 0; i < 2 * H; ++i)  // K's heads, then V's
            quantize_head(src + n * kv.stride(0) + i * D, D, cp + sp[n] * row + i * D, scp + sp[n] * 2 * H + i);
      });
    };
    if (kv.scalar_type() == at::kFloat) quantize(kv.data_ptr<float>());
    else quantize(kv.data_ptr<at::BFloat16>());
    return;
  }
  // whole cache lines by streaming stores where the rows allow: a new token's slot is rarely in
  // cache, and an ordinary store reads each line first (a 512-token prompt's 512 rows of bf16 K/V:
  // 0.20 -> 0.16 ms a layer)
  const bool stream = (row * cache.element_size()) % 64 == 0 && reinterpret_cast<uintptr_t>(cache.data_ptr()) % 64 == 0;
  auto copy = [&](auto* dst, const auto* src) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        auto* d = dst + sp[n] * row;
        const auto* r = src + n * kv.stride(0);
        if constexpr (std::is_same<std::remove_pointer_t<decltype(d)>, at::BFloat16>::value &&
                      std::is_same<std::remove_const_t<std::remove_pointer_t<decltype(r)>>, float>::value) {
          for (int64_t i = 0; i < row; i += 32) {  // fp32 rows into a bf16 cache: c10's rounding
            const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16_exact(load16(r + i))), to_bf16_exact(load16(r + i + 16)), 1);
            if (stream) _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i), v);
            else _mm512_storeu_si512(reinterpret_cast<__m512i*>(d + i), v);
          }
        } else if (!stream) {
          for (int64_t i = 0; i < row; i += 16) store16(d + i, 0xFFFF, load16(r + i));
        } else if constexpr (std::is_same<std::remove_pointer_t<decltype(d)>, float>::value) {
          for (int64_t i = 0; i < row; i += 16) _mm512_stream_ps(d + i, load16(r + i));
        } else {  // bf16 rows into a bf16 cache: the bits as they are (widening and rounding back flushed subnormals)
          for (int64_t i = 0; i < row; i += 32)
            _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i), _mm512_loadu_si512(r + i));
        }
      }
      _mm_sfence();  // the streamed lines are visible before the readers run
    });
  };
  const bool cf = cache.scalar_type() == at::kFloat, kf = kv.scalar_type() == at::kFloat;
  if (cf && kf) copy(cache.data_ptr<float>(), kv.data_ptr<float>());
  else if (cf) copy(cache.data_ptr<float>(), kv.data_ptr<at::BFloat16>());
  else if (kf) copy(cache.data_ptr<at::BFloat16>(), kv.data_ptr<float>());
  else copy(cache.data_ptr<at::BFloat16>(), kv.data_ptr<at::BFloat16>());
}

// Every transformer block of a decode step in one call: at batch 1 the blocks' ~15 torch ops each
// cost more in Python and dispatch (~1.5 ms a step for 12 layers, measured with the matmuls shrunk
// to nothing) than int8's weights take to stream. The ops are the ones the Python blocks run
// (gpt2.py: Block, CausalSelfAttention, MLP and the projection modules), in the same order on the
// same inputs, so the result is the same to the bit. Up to 4 sequences run on the GEMV; more (up
// to kMaxRows, or any number with `many`) on the projections' many-row kernel: many = 1, the
// panels (matmul_int8_panels / matmul_int8 from kInt8MatmulRows rows for int8, matmul_panels for bf16
// and fp32), 2, the AMX tiles (matmul_int8_amx, matmul_bf16_amx), 3, bf16 dot products
// (matmul_bf16_dot), 4 (int8), the panels at every row count (where they beat torch._int_mm's).
// params: per layer, 24 tensors: ln_1 weight, bias, ln_2 weight, bias, then 5 per projection
// (c_attn, attn.c_proj, c_fc, mlp.c_proj):
//   mode 0 (int8): q (out, in) int8, row sums int32, scales fp32, bias fp32 (or empty), panels
//   mode 1 (bf16): w (out, in) bf16, bias fp32 (or empty), -, -, panels
//   mode 2 (fp32): w (out, in) fp32, bias fp32 (or empty), -, -, panels
// (panels empty without `many`)
// kv: (n_layer, S, 2, H, D); slot_mapping (B,), slots (B, L), lens (B,) as for decode_attention;
// kv_scale: (n_layer, S, 2, H) for an int8 cache, else none.
// act: 1 = GELU tanh (gelu_new), 2 = exact GELU. Returns the hidden state before ln_f.
at::Tensor decode_layers(const at::Tensor& x_in, const std::vector<at::Tensor>& params, const at::Tensor& kv,
                         const at::Tensor& slot_mapping, const at::Tensor& slots, const at::Tensor& lens,
                         int64_t mode, double eps, int64_t n_head, int64_t act, int64_t many,
                         const c10::optional<at::Tensor>& kv_scale) {
  constexpr int64_t kPer = 24;
  const int64_t n_layer = kv.size(0), B = x_in.size(0), C = x_in.size(1), H = n_head, D = C / n_head;
  TORCH_CHECK(mode >= 0 && mode <= 2, "decode_layers: mode is 0 (int8), 1 (bf16) or 2 (fp32)");
  TORCH_CHECK(many >= 0 && many <= 4 && !(many == 2 && mode == 2) && !(many == 3 && mode != 1) && !(many == 4 && mode != 0),
              "decode_layers: many is 0 (none), 1 (panels), 2 (AMX; int8, bf16), 3 (bf16 dot products; bf16) or 4 "
              "(int8 panels at every row count)");
  check_decode_layers(params, kPer, kv, B, H, D, act, B <= kMaxRows || many);
  auto opt = [](const at::Tensor& t) { return t.numel() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
  // one projection: y = act(x W + b) (+ residual), as the module of that mode computes it: the GEMV
  // up to kGemvRows rows, above them the many-row kernel whose weights are p[4]
  auto proj = [&](const at::Tensor* p, const at::Tensor& x, int64_t a, const at::Tensor* residual) -> at::Tensor {
    const c10::optional<at::Tensor> res = residual ? c10::optional<at::Tensor>(residual->contiguous()) : c10::nullopt;
    const bool gemv = B <= kGemvRows || !many;
    if (mode == 0) {
      const at::Tensor xf = x.to(at::kFloat).contiguous();
      if (gemv) return gemv_int8(xf, p[0], p[1], p[2], opt(p[3]), res, a);
      if (many == 2) return matmul_int8_amx(xf, p[4], p[1], p[2], opt(p[3]), res, a);
      if (many == 1 && B >= kInt8MatmulRows) return matmul_int8(xf, p[0], p[2], opt(p[3]), res, a);
      return matmul_int8_panels(xf, p[4], p[1], p[2], opt(p[3]), res, a);
    }
    if (!gemv && many == 2) return matmul_bf16_amx(x.contiguous(), p[4], p[0].size(0), opt(p[1]), res, a);
    if (!gemv && many == 3) return matmul_bf16_dot(x.contiguous(), p[4], p[0].size(0), opt(p[1]), res, a);
    if (!gemv) return matmul_panels(x.contiguous(), p[4], p[0].size(0), opt(p[1]), res, a);
    if (mode == 1) return gemv_float<at::BFloat16>(x.contiguous(), p[0], opt(p[1]), res, a);
    return gemv_float<float>(x.contiguous(), p[0], opt(p[1]), res, a);
  };
  // the step's slots and lengths are the same for every layer: checked once
  TORCH_CHECK(!kv_scale || (kv_scale->dim() == 4 && kv_scale->size(0) == n_layer), "decode_layers: kv_scale (n_layer, S, 2, H)");
  auto layer_scale = [&](int64_t i) { return kv_scale ? c10::optional<at::Tensor>(kv_scale->select(0, i)) : c10::nullopt; };
  check_paged(B, H, D, kv.select(0, 0), slots, lens, layer_scale(0));
  at::Tensor x = x_in;
  for (int64_t i = 0; i < n_layer; ++i) {
    const at::Tensor* p = params.data() + i * kPer;
    at::Tensor kv_l = kv.select(0, i);  // (S, 2, H, D), contiguous
    at::Tensor h = at::layer_norm(x, {C}, p[0], p[1], eps);
    at::Tensor qkv = proj(p + 4, h, 0, nullptr);  // (B, 3C) = [q | k | v]
    at::Tensor q = qkv.narrow(1, 0, C).view({B, H, D});
    const c10::optional<at::Tensor> scale_l = layer_scale(i);  // (S, 2, H) of an int8 cache
    kv_write(kv_l, slot_mapping, qkv.narrow(1, C, 2 * C).view({B, 2, H, D}), scale_l);
    at::Tensor o = decode_attention_unchecked(q, kv_l, slots, lens, scale_l);  // (B, H, D)
    x = proj(p + 9, o.reshape({B, C}), 0, &x);
    h = at::layer_norm(x, {C}, p[2], p[3], eps);
    x = proj(p + 19, proj(p + 14, h, act, nullptr), 0, &x);
  }
  return x;
}

}  // namespace

TORCH_LIBRARY(gpt2serve, m) {
  m.def("gemv_int8(Tensor x, Tensor w, Tensor wsum, Tensor wscale, Tensor? bias, Tensor? residual, int act) -> Tensor");
  m.def("matmul_int8(Tensor x, Tensor w, Tensor wscale, Tensor? bias, Tensor? residual, int act) -> Tensor");
  m.def("matmul_int8_panels(Tensor x, Tensor w, Tensor wsum, Tensor wscale, Tensor? bias, Tensor? residual, int act) -> Tensor");
  m.def("matmul_int8_amx(Tensor x, Tensor w, Tensor wsum, Tensor wscale, Tensor? bias, Tensor? residual, int act) -> Tensor");
  m.def("matmul_bf16_amx(Tensor x, Tensor w, int n, Tensor? bias, Tensor? residual, int act) -> Tensor");
  m.def("amx_available() -> bool", &amx_ready);  // no tensor argument: a catch-all kernel
  m.def("gemv_bf16(Tensor x, Tensor w, Tensor? bias, Tensor? residual, int act) -> Tensor");
  m.def("matmul_panels(Tensor x, Tensor w, int n, Tensor? bias, Tensor? residual, int act) -> Tensor");
  m.def("matmul_bf16_dot(Tensor x, Tensor w, int n, Tensor? bias, Tensor? residual, int act) -> Tensor");
  m.def("gemv_f32(Tensor x, Tensor w, Tensor? bias, Tensor? residual, int act) -> Tensor");
  m.def("gelu_tanh_(Tensor(a!) x) -> ()");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor kv, Tensor slots, Tensor lens, Tensor? kv_scale=None) -> Tensor");
  m.def("prefill_attention(Tensor q, Tensor kv, bool bf16=True) -> Tensor");
  m.def("kv_write(Tensor(a!) cache, Tensor slots, Tensor kv, Tensor(b!)? scale=None) -> ()");
  m.def("decode_layers(Tensor x, Tensor[] params, Tensor(a!) kv, Tensor slot_mapping, Tensor slots, Tensor lens, "
        "int mode, float eps, int n_head, int act, int many, Tensor(b!)? kv_scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt2serve, CPU, m) {
  m.impl("gemv_int8", gemv_int8);
  m.impl("matmul_int8", matmul_int8);
  m.impl("matmul_int8_panels", matmul_int8_panels);
  m.impl("matmul_int8_amx", matmul_int8_amx);
  m.impl("matmul_bf16_amx", matmul_bf16_amx);
  m.impl("gemv_bf16", gemv_float<at::BFloat16>);
  m.impl("matmul_panels", matmul_panels);
  m.impl("matmul_bf16_dot", matmul_bf16_dot);
  m.impl("gemv_f32", gemv_float<float>);
  m.impl("gelu_tanh_", gelu_tanh_);
  m.impl("argmax_rows", argmax_rows);
  m.impl("decode_attention", decode_attention);
  m.impl("prefill_attention", prefill_attention);
  m.impl("kv_write", kv_write);
  m.impl("decode_layers", decode_layers);
}
