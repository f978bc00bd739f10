"""minidiff's Triton flash-attention kernel against the plain-PyTorch reference.

Without a GPU the kernels run in Triton's interpreter (numpy, on the CPU). `@triton.jit` and
Triton's own library functions choose interpreter or compiler when *triton* is first imported,
from the TRITON_INTERPRET environment variable, so it must be set before anything imports
triton. Run alone, this file sets it at the top. In a full test run other test modules (through
transformers and diffusers) have imported triton already, uninterpreted; then every test here is
skipped in this process and `test_in_fresh_process` runs this file in a fresh Python process with
TRITON_INTERPRET=1 instead (the variable is not set for the rest of the shared process). On a
CUDA machine the same tests run the compiled kernels on the GPU, bf16 included.

What is checked: forward and dq, dk, dv against `attention_ref` computed in float64 on
the same (rounded) inputs, for sequence lengths 1, 63, 77, 100, head dims 8..256, Nq != Nk,
causal, boolean / additive / CLIP-style / 2-D (Nq, Nk) masks, strided inputs, small and uneven block sizes; a
tiny UNet and a tiny CLIP text encoder with backend "triton" against "math"; the dispatcher's
rules; the ValueErrors for bad input, raised before any launch.
"""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
RESPAWN = not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1" and "triton" in sys.modules
if not ON_GPU and not RESPAWN:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

import minidiff.kernels.flash_attention as fa  # noqa: E402
from helpers import max_rel_err  # noqa: E402
from minidiff.models.attention import _resolve, attention, attention_backend, attention_ref  # noqa: E402

# Tolerances: max |error| / max |truth| against float64 on the same inputs.
# fp32: tiles summed in another order than one big matmul, exp2 instead of exp; a few ulps
#   (2^-24 = 6e-8) per term over <= 256-term dot products. Measured <= 1e-6.
FP32_RTOL = 1e-5
# fp16: the inputs are exact (the truth is computed from the same fp16 values) and every sum is
#   accumulated in fp32, so the error is the rounding of values the kernel stores or feeds to the
#   tensor cores in fp16: the output itself (2^-11 = 4.9e-4 relative), P before P @ V and dS
#   before dS @ K / dS^T @ Q (each 2^-11 relative per term, averaging out over the sum), and
#   dq / dk / dv rounded on the way out. Measured <= 4e-4 (forward) and <= 6.3e-4 (gradients).
FP16_RTOL = 2e-3
BF16_RTOL = 1.6e-2  # GPU only: 8-bit mantissa, 2^-8 = 3.9e-3, the same reasoning x 8
RTOL = {torch.float32: FP32_RTOL, torch.float16: FP16_RTOL, torch.bfloat16: BF16_RTOL}

in_fresh_process_if_needed = pytest.mark.skipif(
    RESPAWN, reason="triton was imported before TRITON_INTERPRET=1 was set: run by test_in_fresh_process")


def test_in_fresh_process():
    """The whole file in a new Python process that sets TRITON_INTERPRET=1 before importing triton."""
    if not RESPAWN:
        pytest.skip("the tests run in this process")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider"]
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"tests/test_flash_attention.py failed in a fresh process:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"


# ----------------------------------------------------------------------------------------------
# Helpers


def make_mask(kind, B, H, n_q, n_k, g):
    """None, or a mask of the given kind; every query keeps at least one key (so the float64
    reference has no NaN rows)."""
    if kind is None:
        return None
    lengths = torch.randint(max(1, n_k // 2), n_k + 1, (B,), generator=g)
    lengths[0] = max(1, n_k - 3)  # at least one row really padded, whatever the generator says
    keep = torch.arange(n_k)[None, :] < lengths[:, None]  # (B, Nk): right padding, as the tokenizer's
    if kind == "2d":  # (Nq, Nk), shared by every sample and head: how broadcasting reads 2-D
        shared = torch.rand(n_q, n_k, generator=g) > 0.3
        shared[:, 0] = True
        return shared
    if kind == "padding":
        return keep[:, None, None, :]  # (B, 1, 1, Nk), as the UNet / prior pass
    if kind == "additive":  # 0 keeps, -inf drops, plus a finite per-(head, query, key) bias
        bias = torch.randn(B, H, n_q, n_k, generator=g)
        return bias.masked_fill(~keep[:, None, None, :], float("-inf"))
    if kind == "clip":  # (B, 1, Nq, Nk) as CLIPTextTransformer builds it (needs Nq == Nk)
        sees_nothing = keep.cumsum(-1) == 0
        return keep[:, None, None, :] | sees_nothing[:, None, :, None]
    raise ValueError(kind)


def run_case(B, H, n_q, n_k, d, dtype, causal, mask_kind, seed=0, layout=None):
    """Forward and backward of the kernel and of the float64 reference; returns the 4 errors."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, d, generator=g) for n in (n_q, n_k, n_k))
    do = torch.randn(B, H, n_q, d, generator=g)
    mask = make_mask(mask_kind, B, H, n_q, n_k, g)
    q, k, v, do = (t.to(DEVICE, dtype) for t in (q, k, v, do))
    mask = None if mask is None else mask.to(DEVICE)
    if layout is not None:
        q, k, v, do = layout(q, k, v, do)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = fa.flash_attention(q, k, v, mask=mask, causal=causal)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)

    # Truth in float64 from the very same (rounded) inputs. With causal and Nq > Nk the first
    # Nq - Nk queries see no key: the kernel gives 0 there (and no gradient), the reference NaN.
    # Those rows are cut off; the cut keeps the bottom-right alignment of the others.
    first = max(0, n_q - n_k) if causal else 0
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask_rows = mask if mask is None or mask.shape[-2] == 1 else mask[..., first:, :]
    ref = attention_ref(q64[:, :, first:], k64, v64, mask=mask_rows, causal=causal)
    dq64, dk64, dv64 = torch.autograd.grad(ref, (q64, k64, v64), do.double()[:, :, first:])
    assert out.shape == (B, H, n_q, d) and out.dtype == dtype
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in (dq, dk, dv))
    if first:
        assert out[:, :, :first].abs().max() == 0 and dq[:, :, :first].abs().max() == 0
    errs = [max_rel_err(out[:, :, first:], ref), max_rel_err(dq, dq64), max_rel_err(dk, dk64), max_rel_err(dv, dv64)]
    if n_k == 1:
        # One key: softmax = 1 whatever the scores, so the true dq and dk are 0 (float64 gives
        # ~1e-17) and a relative error means nothing; measure them at the scale of dv instead.
        scale = dv64.abs().max().item()
        errs[1:3] = [dq.abs().max().item() / scale, dk.abs().max().item() / scale]
    return errs


def check(errs, dtype, what):
    names = ("out", "dq", "dk", "dv")
    bad = {n: f"{e:.2e}" for n, e in zip(names, errs) if not e <= RTOL[dtype]}
    assert not bad, f"{what}: max relative error above {RTOL[dtype]:.0e}: {bad}"


# ----------------------------------------------------------------------------------------------
# Forward and gradients against the reference

F32, F16 = torch.float32, torch.float16
CASES = [
    # (B, H, Nq, Nk, d, dtype, causal, mask)
    (1, 2, 1, 77, 40, F32, False, None),  # one query against 77 text tokens (cross-attention)
    (2, 2, 77, 1, 64, F32, False, None),  # a single key: softmax = 1, dq = 0
    (1, 1, 63, 63, 8, F32, True, None),  # the smallest head dim, padded to 16
    (2, 1, 77, 77, 64, F16, True, "clip"),  # CLIP's causal text encoder with padding
    (1, 2, 100, 77, 80, F32, False, "padding"),  # UNet cross-attention with a key padding mask
    (1, 2, 64, 64, 80, F16, False, "2d"),
    (1, 1, 100, 100, 160, F16, False, None),  # SD 1.5's widest head, padded to 256
    (1, 1, 63, 100, 40, F16, True, "additive"),  # causal with Nq < Nk: the diagonal shifts right
    (1, 1, 100, 63, 160, F32, True, None),  # causal with Nq > Nk: the first 37 rows see nothing
    (1, 1, 33, 40, 256, F32, False, None),  # the largest head dim the kernel takes
]
# Plus random draws over the shapes the brief asks for (seeded, so a failure reproduces).
_rng = random.Random(0)
for _ in range(6):
    _nq, _nk = _rng.choice([1, 63, 77, 100]), _rng.choice([1, 63, 77, 100])
    _causal = _rng.random() < 0.5
    CASES.append((_rng.choice([1, 2]), _rng.choice([1, 2]), _nq, _nk, _rng.choice([8, 40, 64, 80, 160]),
                  _rng.choice([F32, F16]), _causal, _rng.choice([None, "padding", "additive"])))


def _case_id(c):
    B, H, n_q, n_k, d, dtype, causal, mask = c
    return f"B{B}H{H}-q{n_q}k{n_k}-d{d}-{str(dtype)[6:]}{'-causal' if causal else ''}{'-' + mask if mask else ''}"


@in_fresh_process_if_needed
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_reference(case):
    B, H, n_q, n_k, d, dtype, causal, mask_kind = case
    check(run_case(B, H, n_q, n_k, d, dtype, causal, mask_kind), dtype, _case_id(case))


@in_fresh_process_if_needed
def test_masks_and_causal_change_the_result():
    """The cases above could not catch a dropped mask if the masks did nothing: they do."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 77, 40, generator=g).to(DEVICE) for _ in range(3))
    plain = fa.flash_attention(q, k, v)
    assert max_rel_err(fa.flash_attention(q, k, v, causal=True), plain) > 0.1
    for kind in ("padding", "2d", "additive", "clip"):
        mask = make_mask(kind, 2, 2, 77, 77, g).to(DEVICE)
        assert max_rel_err(fa.flash_attention(q, k, v, mask=mask), plain) > 0.1, kind


@in_fresh_process_if_needed
@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (32, 16)], ids=lambda b: f"M{b[0]}N{b[1]}")
def test_block_sizes(monkeypatch, blocks):
    """Other tile shapes (BLOCK_M != BLOCK_N moves where the causal loops start and stop)."""
    monkeypatch.setattr(fa, "_config", lambda table, block_d, q: (*blocks, 4, 1))
    for case in [(1, 2, 77, 77, 40, F32, True, "clip"), (2, 1, 100, 63, 80, F16, True, None),
                 (1, 1, 63, 100, 64, F32, True, "padding")]:
        check(run_case(*case), case[5], f"{_case_id(case)} blocks {blocks}")


# Non-contiguous layouts, as the projections produce them: no copy is made by the wrapper.
LAYOUTS = {
    # (B, N, H, d) from a Linear, seen as (B, H, N, d): what Attention.forward passes
    "heads_interleaved": lambda *ts: tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in ts),
    # d not the fastest dimension (stride_d != 1)
    "head_dim_strided": lambda *ts: tuple(t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in ts),
    # k and v as two halves of one fused (B, N, H, 2d) projection, q and dO padded on the last dim
    "fused_kv": lambda q, k, v, do: (
        torch.cat([q, q], -1)[..., : q.shape[-1]],
        *torch.cat([k, v], -1).transpose(1, 2).contiguous().transpose(1, 2).split(k.shape[-1], -1),
        torch.cat([do, do], -1)[..., : do.shape[-1]],
    ),
}


@in_fresh_process_if_needed
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_strided_inputs(layout):
    for case in [(2, 2, 63, 77, 40, F32, False, "padding"), (1, 2, 77, 77, 80, F16, True, None)]:
        check(run_case(*case, layout=LAYOUTS[layout]), case[5], f"{_case_id(case)} {layout}")


@in_fresh_process_if_needed
def test_queries_with_no_visible_key_give_zero():
    """A batch element whose keys are all masked: 0 out and 0 gradient, never NaN."""
    q, k, v = (torch.randn(2, 1, 20, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    keep = torch.ones(2, 1, 1, 20, dtype=torch.bool, device=DEVICE)  # (B, 1, 1, Nk) key padding
    keep[1] = False
    out = fa.flash_attention(q, k, v, mask=keep)
    out.sum().backward()
    assert out[1].abs().max() == 0 and q.grad[1].abs().max() == 0 and k.grad[1].abs().max() == 0
    assert max_rel_err(out[0], attention_ref(q[:1], k[:1], v[:1])[0]) < FP32_RTOL


@pytest.mark.skipif(not ON_GPU, reason="Triton's interpreter has no bfloat16 arithmetic")
def test_bf16_on_gpu():
    for case in [(2, 8, 256, 77, 40, torch.bfloat16, False, None), (1, 2, 77, 77, 64, torch.bfloat16, True, "clip")]:
        check(run_case(*case), torch.bfloat16, _case_id(case))


# ----------------------------------------------------------------------------------------------
# Whole models: backend "triton" against "math"

# Through a whole network the per-attention errors (<= 1e-6 measured above) pass through norms
# and residual adds, which do not amplify them much: 1e-5 for the outputs, 1e-4 for the weight
# gradients (sums over every token of products of two slightly-off factors).
MODEL_RTOL, MODEL_GRAD_RTOL = 1e-5, 1e-4


@in_fresh_process_if_needed
@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_unet_triton_matches_math(tmp_path, flavour):
    pytest.importorskip("diffusers")
    from minidiff.models.unet import UNet2DConditionModel
    from minidiff.reference import TEXT_HIDDEN, tiny_unet

    tiny_unet(flavour, sample_size=8).save_pretrained(tmp_path)
    unet = UNet2DConditionModel.from_pretrained(tmp_path).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 4, 8, 8, generator=g).to(DEVICE)  # 64 image tokens per attention
    context = torch.randn(1, 77, TEXT_HIDDEN, generator=g).to(DEVICE)  # 77 text tokens as keys
    t = torch.tensor([500], device=DEVICE)
    results = {}
    for backend in ("math", "triton"):
        unet.zero_grad()
        with attention_backend(backend):
            eps = unet(x_t, t, context).sample
        eps.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in unet.named_parameters() if ".attn" in n and "to_" in n}
        results[backend] = eps.detach(), grads
    assert max_rel_err(results["triton"][0], results["math"][0]) <= MODEL_RTOL
    assert len(results["math"][1]) > 0
    for name, grad in results["math"][1].items():
        assert max_rel_err(results["triton"][1][name], grad) <= MODEL_GRAD_RTOL, name


@in_fresh_process_if_needed
def test_clip_text_triton_matches_math(tmp_path):
    pytest.importorskip("transformers")
    from minidiff.models.clip import CLIPTextModel
    from minidiff.reference import tiny_text_encoder

    tiny_text_encoder("sd1").save_pretrained(tmp_path)
    model = CLIPTextModel.from_pretrained(tmp_path).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 990, (2, 77), generator=g)
    ids[0, 19], ids[1, 76] = 49407, 49407  # EOS ends each prompt: the pooled state is read there
    padding = (torch.arange(77)[None, :] < torch.tensor([[20], [77]])).long()  # row 0: 20 tokens then padding
    left_padding = padding.flip(-1)  # leading pads: the "sees nothing" rule of clip.py
    for attention_mask in (None, padding, left_padding):
        outs = {}
        for backend in ("math", "triton"):
            with torch.no_grad(), attention_backend(backend):
                outs[backend] = model(ids.to(DEVICE), attention_mask=None if attention_mask is None else attention_mask.to(DEVICE))
        for key in ("last_hidden_state", "pooler_output"):
            assert torch.isfinite(outs["triton"][key]).all()
            assert max_rel_err(outs["triton"][key], outs["math"][key]) <= MODEL_RTOL, (key, attention_mask is not None)


# ----------------------------------------------------------------------------------------------
# The dispatcher


class _PretendCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: lets the "auto" rule be checked without a GPU."""

    @property
    def is_cuda(self):
        return True


@in_fresh_process_if_needed
def test_auto_sends_wide_heads_to_sdpa():
    for d, expected in [(40, "triton"), (160, "triton"), (256, "triton"), (512, "sdpa")]:
        q = torch.randn(1, 1, 4, d).as_subclass(_PretendCuda)
        assert _resolve("auto", q, q, q) == expected, d
    q = torch.randn(1, 1, 4, 64).as_subclass(_PretendCuda)
    assert _resolve("auto", q, q, q, torch.ones(4, 4, dtype=torch.bool)) == "triton"  # read as (1, 1, Nq, Nk)
    assert _resolve("auto", q, q, q, torch.ones(4, 4, dtype=torch.long)) == "sdpa"  # an integer mask
    assert _resolve("auto", q, q, q, torch.ones(1, 1, 4, 5, dtype=torch.bool)) == "sdpa"  # does not fit
    cpu = torch.randn(1, 1, 4, 64)
    assert _resolve("auto", cpu, cpu, cpu) == "sdpa"  # never the interpreter by default


@in_fresh_process_if_needed
def test_vae_attention_block():
    """The VAE's single wide head: the kernel refuses 512 under an explicit "triton" request
    (a clear error), "auto" takes SDPA for it, and a narrow one runs on the kernel."""
    from minidiff.models.vae import SpatialSelfAttention

    wide = SpatialSelfAttention(512, 32).to(DEVICE)
    x = torch.randn(1, 512, 4, 4, device=DEVICE)
    with attention_backend("triton"), pytest.raises(ValueError, match="256"):
        wide(x)
    narrow = SpatialSelfAttention(64, 8).to(DEVICE)
    x = torch.randn(1, 64, 6, 6, device=DEVICE)
    with torch.no_grad():
        with attention_backend("triton"):
            ours = narrow(x)
        with attention_backend("math"):
            ref = narrow(x)
    assert max_rel_err(ours, ref) <= MODEL_RTOL


@in_fresh_process_if_needed
def test_short_masks_read_like_broadcasting():
    """A 2-D mask means (Nq, Nk) and a 3-D one (H, Nq, Nk), for the kernel as for every backend."""
    q, k, v = (torch.randn(2, 2, 10, 16, device=DEVICE) for _ in range(3))
    mask = torch.rand(10, 10, device=DEVICE) > 0.3
    mask[:, 0] = True
    ours = attention(q, k, v, mask=mask, backend="triton")
    assert max_rel_err(ours, attention(q, k, v, mask=mask, backend="math")) <= FP32_RTOL
    assert max_rel_err(fa.flash_attention(q, k, v, mask=mask), attention_ref(q, k, v, mask=mask)) <= FP32_RTOL
    per_head = torch.randn(2, 10, 10, device=DEVICE)  # additive, one bias per (head, query, key)
    assert max_rel_err(fa.flash_attention(q, k, v, mask=per_head), attention_ref(q, k, v, mask=per_head)) <= FP32_RTOL


# ----------------------------------------------------------------------------------------------
# Bad input: a clear ValueError before anything is launched


def _bad_inputs():
    t = lambda *shape, dtype=torch.float32: torch.randn(*shape).to(DEVICE, dtype)  # noqa: E731
    q, k = t(1, 2, 8, 40), t(1, 2, 6, 40)
    return [
        ("head dim", dict(q=q, k=t(1, 2, 6, 32), v=t(1, 2, 6, 32))),
        ("head dim", dict(q=q, k=k, v=t(1, 2, 6, 64))),
        ("limit of 256", dict(q=t(1, 1, 8, 512), k=t(1, 1, 8, 512), v=t(1, 1, 8, 512))),
        ("4-D", dict(q=t(2, 8, 40), k=k, v=k)),
        ("4-D", dict(q=q, k=t(2, 6, 40), v=k)),
        ("dtype", dict(q=q.double(), k=k.double(), v=k.double())),
        ("share one dtype", dict(q=q, k=k.half(), v=k.half())),
        ("same number of tokens", dict(q=q, k=k, v=t(1, 2, 7, 40))),
        ("batch and heads", dict(q=q, k=t(1, 3, 6, 40), v=t(1, 3, 6, 40))),
        ("does not fit", dict(q=q, k=k, v=k, mask=torch.ones(1, 1, 8, 7, dtype=torch.bool, device=DEVICE))),
        ("does not fit", dict(q=q, k=k, v=k, mask=torch.ones(3, 8, 6, dtype=torch.bool, device=DEVICE))),
        ("does not fit", dict(q=q, k=k, v=k, mask=torch.ones(1, 1, 1, 1, 6, dtype=torch.bool, device=DEVICE))),
        # (B, Nk) key padding is not a 2-D mask: 2-D means (queries, keys), as in broadcasting
        (r"2-D mask is \(queries, keys\)", dict(q=q, k=k, v=k, mask=torch.ones(1, 8, dtype=torch.bool, device=DEVICE))),
        ("boolean", dict(q=q, k=k, v=k, mask=torch.ones(1, 6, dtype=torch.long, device=DEVICE))),
        ("gradient for the mask", dict(q=q, k=k, v=k, mask=torch.zeros(1, 1, 1, 6, device=DEVICE, requires_grad=True))),
        ("scale", dict(q=q, k=k, v=k, scale="0.1")),
    ]


@in_fresh_process_if_needed
@pytest.mark.parametrize("message, kwargs", _bad_inputs(), ids=[f"{i}-{m}" for i, (m, _) in enumerate(_bad_inputs())])
def test_bad_input_raises_before_launch(monkeypatch, message, kwargs):
    def no_launch(*args, **kw):
        raise AssertionError("a kernel was launched before the input was checked")

    monkeypatch.setattr(fa, "_forward", no_launch)
    with pytest.raises(ValueError, match=message):
        fa.flash_attention(**kwargs)


@in_fresh_process_if_needed
def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(fa, "INTERPRETED", False)
    x = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        fa.flash_attention(x, x, x)


@pytest.mark.skipif(ON_GPU or RESPAWN, reason="only the interpreter lacks bfloat16")
def test_bf16_in_the_interpreter_is_refused():
    x = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        fa.flash_attention(x, x, x)
