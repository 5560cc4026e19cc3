// What both builds of the kernels (gemv.cpp for AVX-512, gemv_avx2.cpp for AVX2) share: argument
// checks and the row-count, KV-cache-dtype and head-size dispatch, no vector code. Included inside each one's anonymous namespace.
#pragma once

// What every projection kernel's epilogue reads: act, an fp32 bias (N,), a residual (M, N) in the
// output's dtype.
void check_epilogue(const char* name, int64_t M, int64_t N, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& residual, at::ScalarType out, int64_t act) {
  TORCH_CHECK(act >= 0 && act <= 2, name, ": act is 0 (none), 1 (gelu tanh) or 2 (gelu erf)");
  if (bias) TORCH_CHECK(bias->is_contiguous() && bias->numel() == N && bias->scalar_type() == at::kFloat, name, ": fp32 bias (N,)");
  if (residual)
    TORCH_CHECK(residual->is_contiguous() && residual->scalar_type() == out && residual->size(0) == M && residual->size(1) == N,
                name, ": residual (M, N) in the output's dtype");
}

// Calls f(std::integral_constant<int, M>{}) for M in 1..Max (M >= Max: Max): the row count as a
// template argument, so each kernel's per-row accumulators live in registers.
template <int Max = 8, typename F>
void with_rows(int64_t M, F&& f) {
  if constexpr (Max > 1) {
    if (M < Max) return with_rows<Max - 1>(M, f);
  }
  f(std::integral_constant<int, Max>{});
}

// f(kv data, scales or null) with the cache's element type
template <typename F>
void with_cache(const at::Tensor& kv, const c10::optional<at::Tensor>& kv_scale, F&& f) {
  if (kv.scalar_type() == at::kFloat) f(kv.data_ptr<float>(), static_cast<const float*>(nullptr));
  else if (kv.scalar_type() == at::kBFloat16) f(kv.data_ptr<at::BFloat16>(), static_cast<const float*>(nullptr));
  else f(kv.data_ptr<int8_t>(), static_cast<const float*>(kv_scale->data_ptr<float>()));
}

// f(std::integral_constant<int64_t, 64>{}) for GPT-2's head size (every model of the family), else
// f(std::integral_constant<int64_t, 0>{}): decode attention's loops over a head then unroll.
template <typename F>
void with_head_size(int64_t D, F&& f) {
  if (D == 64) f(std::integral_constant<int64_t, 64>{});
  else f(std::integral_constant<int64_t, 0>{});
}

// The arguments' shapes for B queries of H heads of D values, and every length and slot in range
// (the kernel reads the cache at them). An 8-bit cache (int8 kv) comes with its scales, (S, 2, H) fp32.
void check_paged(int64_t B, int64_t H, int64_t D, const at::Tensor& kv, const at::Tensor& slots, const at::Tensor& lens,
                 const c10::optional<at::Tensor>& kv_scale) {
  TORCH_CHECK(kv.dim() == 4 && kv.size(1) == 2 && kv.size(2) == H && kv.size(3) == D,
              "decode_attention: q (B, H, D) and kv (S, 2, H, D) expected");
  TORCH_CHECK(kv.is_contiguous() && slots.is_contiguous() && lens.is_contiguous(), "decode_attention: contiguous kv, slots, lens");
  TORCH_CHECK(slots.scalar_type() == at::kLong && lens.scalar_type() == at::kLong && slots.dim() == 2 &&
              slots.size(0) == B && lens.numel() == B, "decode_attention: int64 slots (B, L), lens (B,)");
  TORCH_CHECK(kv.scalar_type() == at::kFloat || kv.scalar_type() == at::kBFloat16 || kv.scalar_type() == at::kChar,
              "decode_attention: fp32, bf16 or int8 cache");
  TORCH_CHECK((kv.scalar_type() == at::kChar) == kv_scale.has_value(), "decode_attention: scales with an int8 cache and only then");
  if (kv_scale)
    TORCH_CHECK(kv_scale->scalar_type() == at::kFloat && kv_scale->is_contiguous() && kv_scale->dim() == 3 &&
                kv_scale->size(0) == kv.size(0) && kv_scale->size(1) == 2 && kv_scale->size(2) == H,
                "decode_attention: contiguous fp32 scales (S, 2, H) for an int8 cache (S, 2, H, D)");
  TORCH_CHECK(D % 16 == 0 && D <= 128, "decode_attention: head_dim must be a multiple of 16, at most 128");
  const int64_t L = slots.size(1), S = kv.size(0);
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= L, "decode_attention: length out of range");
    for (int64_t j = 0; j < lp[b]; ++j) TORCH_CHECK(sp[b * L + j] >= 0 && sp[b * L + j] < S, "decode_attention: slot out of range");
  }
}

// The arguments of prefill_attention: q (T, H, D) fp32 or bf16, rows any stride; kv (L, 2, H, D)
// fp32 or bf16 (K then V of each key), rows any stride, L >= T.
void check_prefill(const at::Tensor& q, const at::Tensor& kv) {
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 4 && kv.size(1) == 2 && kv.size(2) == q.size(1) && kv.size(3) == q.size(2),
              "prefill_attention: q (T, H, D) and kv (L, 2, H, D) expected");
  const int64_t T = q.size(0), D = q.size(2), L = kv.size(0);
  TORCH_CHECK(T >= 1 && L >= T, "prefill_attention: 1 <= T <= L");
  TORCH_CHECK(D % 16 == 0, "prefill_attention: head_dim must be a multiple of 16");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == D && kv.stride(3) == 1 && kv.stride(2) == D,
              "prefill_attention: each row's heads must be contiguous");
  TORCH_CHECK((q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
              (kv.scalar_type() == at::kFloat || kv.scalar_type() == at::kBFloat16), "prefill_attention: fp32 or bf16");
}

// prefill_attention's flash tasks (both builds): one per head and block of QB queries, handed out
// from a counter with the last query blocks first (they see the most keys), so the threads finish
// together. task(q, k, v, out, q0, nq, buf) gets one head's queries, keys, values and output as typed
// pointers (fp32 or bf16; rows q.stride(0), kv.stride(0) and H * D elements apart) and `buf_floats`
// floats of the thread's scratch.
template <int64_t QB, typename Task>
at::Tensor prefill_tasks(const at::Tensor& q, const at::Tensor& kv, int64_t buf_floats, Task&& task) {
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  at::Tensor out = at::empty({T, H, D}, q.options());
  const int64_t nqb = (T + QB - 1) / QB, tasks = H * nqb;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  const bool qf = q.scalar_type() == at::kFloat, kf = kv.scalar_type() == at::kFloat;
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> buf(buf_floats);
    for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
      const int64_t qb = nqb - 1 - t / H, h = t % H, q0 = qb * QB, nq = std::min(QB, T - q0);
      auto head = [&](auto* qp, auto* kvp, auto* op) {
        task(qp + h * D, kvp + h * D, kvp + kv.stride(1) + h * D, op + h * D, q0, nq, buf.data());
      };
      if (qf && kf) head(q.data_ptr<float>(), kv.data_ptr<float>(), out.data_ptr<float>());
      else if (qf) head(q.data_ptr<float>(), kv.data_ptr<at::BFloat16>(), out.data_ptr<float>());
      else if (kf) head(q.data_ptr<at::BFloat16>(), kv.data_ptr<float>(), out.data_ptr<at::BFloat16>());
      else head(q.data_ptr<at::BFloat16>(), kv.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
    }
  });
  return out;
}

// A flash task's queries, scaled and transposed: qt[d][i] = q[q0 + i][d] * scale for i < nq, zero for
// the block's other QB - nq (q's rows qs elements apart)
template <int64_t QB, typename TQ>
void queries_transposed(const TQ* q, int64_t qs, int64_t q0, int64_t nq, int64_t D, float scale, float* qt) {
  for (int64_t d = 0; d < D; ++d)
    for (int64_t i = 0; i < QB; ++i) qt[d * QB + i] = i < nq ? static_cast<float>(q[(q0 + i) * qs + d]) * scale : 0.f;
}

// kv_write's arguments (both builds): the cache and K/V rows' layouts and dtypes, every slot in the
// cache, an int8 cache's scales with it and only then
inline void check_kv_write(const at::Tensor& cache, const at::Tensor& slots, const at::Tensor& kv,
                           const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK(cache.dim() == 4 && cache.size(1) == 2 && cache.is_contiguous(), "kv_write: a contiguous cache (S, 2, H, D)");
  TORCH_CHECK(kv.dim() == 4 && kv.size(1) == 2 && kv.size(2) == cache.size(2) && kv.size(3) == cache.size(3) && kv.stride(3) == 1 &&
              kv.stride(2) == kv.size(3) && kv.stride(1) == kv.size(2) * kv.size(3), "kv_write: kv (N, 2, H, D), each row contiguous");
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.size(0) == kv.size(0),
              "kv_write: int64 slots (N,)");
  TORCH_CHECK((cache.scalar_type() == at::kFloat || cache.scalar_type() == at::kBFloat16 || cache.scalar_type() == at::kChar) &&
              (kv.scalar_type() == at::kFloat || kv.scalar_type() == at::kBFloat16), "kv_write: an fp32, bf16 or int8 cache, fp32 or bf16 kv");
  const int64_t N = kv.size(0), S = cache.size(0), H = cache.size(2), D = cache.size(3), row = 2 * H * D;
  TORCH_CHECK(row % 16 == 0, "kv_write: 2 * H * D must be a multiple of 16");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(sp[n] >= 0 && sp[n] < S, "kv_write: slot out of range");
  TORCH_CHECK((cache.scalar_type() == at::kChar) == scale.has_value(), "kv_write: scales with an int8 cache and only then");
  if (scale) {
    TORCH_CHECK(D % 16 == 0, "kv_write: an int8 cache's head_dim must be a multiple of 16");
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->dim() == 3 && scale->size(0) == S &&
                scale->size(1) == 2 && scale->size(2) == H, "kv_write: contiguous fp32 scales (S, 2, H) for an int8 cache (S, 2, H, D)");
  }
}

// decode_layers' arguments both builds check alike: `per` tensors a layer of the cache kv (n_layer,
// S, 2, H, D), GELU's kind, and B queries of H heads of D values (rows_ok: B within what the build
// runs, which its mode decides).
inline void check_decode_layers(const std::vector<at::Tensor>& params, int64_t per, const at::Tensor& kv, int64_t B,
                                int64_t H, int64_t D, int64_t act, bool rows_ok) {
  TORCH_CHECK(static_cast<int64_t>(params.size()) == per * kv.size(0), "decode_layers: 24 tensors per layer");
  TORCH_CHECK(act == 1 || act == 2, "decode_layers: act is 1 (gelu tanh) or 2 (gelu erf)");
  TORCH_CHECK(B >= 1 && rows_ok && kv.dim() == 5 && kv.size(3) == H && kv.size(4) == D, "decode_layers: shapes");
}
