"""The serving kernels (gpt2.Bf16Conv1D; Int8Conv1D on fbgemm and on oneDNN; the AVX-512 GEMV of
gpt2serve/kernels under both) against plain Conv1D.

Each projection module offers forward, forward_gelu (c_fc + GELU) and forward_add (c_proj + the
residual); every kernel must compute what Conv1D computes, at every row count the engine sends
(1-4 = decode on the GEMV, up to 8 for int8, 9 = fbgemm, 16 = where int8 switches to oneDNN,
37 = an odd prefill chunk, 64 and 70 = int8's matmul_int8).
Tolerances: relative to the output's scale; bf16 keeps ~3 significant digits (measured max rel err
~0.006), int8 with per-channel weight scales and per-tensor activation scales ~0.01-0.02.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gpt2serve import kernels
from gpt2serve.model import gpt2 as gpt2_module
from gpt2serve.model.gpt2 import (AttentionMetadata, Bf16Conv1D, Conv1D, F32Conv1D, GPT2Config, GPT2LMHeadModel,
                                  Int8Conv1D, KVCache, quantize_kv)
from .helpers import forward_logits

ROWS = (1, 2, 3, 4, 7, 8, 9, 16, 37, 64, 70)


def _conv(nx: int, nf: int, seed: int = 0) -> Conv1D:
    g = torch.Generator().manual_seed(seed)
    c = Conv1D(nx, nf)
    with torch.no_grad():
        c.weight.copy_(torch.randn(nx, nf, generator=g) * 0.05)
        c.bias.copy_(torch.randn(nf, generator=g) * 0.1)
    return c.requires_grad_(False)


def _prepared(cfg: GPT2Config, dtype: str, seed: int) -> GPT2LMHeadModel:
    """A random model of `cfg` laid out for serving in `dtype` ("float32", "bfloat16", "int8")."""
    m = GPT2LMHeadModel(cfg).init_random(seed=seed).to(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    return m.prepare_for_serving(int8=dtype == "int8")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _check(kernel, ref: Conv1D, dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator().manual_seed(1)
    nx, nf = ref.weight.shape
    for m in ROWS:
        x = torch.randn(m, nx, generator=g)
        res = torch.randn(m, nf, generator=g)
        with torch.inference_mode():
            plain = ref(x)
            assert _rel(kernel(x.to(dtype)), plain) < tol, ("forward", m)
            assert _rel(kernel.forward_gelu(x.to(dtype), "tanh"), F.gelu(plain, approximate="tanh")) < tol, ("gelu", m)
            assert _rel(kernel.forward_gelu(x.to(dtype), "none"), F.gelu(plain)) < tol, ("gelu erf", m)
            r = res.to(dtype)
            r0 = r.clone()
            assert _rel(kernel.forward_add(x.to(dtype), r), res + plain) < tol, ("add", m)
            assert torch.equal(r, r0), "forward_add must not write into the residual"


def _need_amx(many: str = "amx") -> None:
    """Skips (saying why) a case of the AMX kernels on a CPU or kernel without AMX; there
    test_amx_kernels_refuse_without_amx checks that they say so."""
    if many == "amx":
        ops = kernels.gemv()
        if ops is None or not ops.amx_available():
            pytest.skip("this CPU (or its kernel) offers no AMX: the AMX kernels are not used here")


GEMV = pytest.param(True, marks=pytest.mark.skipif(not kernels.supported(), reason="this CPU lacks AVX-512 VNNI/BF16: the GEMV kernels are not used here"), id="gemv")


@pytest.fixture(params=["avx512", "avx2"])
def ops(request):
    """Each build of the kernels this CPU runs: AVX-512 (gemv.cpp) and AVX2 (gemv_avx2.cpp, what CPUs
    without AVX-512 VNNI/BF16 get; every AVX-512 CPU runs it too), for the ops both builds have."""
    if request.param == "avx512":
        if not kernels.supported():
            pytest.skip("this CPU lacks AVX-512 VNNI/BF16: the AVX-512 kernels are not used here")
        return kernels.gemv()
    if not kernels.supported_avx2():
        pytest.skip("this CPU lacks AVX2: no kernels are used here")
    ops = kernels.gemv_avx2()
    assert ops is not None, "the AVX2 kernels failed to build"
    return ops


def _builds_fresh(tmp_path, loader: str) -> None:
    """gpt2serve.kernels.<loader>() returns its ops in a fresh interpreter with an empty extensions
    folder, having built a shared object there."""
    code = f"import sys; from gpt2serve.kernels import {loader}; sys.exit(0 if {loader}() is not None else 3)"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert any((tmp_path / "ext").rglob("*.so")), "no shared object was built"


def test_gemv_builds_where_supported(tmp_path):
    """Where the CPU runs the kernels, they must build (CI has a compiler and ninja): a silent
    fallback to torch's kernels would hide a broken build. The first build goes into an empty
    extensions folder, in a fresh interpreter, so a build cached on this machine proves nothing."""
    if not kernels.supported():
        pytest.skip("this CPU lacks AVX-512 VNNI/BF16")
    _builds_fresh(tmp_path, "gemv")
    ops = kernels.gemv()
    assert ops is not None
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        ops.gemv_bf16(torch.zeros(9, 64, dtype=torch.bfloat16), torch.zeros(8, 64, dtype=torch.bfloat16), None, None, 0)


@pytest.mark.skipif(not kernels.supported_avx2(), reason="this CPU lacks AVX2: no kernels are used here")
def test_avx2_kernels_build_and_serve_cpus_without_avx512(tmp_path):
    """The AVX2 build must build from an empty extensions folder in a fresh interpreter (no silent
    fallback), and it is what gemv() hands out exactly where the AVX-512 one is not supported."""
    _builds_fresh(tmp_path, "gemv_avx2")
    avx2 = kernels.gemv_avx2()
    assert (kernels.gemv() is avx2) == (not kernels.supported())
    assert kernels.has_many_rows(avx2) and kernels.panel_width(avx2) == 16 and not hasattr(avx2, "matmul_int8")
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        avx2.gemv_f32(torch.zeros(9, 64), torch.zeros(8, 64), None, None, 0)


@pytest.mark.skipif(not kernels.supported_avx2(), reason="this CPU lacks AVX2: no kernels are used here")
def test_avx2_gemv_int8_is_the_exact_integer_product():
    """AVX2's int8 GEMV (vpmaddubsw on |x| and sign-flipped weights, no VNNI) gives the exact integer
    dot products of the per-row quantised x and the weights, then the GEMV's epilogue: against that
    computed in float64 here, for 1-8 rows, full-range activations (+-127 everywhere: the pairs that
    would saturate int16 with a u8 zero point), each activation."""
    ops = kernels.gemv_avx2()
    g = torch.Generator().manual_seed(3)
    K, N = 768, 333
    ref = _conv(K, N)
    m = Int8Conv1D(ref.weight, ref.bias, gemv=ops, many="fbgemm")
    m.q[:, :64] = 127  # with x = +-127 there: pairs of 2 * 127 * 127, beyond int16 for u8 = q + 128
    for rows in range(1, 9):
        x = torch.randn(rows, K, generator=g)
        x[:, :64] = torch.where(torch.rand(rows, 64, generator=g) < 0.5, -1.0, 1.0) * x.abs().amax()
        res = torch.randn(rows, N, generator=g)
        s = x.abs().amax(dim=1, keepdim=True) / 127
        q = torch.clamp(torch.round(x * (1 / s)), -127, 127)
        pre = (q.double() @ m.q.double().t()).float() * s * m.scale + m.bias
        for act, f in ((0, lambda y: y), (1, lambda y: F.gelu(y, approximate="tanh")), (2, F.gelu)):
            got = ops.gemv_int8(x, m.q, m.qsum, m.scale, m.bias, res, act)
            assert (got - (f(pre) + res)).abs().max().item() < 1e-5, (rows, act)


@pytest.mark.skipif(not kernels.supported_avx2(), reason="this CPU lacks AVX2: no kernels are used here")
@pytest.mark.parametrize("kind", ["int8", "fp32"])
@pytest.mark.parametrize("many", ["torch", "panels"])
def test_avx2_projections_match_conv1d(kind, many):
    """The projection modules as prepare_for_serving makes them on an AVX2 CPU (the AVX2 GEMV up to 4
    rows; above, fbgemm / oneDNN or the AVX2 build's 16-column panels, whichever won at load)
    compute what Conv1D does."""
    ops = kernels.gemv_avx2()
    ref = _conv(128, 384)
    if kind == "int8":
        m = Int8Conv1D(ref.weight, ref.bias, gemv=ops, many="fbgemm" if many == "torch" else many)
        assert m.panels is None if many == "torch" else m.panels.shape == (24, 64, 16, 2)
        _check(m, ref, torch.float32, 0.03)
    else:
        m = F32Conv1D(ref.weight, ref.bias, gelu_ops=ops, gemv=ops, many="onednn" if many == "torch" else many)
        assert m.panels is None if many == "torch" else m.panels.shape == (24, 128, 16)
        _check(m, ref, torch.float32, 1e-5)


@pytest.mark.skipif(not kernels.supported_avx2(), reason="this CPU lacks AVX2: no kernels are used here")
@pytest.mark.parametrize("rows", [5, 13, 37, 70])
def test_avx2_int8_panels_rows_equal_each_row_alone(rows):
    """The AVX2 build's int8 panels (vpmaddwd on int16-widened operands) give each row the GEMV's
    exact integer dot products and epilogue: every row of a batch equals that row alone on the GEMV,
    to the bit, whatever the other rows hold (an outlier row included), with full-range weights
    and activations (+-127), in every epilogue; 70 rows: the panels also take prompts here (this
    build has no matmul_int8), whatever matmul_rows says."""
    from gpt2serve.model.gpt2 import pack_int8_panels

    ops = kernels.gemv_avx2()
    ref = _conv(128, 360)  # 360 columns: the last 16-column panel half padding
    m = Int8Conv1D(ref.weight, ref.bias, gemv=ops, many="panels")
    assert m._packed is None and m.matmul_rows == 64  # the class default: ignored without matmul_int8
    m.q[:, :64] = torch.where(torch.arange(64) % 2 == 0, 127, -127).to(torch.int8)
    m.panels = pack_int8_panels(m.q, 16)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 128, generator=g)
    x[:, :32] = torch.where(torch.rand(rows, 32, generator=g) < 0.5, -1.0, 1.0) * x.abs().amax()
    x[rows // 2] *= 50  # an outlier row: with a shared scale it would coarsen every other row
    res = torch.randn(rows, 360, generator=g)
    with torch.inference_mode():
        for call in (lambda a, r: m(a), lambda a, r: m.forward_gelu(a, "tanh"),
                     lambda a, r: m.forward_gelu(a, "none"), lambda a, r: m.forward_add(a, r)):
            whole = call(x, res)
            for i in range(rows):
                assert torch.equal(whole[i:i + 1], call(x[i:i + 1], res[i:i + 1])), i
    with pytest.raises(RuntimeError, match="does not match"):
        ops.matmul_int8_panels(x, m.panels, m.qsum, m.scale[:300].contiguous(), None, None, 0)


@pytest.mark.skipif(not kernels.supported_avx2(), reason="this CPU lacks AVX2: no kernels are used here")
def test_avx2_int8_prompts_on_fbgemm_where_it_wins(monkeypatch):
    """With the AVX2 build, where fbgemm beat the panels at prompts (_choose_int8_prompt_matmul, made
    to answer so here), every projection gets fbgemm's copy too: calls of >= matmul_rows rows run on
    it (its 7-bit activations: not the GEMV's numbers), fewer on the panels (each row the GEMV's),
    and decode_layers stops below matmul_rows."""
    gemv_avx2 = kernels.gemv_avx2()
    monkeypatch.setattr(kernels, "gemv", lambda: gemv_avx2)  # this build whatever the CPU
    # and a CPU without AMX, as the AVX2 build's are: with AMX, prompts go to oneDNN's copy instead
    monkeypatch.setattr(gpt2_module, "has_amx", lambda: False)
    monkeypatch.setattr(GPT2LMHeadModel, "_choose_many", lambda self, *a, **k: setattr(self, "many_rows", "panels") or "panels")
    monkeypatch.setattr(GPT2LMHeadModel, "_choose_int8_prompt_matmul", lambda self, gemv: 64)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=128, n_positions=128, vocab_size=300)
    m = GPT2LMHeadModel(cfg).init_random(seed=3).prepare_for_serving(int8=True)
    fc = m.transformer.h[0].mlp.c_fc
    assert m.kernels is gemv_avx2 and fc.panels is not None and fc._packed is not None and fc.matmul_rows == 64
    assert m._decode_layers.max_rows == 63
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        x = torch.randn(70, 128, generator=g)
        assert torch.equal(fc(x), torch.ops.quantized.linear_dynamic(x, fc._packed, True))
        x = torch.randn(37, 128, generator=g)
        assert torch.equal(fc(x)[:1], fc(x[:1]))  # the panels: row 0 as the GEMV computes it alone


@pytest.mark.skipif(not kernels.supported_avx2(), reason="this CPU lacks AVX2: no kernels are used here")
def test_avx2_int8_decode_rows_stay_on_the_panels(monkeypatch):
    """With the AVX2 build int8's decode rows (5-63) run on the panels without a timed race against
    fbgemm (which flipped between loads on AMD Zen 3 and changes outputs with its 7-bit rounding):
    even where fbgemm would win every timing, the model keeps the panels and decode_layers takes
    batched decode steps, each row as the GEMV computes it alone."""
    gemv_avx2 = kernels.gemv_avx2()
    monkeypatch.setattr(kernels, "gemv", lambda: gemv_avx2)
    monkeypatch.setattr(gpt2_module, "has_amx", lambda: False)
    monkeypatch.setattr(gpt2_module, "panels_win", lambda make, w, rival="onednn", **k: (rival, {"panels": 9.0, rival: 1.0}))
    monkeypatch.setattr(GPT2LMHeadModel, "_choose_int8_prompt_matmul", lambda self, gemv: None)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=128, n_positions=128, vocab_size=300)
    m = GPT2LMHeadModel(cfg).init_random(seed=3).prepare_for_serving(int8=True)
    fc = m.transformer.h[0].mlp.c_fc
    assert m.many_rows == "panels" and fc.panels is not None and fc._packed is None
    assert m._decode_layers is not None and m._decode_layers.max_rows > 32
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        x = torch.randn(32, 128, generator=g)
        assert torch.equal(fc(x)[5:6], fc(x[5:6]))


@pytest.mark.skipif(not Bf16Conv1D.supported(torch.bfloat16, torch.device("cpu")),
                    reason="this CPU's oneDNN has no bf16 (no AVX512-BF16/AMX): Bf16Conv1D is not used here")
@pytest.mark.parametrize("gemv", [False, GEMV], ids=["onednn", "gemv"])
@pytest.mark.parametrize("many", ["onednn", "panels", "dot", "amx"])
def test_bf16_matches_conv1d(gemv, many):
    """Every way of running calls of > gemv_rows rows: oneDNN's bf16 linear, and the kernels'
    matmul_panels (fp32 FMAs on panel-packed bf16 weights), matmul_bf16_dot (bf16 dot products)
    or matmul_bf16_amx (only with the kernels)."""
    if gemv:
        _need_amx(many)
    ref = _conv(128, 384)
    kernel = Bf16Conv1D(ref.weight.to(torch.bfloat16), ref.bias.to(torch.bfloat16), gemv=kernels.gemv() if gemv else None, many=many)
    assert (kernel.gemv is not None) == gemv
    assert (kernel.panels is not None) == (gemv and many != "onednn") and (kernel.packed is None) == (kernel.panels is not None)
    _check(kernel, ref, torch.bfloat16, 0.02)


@pytest.mark.parametrize("n", [40, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_matmul_panels_output_widths_that_are_not_panel_multiples(n, dtype, ops):
    """The head's case (50,257 columns): the last panel is zero-padded and its padding is never
    written; every real column equals the fp32 product of the (bf16) weights. Both builds, each
    with its panel width (the AVX2 build's: fp32 only), rows in uneven groups (9, 13, 31)."""
    from gpt2serve.model.gpt2 import pack_panels

    width = kernels.panel_width(ops)
    if width == 16 and dtype == torch.bfloat16:
        with pytest.raises(ValueError, match="fp32"):
            pack_panels(torch.zeros(64, n, dtype=dtype), width)
        return
    g = torch.Generator().manual_seed(n)
    w = (torch.randn(64, n, generator=g) * 0.05).to(dtype)
    panels = pack_panels(w, width)
    assert panels.shape == ((n + width - 1) // width, 64, width)
    for rows in (9, 13, 31):
        x = torch.randn(rows, 64, generator=g)
        y = ops.matmul_panels(x, panels, n, None, None, 0)
        assert y.shape == (rows, n)
        assert _rel(y, x @ w.float()) < 1e-5
    with pytest.raises(RuntimeError, match="N does not match"):
        ops.matmul_panels(x, panels, n + width, None, None, 0)


@pytest.mark.skipif(not kernels.supported() or not Bf16Conv1D.supported(torch.bfloat16, torch.device("cpu")),
                    reason="no native bf16 or no kernels here")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "int8"])
def test_model_makes_one_copy_for_many_rows(dtype):
    """prepare_for_serving times the kernels' many-row matmuls (bf16: the panels and the dot
    products) against oneDNN (int8: fbgemm) once and builds only the winner's weights: every
    projection and the head hold exactly one kind."""
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=128, n_positions=64, vocab_size=300)
    m = _prepared(cfg, dtype, seed=4)
    ops = kernels.gemv()
    if ops.amx_available() and dtype != "float32":  # the AMX kernels, on the same panels, untimed
        assert m.many_rows == "amx"
    else:
        assert m.many_rows in {"int8": ("panels", "fbgemm"), "bfloat16": ("panels", "dot", "onednn"), "float32": ("panels", "onednn")}[dtype]
    mods = [mod for mod in m.modules() if isinstance(mod, (Bf16Conv1D, F32Conv1D, Int8Conv1D))]
    assert len(mods) == 4 * 2 + 1
    ours = m.many_rows in ("panels", "dot", "amx")
    for mod in mods:
        rival = mod._packed if dtype == "int8" else mod.packed
        assert (mod.panels is not None) == ours and (rival is None) == ours
    if dtype == "int8":  # with the VNNI panels, many rows went to the faster of them and matmul_int8 (timed too)
        expect = {None, 64} if m.many_rows == "panels" else {64}
        assert {mod.matmul_rows for mod in mods} <= expect and len({mod.matmul_rows for mod in mods}) == 1
        assert m._decode_layers.many == {"panels": 1 if mods[0].matmul_rows else 4, "amx": 2}.get(m.many_rows, 0)


@pytest.mark.parametrize("gemv", [False, GEMV], ids=["torch", "gemv"])
@pytest.mark.parametrize("amx", [False, True], ids=["fbgemm", "onednn"])
@pytest.mark.parametrize("many", ["panels", "fbgemm", "amx"])
def test_int8_matches_conv1d(amx, gemv, many):
    # amx=True packs for oneDNN too; oneDNN runs its int8 kernels on any x86 CPU, AMX or not, so
    # both paths are exercised everywhere (rows >= onednn_rows take oneDNN); many: what takes 5-63
    # rows with the kernels (5-127 for the AMX kernel)
    if gemv:
        _need_amx(many)
    if amx and not kernels.has_vnni():
        # without VNNI oneDNN multiplies u8 x s8 pairs into saturating int16 (vpmaddubsw), so its full-range
        # activations overflow; the engine packs for oneDNN only on AMX CPUs (prepare_for_serving)
        pytest.skip("this CPU has no VNNI: oneDNN's full-range int8 saturates here and the engine never uses it")
    ref = _conv(128, 384)
    kernel = Int8Conv1D(ref.weight, ref.bias, amx=amx, gemv=kernels.gemv() if gemv else None, many=many)
    assert (kernel._packed_amx is not None) == (amx and many != "amx")  # the AMX kernel takes every row count
    assert (kernel.gemv is not None) == gemv
    assert (kernel.panels is not None) == (gemv and many != "fbgemm") and (kernel._packed is None) == (kernel.panels is not None)
    _check(kernel, ref, torch.float32, 0.03)


@pytest.mark.skipif(not kernels.supported(), reason="this CPU lacks AVX-512 VNNI/BF16: the kernels are not used here")
@pytest.mark.parametrize("rows,many", [(13, "panels"), (37, "panels"), (70, "panels"), (13, "amx"), (37, "amx"), (150, "amx")],
                         ids=["panels-13", "panels-37", "matmul-70", "amx-13", "amx-37", "amx-150"])
def test_int8_rows_equal_each_row_alone(rows, many):
    """With the kernels every int8 call computes a row as the GEMV does: matmul_int8_panels (5 to
    63 rows), matmul_int8 (from Int8Conv1D.matmul_rows) and matmul_int8_amx (many="amx") quantise
    each row on its own and finish it with the GEMV's epilogue, so every row of a batch equals, to
    the bit, that row run alone on the GEMV, whatever the other rows hold (fbgemm, one scale for
    the whole batch, would not)."""
    _need_amx(many)
    ref = _conv(128, 368)  # 368 columns: the last 32-column panel half padding
    kernel = Int8Conv1D(ref.weight, ref.bias, gemv=kernels.gemv(), many=many)
    assert kernel._packed is None  # no fbgemm copy where the kernels take every row count
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 128, generator=g)
    x[5] *= 50  # an outlier row: with a shared scale it would coarsen every other row
    res = torch.randn(rows, 368, generator=g)
    with torch.inference_mode():
        for call in (lambda a, r: kernel(a), lambda a, r: kernel.forward_gelu(a, "tanh"),
                     lambda a, r: kernel.forward_gelu(a, "none"), lambda a, r: kernel.forward_add(a, r)):
            whole = call(x, res)
            for i in (0, 5, rows - 1):
                assert torch.equal(whole[i:i + 1], call(x[i:i + 1], res[i:i + 1])), i
    ops = kernels.gemv()
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.matmul_int8(torch.zeros(2, 40), torch.zeros(8, 40, dtype=torch.int8), torch.ones(8), None, None, 0)


@pytest.mark.skipif(not kernels.supported(), reason="this CPU lacks AVX-512 VNNI/BF16: the kernels are not used here")
@pytest.mark.parametrize("m,K", [(5, 256), (16, 256), (17, 256), (33, 256), (130, 256), (352, 3072)])
def test_amx_kernels_match_their_references(m, K):
    """matmul_int8_amx computes what matmul_int8 does (the GEMV's arithmetic), to the bit;
    matmul_bf16_amx the fp32 product of the bf16 operands, to fp32 rounding of its sums. Rows that
    are not a multiple of the tiles' 16, columns that are not a multiple of the panels' 32, every
    epilogue (bias, GELU tanh / exact, the residual), run after the tiles (<= 32 rows) or during the
    next block's (more); 352 x 3072 takes the rows in chunks of <= 1 MiB of x (bf16 3, int8 2)."""
    from gpt2serve.model.gpt2 import pack_amx_bf16, pack_int8_panels

    _need_amx()
    ops = kernels.gemv()
    g = torch.Generator().manual_seed(m)
    N = 300  # the int8 kernels take K in multiples of 128
    w8 = Int8Conv1D(torch.randn(K, N, generator=g) * 0.05, torch.randn(N, generator=g), gemv=ops, many="amx")
    wb = (torch.randn(K, N, generator=g) * 0.05).bfloat16()
    bias = torch.randn(N, generator=g)
    x = torch.randn(m, K, generator=g)
    x[m // 2] *= 40  # an outlier row
    res = torch.randn(m, N, generator=g)
    xb, rb = x.bfloat16(), res.bfloat16()
    for act, r in ((0, None), (1, None), (2, None), (0, res)):
        got = ops.matmul_int8_amx(x, w8.panels, w8.qsum, w8.scale, w8.bias, r, act)
        assert torch.equal(got, ops.matmul_int8(x, w8.q, w8.scale, w8.bias, r, act)), act
        ref = xb.float() @ wb.float() + bias
        ref = F.gelu(ref, approximate="tanh") if act == 1 else F.gelu(ref) if act == 2 else ref
        ref = ref if r is None else ref + rb.float()
        y = ops.matmul_bf16_amx(xb, pack_amx_bf16(wb), N, bias, None if r is None else rb, act)
        assert y.dtype == torch.bfloat16 and y.shape == (m, N)
        assert _rel(y, ref) < 8e-3, act  # the output's bf16 rounding
    assert pack_int8_panels(w8.q).data_ptr() != w8.panels.data_ptr() and torch.equal(pack_int8_panels(w8.q), w8.panels)
    with pytest.raises(RuntimeError, match="N does not match"):
        ops.matmul_bf16_amx(xb, pack_amx_bf16(wb), N + 32, None, None, 0)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        ops.matmul_int8_amx(torch.zeros(2, 32), torch.zeros(1, 8, 32, 4, dtype=torch.int8), torch.zeros(32, dtype=torch.int32),
                            torch.ones(32), None, None, 0)


@pytest.mark.skipif(not kernels.supported(), reason="this CPU lacks AVX-512 VNNI/BF16: the kernels are not used here")
def test_amx_kernels_refuse_without_amx():
    """Where the CPU (or the OS) offers no AMX, the AMX kernels say so instead of faulting, and the
    model does not choose them."""
    ops = kernels.gemv()
    if ops.amx_available():
        pytest.skip("this CPU has AMX: test_amx_kernels_match_their_references covers the kernels")
    with pytest.raises(RuntimeError, match="no AMX"):
        ops.matmul_bf16_amx(torch.zeros(16, 32, dtype=torch.bfloat16), torch.zeros(1, 16, 32, 2, dtype=torch.bfloat16), 32, None, None, 0)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=128, n_positions=32, vocab_size=100)
    assert _prepared(cfg, "int8", seed=0).many_rows != "amx"


@pytest.mark.skipif(not F32Conv1D.supported(torch.float32, torch.device("cpu")), reason="torch built without oneDNN")
@pytest.mark.parametrize("gemv", [False, GEMV], ids=["addmm", "gemv"])
@pytest.mark.parametrize("many", ["onednn", "panels"])
def test_f32_matches_conv1d(gemv, many):
    """fp32: the GEMV up to 4 rows (or without it MKL's addmm at one row, identical to Conv1D),
    above oneDNN's packed linear with its GELU and add post-ops or the kernels' matmul_panels
    (fp32 rounding order only)."""
    ref = _conv(64, 192)
    kernel = F32Conv1D(ref.weight, ref.bias, gemv=kernels.gemv() if gemv else None, many=many)
    assert (kernel.gemv is not None) == gemv
    assert (kernel.panels is not None) == (gemv and many == "panels")
    _check(kernel, ref, torch.float32, 1e-5)
    x = torch.randn(1, 64)
    with torch.inference_mode():
        assert gemv or torch.equal(kernel(x), ref(x))
        # the head's case: a transposed view of an (out, in) weight is read in place, not copied
        wte = torch.randn(300, 64)
        head = F32Conv1D(wte.t(), None, gemv=kernels.gemv() if gemv else None)
        assert head.weight.data_ptr() == wte.data_ptr()
        assert _rel(head(x), x @ wte.t()) < 1e-5


def test_prepare_for_serving_kernels_agree():
    """A whole tiny model: "auto" kernels give the logits the plain torch ops give."""
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64)
    ids = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(0))
    for dtype in ("float32", "bfloat16", "int8"):
        pdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        logits = {}
        for kernels in ("torch", "auto"):
            m = GPT2LMHeadModel(cfg).init_random(seed=5).to(pdt)
            m.prepare_for_serving(int8=dtype == "int8", kernels=kernels)
            logits[kernels] = forward_logits(m, ids)
        diff = (logits["auto"] - logits["torch"]).abs().max().item()
        assert diff < 0.05 * logits["torch"].abs().max().item(), (dtype, diff)
    with pytest.raises(ValueError, match="kernels"):
        GPT2LMHeadModel(cfg).prepare_for_serving(kernels="fast")


def test_bf16_without_native_bf16_is_its_fp32_model(monkeypatch):
    """On a CPU without native bf16 (torch's bf16 matmuls ~60x slower than fp32 there) a bf16 model is
    served as the fp32 model of its bf16-rounded weights: the same logits to the bit, an fp32 cache.
    Forced here on every CPU; "torch" kernels (the comparison mode) keep bf16."""
    monkeypatch.setattr(Bf16Conv1D, "supported", staticmethod(lambda dtype, device: False))
    # the same many-row matmuls for both models: each load times them, and the two loads' timings
    # can pick differently (the panels' and oneDNN's fp32 sums differ in the last bits; seen in CI)
    monkeypatch.setattr(gpt2_module, "panels_win", lambda make, w, rival="onednn", **k: ("panels", {"panels": 1.0, rival: 2.0}))
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=128, n_positions=64, vocab_size=300)
    ids = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    served = GPT2LMHeadModel(cfg).init_random(seed=3).to(torch.bfloat16).prepare_for_serving()
    widened = GPT2LMHeadModel(cfg).init_random(seed=3).to(torch.bfloat16).float().prepare_for_serving()
    assert served.kv_dtype == torch.float32 and all(p.dtype == torch.float32 for p in served.parameters())
    with torch.inference_mode():
        assert torch.equal(forward_logits(served, ids), forward_logits(widened, ids))
        # decode rows: the AVX2 GEMV reads bf16 copies of the weights, widened in registers: the same products
        h = torch.randn(1, cfg.n_embd, generator=torch.Generator().manual_seed(2))
        assert torch.equal(served.logits(h), widened.logits(h))
    if kernels.is_avx2(served.kernels):
        assert served._lm_head.weight.dtype == torch.bfloat16 and served.transformer.h[0].mlp.c_fc.weight.dtype == torch.bfloat16
    plain = GPT2LMHeadModel(cfg).init_random(seed=3).to(torch.bfloat16).prepare_for_serving(kernels="torch")
    assert plain.kv_dtype == torch.bfloat16


@pytest.mark.skipif(not kernels.supported() or not Bf16Conv1D.supported(torch.bfloat16, torch.device("cpu")),
                    reason="this CPU lacks AVX-512 VNNI/BF16 (or torch oneDNN bf16): no bf16 cache here")
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_prompt_attention_choice_keeps_the_logits(dtype):
    """Over a bf16 cache (bf16 and int8 modes) prepare_for_serving picks bf16 or fp32 products for
    prompt attention once for every block (on AMX always bf16); a whole prompt's logits agree
    either way within bf16's rounding."""
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=128, n_positions=256)  # head_dim 64, as GPT-2's
    m = _prepared(cfg, dtype, seed=3)
    assert m.kv_dtype == torch.bfloat16
    chosen = {b.attn.prefill_bf16 for b in m.transformer.h}
    assert len(chosen) == 1 and isinstance(chosen.pop(), bool)
    if kernels.gemv().amx_available():
        assert m.transformer.h[0].attn.prefill_bf16
    T = 200
    ids = torch.randint(0, cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(1))
    logits = {}
    for bf16 in (True, False):
        for b in m.transformer.h:
            b.attn.prefill_bf16 = bf16
        cache = KVCache(cfg, (T + 15) // 16, 16, m.kv_dtype, torch.device("cpu"))  # bf16, as the engine's
        meta = AttentionMetadata(0, torch.arange(T), None, None, [(0, T, None, None)])
        logits[bf16] = m.logits(m(ids, torch.arange(T), cache, meta))
    assert not torch.equal(logits[True], logits[False])  # the two paths really differ
    assert _rel(logits[True], logits[False]) < 0.02


@pytest.mark.parametrize("D", [64, 32, 128], ids=["d64", "d32", "d128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_attention_matches_gather_and_sdpa(dtype, D, ops):
    """The paged decode-attention kernel equals the torch path (gather the contexts, masked SDPA)
    on scattered slots and uneven lengths, including a length-1 context; for GPT-2's head size (64,
    compiled into the kernel) and others (read at run time)."""
    g = torch.Generator().manual_seed(0)
    S, H, B, L = 512, 4, 5, 37
    kv = torch.randn(S, 2, H, D, generator=g).to(dtype)
    slots = torch.randperm(S, generator=g)[: B * L].view(B, L).contiguous()
    lens = torch.tensor([L, 1, 20, 36, 5])
    q = torch.randn(B, H, D, generator=g).to(dtype)
    ctx = kv.index_select(0, slots.view(-1)).view(B, L, 2, H, D)
    mask = (torch.arange(L)[None, :] < lens[:, None])[:, None, None, :]
    ref = F.scaled_dot_product_attention(q.unsqueeze(2).float(), ctx[:, :, 0].transpose(1, 2).float(),
                                         ctx[:, :, 1].transpose(1, 2).float(), attn_mask=mask).squeeze(2)
    out = ops.decode_attention(q, kv, slots, lens)
    assert out.dtype == dtype and out.shape == (B, H, D)
    assert (out.float() - ref).abs().max().item() < (1e-5 if dtype == torch.float32 else 2e-2)
    # 5 sequences on <= 2 threads go a whole sequence per task, 1 sequence per (sequence, head):
    # the same arithmetic in the same order
    assert torch.equal(ops.decode_attention(q[:1], kv, slots[:1], lens[:1]), out[:1])
    with pytest.raises(RuntimeError, match="length out of range"):
        ops.decode_attention(q, kv, slots, torch.tensor([0, 1, 1, 1, 1]))
    with pytest.raises(RuntimeError, match="slot out of range"):
        ops.decode_attention(q, kv, torch.full((B, L), S), lens)


@pytest.mark.parametrize("D", [64, 32], ids=["d64", "d32"])
def test_decode_attention_over_an_int8_cache_matches_its_dequantized_rows(D, ops):
    """An 8-bit cache (int8 values, a scale per slot, K/V and head): the kernel equals SDPA over the
    dequantized contexts, on both of its paths (a sequence per task and a (sequence, head) per task,
    the same arithmetic), and refuses an int8 cache without its scales."""
    g = torch.Generator().manual_seed(2)
    S, H, B, L = 512, 4, 5, 37
    kv, scale = quantize_kv(torch.randn(S, 2, H, D, generator=g) * torch.rand(S, 2, H, 1, generator=g) * 4)
    slots = torch.randperm(S, generator=g)[: B * L].view(B, L).contiguous()
    lens = torch.tensor([L, 1, 20, 36, 5])
    q = torch.randn(B, H, D, generator=g)
    ctx = (kv.float() * scale[..., None]).index_select(0, slots.view(-1)).view(B, L, 2, H, D)
    mask = (torch.arange(L)[None, :] < lens[:, None])[:, None, None, :]
    ref = F.scaled_dot_product_attention(q.unsqueeze(2), ctx[:, :, 0].transpose(1, 2), ctx[:, :, 1].transpose(1, 2),
                                         attn_mask=mask).squeeze(2)
    out = ops.decode_attention(q, kv, slots, lens, scale)
    assert out.dtype == torch.float32 and (out - ref).abs().max().item() < 1e-5
    assert torch.equal(ops.decode_attention(q[:1], kv, slots[:1], lens[:1], scale), out[:1])
    with pytest.raises(RuntimeError, match="scales with an int8 cache"):
        ops.decode_attention(q, kv, slots, lens)
    with pytest.raises(RuntimeError, match="scales with an int8 cache"):
        ops.decode_attention(q, ctx.new_zeros(S, 2, H, D), slots, lens, scale)


@pytest.mark.parametrize("V", [1, 15, 16, 50257])
def test_argmax_rows_is_torch_argmax(V, ops):
    """The sampler's argmax: each row's first index of its maximum, as torch.argmax, with ties inside
    and across vector lanes, -inf (masked) entries, a row all -inf, and widths that are not a
    multiple of 16."""
    g = torch.Generator().manual_seed(V)
    x = torch.randint(-4, 5, (37, V), generator=g).float()  # small integers: many ties
    x[1] = float("-inf")
    x[2, : V // 2] = float("-inf")
    x[3] = torch.randn(V, generator=g)
    x[4, -1] = 100.0  # the maximum in the last (partial) vector
    got = ops.argmax_rows(x)
    assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1))
    with pytest.raises(RuntimeError, match="argmax_rows"):
        ops.argmax_rows(x.double())


def test_gelu_tanh_matches_torch(ops):
    """GPT-2's GELU in place, against torch's tanh form: every size (a masked tail when the count is
    not a multiple of 16), large magnitudes of both signs (exp's clamp), infinities."""
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 3072), (5, 17), (32, 3072), (3,)]:
        x = torch.randn(shape, generator=g) * 4
        x.view(-1)[0], x.view(-1)[-1] = -100.0, 100.0
        ref = F.gelu(x, approximate="tanh")
        y = x.clone()
        ops.gelu_tanh_(y)
        assert (y - ref).abs().max().item() < 1e-6, shape
    y = torch.tensor([float("inf"), -30.0, -10.5, 0.0, 30.0])
    ops.gelu_tanh_(y)
    assert y[0] == float("inf") and y[3] == 0 and y[4] == 30.0 and abs(y[1]) < 1e-30 and abs(y[2]) < 1e-20
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        ops.gelu_tanh_(torch.zeros(4, 4).t())


@pytest.mark.skipif(not kernels.supported_avx2(), reason="this CPU lacks AVX2: no kernels are used here")
@pytest.mark.parametrize("dtype,batch,many", [(d, b, m) for d in ("float32", "bfloat16", "int8")
                                               for b in (1, 3, 4, 7, 20, *((70,) if d == "int8" else ()))
                                               for m in ("onednn", "panels", *{"bfloat16": ("dot",), "int8": ("panels-all",)}.get(d, ()))])
@pytest.mark.parametrize("kv", ["auto", "int8"], ids=["float-cache", "int8-cache"])
def test_decode_layers_equals_the_python_blocks(dtype, batch, many, kv, monkeypatch):
    """A decode step through the kernels' decode_layers gives the Python blocks' hidden states and
    cache writes to the bit (the same ops in the same order), at uneven context lengths: up to 4
    rows on the GEMV; more on the model's many-row kernels (the panels, bf16's dot products, or the
    AMX tiles where the CPU has them) when they are the kernels', none when oneDNN or fbgemm takes them (many:
    what the load-time choice, panels_win, is made to return; int8's "panels-all": the panels also
    where matmul_int8 would take 64 rows and more, _choose_int8_prompt_matmul's other answer). With the
    AVX2 build (CPUs without AVX-512 VNNI/BF16) its 16-column panels (int8 at every row count: no
    matmul_int8 there), and a bf16 model runs as fp32 on its bf16 weights."""
    native_bf16 = Bf16Conv1D.supported(torch.bfloat16, torch.device("cpu"))
    if many == "dot" and not native_bf16:
        pytest.skip("no native bf16 here: a bf16 model runs as fp32, whose choice is panels or oneDNN")
    rival = "fbgemm" if dtype == "int8" else "onednn"
    all_rows = many == "panels-all"
    many = "panels" if all_rows else many
    monkeypatch.setattr(GPT2LMHeadModel, "_choose_many",
                        lambda self, *a, **k: setattr(self, "many_rows", rival if many == "onednn" else many) or self.many_rows)
    monkeypatch.setattr(GPT2LMHeadModel, "_choose_int8_prompt_matmul", lambda self, *a, **k: None if all_rows else 64)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=128, n_positions=64, vocab_size=300)
    m = GPT2LMHeadModel(cfg).init_random(seed=3).to(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    m.prepare_for_serving(int8=dtype == "int8")
    fused = m._decode_layers
    assert fused is not None and fused.mode == {"int8": 0, "bfloat16": 1 if native_bf16 else 2, "float32": 2}[dtype]
    ours = m.many_rows in ("panels", "dot", "amx")  # with AMX, int8 and bf16 take the tiles whatever panels_win says
    assert fused.many == (0 if not ours else {"amx": 2, "dot": 3}.get(m.many_rows, 4 if all_rows else 1))
    # the AVX2 build (no matmul_int8) hands int8's calls of >= 64 rows to fbgemm unless the panels take all
    fbgemm_prompts = ours and dtype == "int8" and not all_rows and kernels.is_avx2(m.kernels)
    assert fused.max_rows == (4 if not ours else 63 if fbgemm_prompts else 1 << 30)
    if batch > fused.max_rows:
        assert not ours or fbgemm_prompts
        return  # the Python blocks run these steps: nothing to compare
    g = torch.Generator().manual_seed(1)
    bs, lens = 16, [5, 17, 1, 30, 9, 2, 32, 16, 3, 21, 11, 28, 7, 1, 19, 25, 13, 32, 2, 8][:batch]
    lens += torch.randint(1, 33, (batch - len(lens),), generator=g).tolist()  # 70 rows: int8's matmul_int8 or panels
    cache = KVCache(cfg, 2 * batch, bs, torch.int8 if kv == "int8" else m.kv_dtype, torch.device("cpu"), compute_dtype=m.kv_dtype)
    if kv == "int8":  # contexts already cached
        cache.kv.copy_(torch.randint(-127, 128, cache.kv.shape, generator=g, dtype=torch.int8))
        cache.scale.copy_(torch.rand(cache.scale.shape, generator=g) / 30)
    else:
        cache.kv.copy_(torch.randn(cache.kv.shape, generator=g).to(cache.kv.dtype))
    blocks = torch.randperm(2 * batch, generator=g).view(batch, 2)  # 2 scattered blocks per sequence
    pos = torch.tensor(lens) - 1  # each sequence's new token is the last of its context
    gather = torch.stack([blk[torch.arange(32) // bs] * bs + torch.arange(32) % bs for blk in blocks])  # (B, 32)
    meta = AttentionMetadata(num_decode=batch, slot_mapping=gather[torch.arange(batch), pos].contiguous(),
                             decode_gather=gather, decode_mask=None, prefills=[], decode_lens=torch.tensor(lens))
    ids = torch.randint(0, 300, (batch,), generator=g)
    kv0 = cache.kv.clone()
    scale0 = None if cache.scale is None else cache.scale.clone()
    out_fused = m(ids, pos, cache, meta)
    kv_fused = cache.kv.clone()
    scale_fused = None if cache.scale is None else cache.scale.clone()
    cache.kv.copy_(kv0)
    if scale0 is not None:
        cache.scale.copy_(scale0)
    m._decode_layers = None
    out_python = m(ids, pos, cache, meta)
    m._decode_layers = fused
    assert torch.equal(out_fused, out_python)
    assert torch.equal(kv_fused, cache.kv) and not torch.equal(kv0, cache.kv)
    if scale0 is not None:
        assert torch.equal(scale_fused, cache.scale) and not torch.equal(scale0, cache.scale)


@pytest.mark.parametrize("T", [1, 64, 300], ids=["one", "one-block", "uneven"])
def test_causal_attention_matches_sdpa(T):
    """Blocked causal attention (bf16 prompts from CausalSelfAttention.blocked_from tokens) equals fp32
    causal SDPA within bf16's rounding, at lengths that are not a multiple of the block, and every
    query sees exactly its own and earlier keys (a change to a later key moves nothing before it)."""
    from gpt2serve.model.gpt2 import causal_attention

    g = torch.Generator().manual_seed(0)
    H, D = 3, 64
    q, k, v = (torch.randn(T, H, D, generator=g) for _ in range(3))
    kb, vb = k.bfloat16(), v.bfloat16()
    ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kb.float().transpose(0, 1)[None],
                                         vb.float().transpose(0, 1)[None], is_causal=True)[0]
    out = causal_attention(q, kb, vb)
    assert out.dtype == torch.bfloat16 and out.shape == (H, T, D)
    assert (out.float() - ref).abs().max().item() < 2e-2
    assert torch.equal(causal_attention(q.bfloat16(), kb, vb), causal_attention(q.bfloat16().float(), kb, vb))
    if T > 1:
        k2 = kb.clone()
        k2[-1] += 1
        moved = causal_attention(q, k2, vb)
        assert torch.equal(moved[:, :-1], out[:, :-1]) and not torch.equal(moved[:, -1], out[:, -1])


@pytest.mark.parametrize("src,cache", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32", "fp32-into-bf16", "bf16"])
def test_kv_write_is_index_copy(src, cache, ops):
    """kv_write puts each row of K/V (a strided view of the fused qkv output, as the model passes
    it) at its slot, rounded to the cache's dtype exactly as `.to` + index_copy_ do, touches no
    other slot, and refuses a slot outside the cache."""
    g = torch.Generator().manual_seed(5)
    N, H, D, S = 37, 3, 64, 100
    qkv = torch.randn(N, 3 * H * D, generator=g).to(src)
    if src == torch.float32:  # rounding's edge cases: ties (to even, both ways), infinities, overflow, subnormals
        edge = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), float("inf"), -float("inf"), 3.4e38, -3.4e38, 1e-40, -1e-40, 0.0, -0.0])
        qkv[0, H * D : H * D + len(edge)] = edge
        qkv[N - 1, -len(edge):] = edge
    kv = qkv[:, H * D:].view(N, 2, H, D)
    slots = torch.randperm(S, generator=g)[:N]
    got = torch.randn(S, 2, H, D, generator=g).to(cache)
    want = got.clone()
    want.index_copy_(0, slots, kv.to(cache))
    ops.kv_write(got, slots, kv)
    assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="slot out of range"):
        ops.kv_write(got, torch.full((N,), S), kv)


@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kv_write_into_an_int8_cache_is_quantize_kv(src, ops):
    """Into an 8-bit cache kv_write stores each head's K and V as quantize_kv does (the torch path's
    write, the same bits), with its scale, touching no other slot; a zero head gets scale 0."""
    g = torch.Generator().manual_seed(6)
    N, H, D, S = 37, 3, 64, 100
    qkv = (torch.randn(N, 3 * H * D, generator=g) * 3).to(src)
    qkv[4, H * D : 2 * H * D] = 0  # row 4's K: every head zero
    kv = qkv[:, H * D:].view(N, 2, H, D)
    slots = torch.randperm(S, generator=g)[:N]
    cache = torch.randint(-127, 128, (S, 2, H, D), generator=g, dtype=torch.int8)
    scale = torch.rand(S, 2, H, generator=g)
    want_q, want_s = cache.clone(), scale.clone()
    q, s = quantize_kv(kv)
    want_q.index_copy_(0, slots, q)
    want_s.index_copy_(0, slots, s)
    ops.kv_write(cache, slots, kv, scale)
    assert torch.equal(cache, want_q) and torch.equal(scale, want_s)
    assert scale[slots[4], 0].eq(0).all() and cache[slots[4], 0].eq(0).all()
    deq = cache[slots].float() * scale[slots][..., None]
    assert (deq - kv.float()).abs().max() <= kv.float().abs().amax() / 254 * 1.001  # half a step at most
    with pytest.raises(RuntimeError, match="scales with an int8 cache"):
        ops.kv_write(cache, slots, kv)


@pytest.mark.parametrize("qd,kd", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32", "fp32-q-bf16-kv", "bf16"])
@pytest.mark.parametrize("T,L", [(1, 1), (70, 70), (300, 300), (37, 100), (1, 77), (33, 1024)],
                         ids=["one", "uneven", "long", "continuation", "one-after-context", "end-of-context"])
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16-products", "fp32-products"])
def test_prefill_attention_matches_sdpa(qd, kd, T, L, bf16, ops):
    """The kernels' prompt attention: T queries at positions L-T..L-1 (L > T: a continuation chunk
    over its gathered context) equal masked fp32 SDPA, from strided rows as the model passes them
    (q and K/V views of the fused qkv projection), and a key is seen by exactly the queries at or
    after its position: changing the last key moves no earlier query's output by a bit. With
    `bf16`, a bf16 cache's products run in bf16 (queries and probabilities rounded to bf16, so
    bf16's tolerance) on AMX where the CPU has it, else on vdpbf16ps; otherwise all in fp32."""
    bf16_products = bf16 and kd == torch.bfloat16
    g = torch.Generator().manual_seed(T * 1000 + L)
    H, D = 3, 64
    qkv = torch.randn(L, 3, H, D, generator=g)
    q, kv = qkv[L - T:, 0].to(qd), qkv[:, 1:].to(kd)  # strided rows, as in the model
    mask = torch.arange(L)[None, :] <= torch.arange(L - T, L)[:, None]  # (T, L)
    ref = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], kv[:, 0].float().transpose(0, 1)[None],
                                         kv[:, 1].float().transpose(0, 1)[None], attn_mask=mask)[0].transpose(0, 1)
    out = ops.prefill_attention(q, kv, bf16)
    assert out.dtype == qd and out.shape == (T, H, D)
    assert (out.float() - ref).abs().max().item() < (1e-5 if qd == torch.float32 and not bf16_products else 2e-2)
    kv2 = kv.clone()
    kv2[-1] += 1
    moved = ops.prefill_attention(q, kv2, bf16)
    assert torch.equal(moved[:-1], out[:-1]) and not torch.equal(moved[-1], out[-1])
    with pytest.raises(RuntimeError, match="T <= L"):
        ops.prefill_attention(torch.zeros(L + 1, H, D), kv)


@pytest.mark.parametrize("D", [16, 48, 80])
def test_prefill_attention_other_head_sizes(D, ops):
    """Head sizes other than GPT-2's 64 (multiples of 16): the weighted sum's last slice of a head is
    narrower than the kernels' usual register tile (16 values of 48 or 80 on AVX2, 32 of 48 / 16 of 80 on
    AVX-512); fp32 SDPA's result either way, for a whole prompt and a continuation chunk."""
    H = 2
    for T, L in ((65, 65), (20, 90)):
        g = torch.Generator().manual_seed(D * 100 + T)
        qkv = torch.randn(L, 3, H, D, generator=g)
        q, kv = qkv[L - T:, 0], qkv[:, 1:]
        mask = torch.arange(L)[None, :] <= torch.arange(L - T, L)[:, None]
        ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kv[:, 0].transpose(0, 1)[None],
                                             kv[:, 1].transpose(0, 1)[None], attn_mask=mask)[0].transpose(0, 1)
        assert (ops.prefill_attention(q, kv, False) - ref).abs().max().item() < 1e-5


@pytest.mark.skipif(not kernels.supported(), reason="this CPU lacks AVX-512 VNNI/BF16: the kernels are not used here")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_prompt_logits_with_the_attention_kernel_match_sdpa(dtype):
    """A whole model's prompt logits with the kernels' prompt attention against the same model with
    torch's SDPA (the kernels taken off the attention modules)."""
    if dtype != "float32" and not Bf16Conv1D.supported(torch.bfloat16, torch.device("cpu")):
        pytest.skip("no native bf16 here")
    m = _prepared(GPT2Config(n_layer=2, n_head=4, n_embd=256, n_positions=200, vocab_size=500), dtype, seed=5)
    ids = torch.randint(0, 500, (150,), generator=torch.Generator().manual_seed(1))
    with_kernel = forward_logits(m, ids)
    for block in m.transformer.h:
        assert block.attn.paged_ops is not None
        block.attn.paged_ops = None
    sdpa = forward_logits(m, ids)
    assert _rel(with_kernel, sdpa) < (1e-4 if dtype == "float32" else 0.02)


@pytest.mark.skipif(not Bf16Conv1D.supported(torch.bfloat16, torch.device("cpu")), reason="no native bf16 here")
def test_long_bf16_prompt_blocked_attention_agrees_with_sdpa(monkeypatch):
    """Without the kernels (their prompt attention comes first), a bf16 prompt past blocked_from goes
    through causal_attention; its logits match the SDPA path's."""
    from gpt2serve.model.gpt2 import CausalSelfAttention

    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=320)
    m = GPT2LMHeadModel(cfg).init_random(seed=2).to(torch.bfloat16).prepare_for_serving(kernels="torch")
    ids = torch.randint(0, cfg.vocab_size, (300,), generator=torch.Generator().manual_seed(0))
    blocked = forward_logits(m, ids)
    monkeypatch.setattr(CausalSelfAttention, "blocked_from", 10**9)
    sdpa = forward_logits(m, ids)
    assert _rel(blocked, sdpa) < 0.02
    assert not torch.equal(blocked, sdpa)  # the two paths did run: different roundings


@pytest.mark.skipif(not kernels.supported(), reason="this CPU lacks AVX-512 VNNI/BF16: the kernels are not used here")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_refresh_gemv_weights_moves_the_copies_and_changes_nothing(dtype):
    """refresh_gemv_weights gives every kernel-read tensor new storage with the same values (fp32's
    head keeps reading wte itself), and the model computes the same logits after it."""
    if dtype != "float32" and not Bf16Conv1D.supported(torch.bfloat16, torch.device("cpu")):
        pytest.skip("no native bf16 here: the bf16 and int8 kernels are not used")
    m = _prepared(GPT2Config(n_layer=2, n_head=2, n_embd=128, n_positions=64, vocab_size=320), dtype, seed=4)
    ids = torch.randint(0, 320, (9,), generator=torch.Generator().manual_seed(0))
    before = forward_logits(m, ids)
    mods = [mod for mod in m.modules() if getattr(mod, "gemv", None) is not None]
    assert mods and all(mod.gemv_tensors for mod in mods)
    old = {(id(mod), n): (getattr(mod, n).data_ptr(), getattr(mod, n).clone()) for mod in mods for n in mod.gemv_tensors
           if getattr(mod, n) is not None}
    m.refresh_gemv_weights()
    for mod in mods:
        for n in mod.gemv_tensors:
            if getattr(mod, n) is None:
                continue
            ptr, val = old[(id(mod), n)]
            assert getattr(mod, n).data_ptr() != ptr and torch.equal(getattr(mod, n), val)
    if dtype == "float32":
        assert m._lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    c_attn = m.transformer.h[0].attn.c_attn
    assert m._decode_layers is not None  # rebuilt on the new copies
    assert m._decode_layers.params[4].data_ptr() == getattr(c_attn, c_attn.gemv_tensors[0]).data_ptr()
    assert torch.equal(forward_logits(m, ids), before)


def test_kv_cache_asks_for_huge_pages():
    """A KV cache of several MiB is advised onto 2 MiB pages where Linux offers transparent huge
    pages (advise_huge_pages: decode attention's TLB misses), comes out zeroed either way, and a
    tensor too small to hold an aligned 2 MiB page is left alone."""
    import sys
    from pathlib import Path

    from gpt2serve.model.gpt2 import advise_huge_pages

    thp = sys.platform.startswith("linux") and Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()
    assert advise_huge_pages(torch.empty(8 << 20, dtype=torch.uint8)) == thp
    assert advise_huge_pages(torch.empty(1000)) is False
    cache = KVCache(GPT2Config(n_layer=2, n_embd=64, n_head=4), 512, 16, torch.float32, torch.device("cpu"))
    assert cache.kv.numel() * 4 > 4 << 20 and not cache.kv.any()


@pytest.mark.skipif(not kernels.supported_avx2(), reason="this CPU lacks AVX2: no kernels are used here")
@pytest.mark.parametrize("batch", [1, 9])
def test_int8_keeps_a_bf16_cache_where_the_kernels_read_it(batch):
    """int8's KV cache is bf16 wherever the kernels' attention reads the cache, native bf16 or not
    (the AVX2 build widens it in registers: half the bytes a decode step streams); a prompt and a
    decode step over it give next-token logits within bf16's rounding of the same steps over an
    fp32 cache, one sequence (a query per head) and nine (a sequence per task)."""
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=128, n_positions=64, vocab_size=300)
    m = _prepared(cfg, "int8", seed=3)
    assert m.transformer.h[0].attn.paged_ops is not None and m.kv_dtype == torch.bfloat16
    g = torch.Generator().manual_seed(batch)
    T = 20
    prompts = torch.randint(0, 300, (batch, T), generator=g)
    logits = {}
    for dtype in (torch.bfloat16, torch.float32):
        cache = KVCache(cfg, batch * 2, 16, dtype, torch.device("cpu"))
        for b in range(batch):  # each prompt into its own two blocks
            slots = torch.arange(T) + 32 * b
            m(prompts[b], torch.arange(T), cache, AttentionMetadata(0, slots, None, None, [(0, T, None, None)]))
        gather = torch.arange(T + 1)[None, :] + 32 * torch.arange(batch)[:, None]  # (B, T + 1)
        meta = AttentionMetadata(num_decode=batch, slot_mapping=gather[:, T].contiguous(), decode_gather=gather,
                                 decode_mask=None, prefills=[], decode_lens=torch.full((batch,), T + 1))
        ids = torch.randint(0, 300, (batch,), generator=torch.Generator().manual_seed(7))
        logits[dtype] = m.logits(m(ids, torch.full((batch,), T), cache, meta))
    assert not torch.equal(logits[torch.bfloat16], logits[torch.float32])
    assert _rel(logits[torch.bfloat16], logits[torch.float32]) < 0.02
