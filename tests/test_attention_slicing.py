"""Attention slicing (`set_attention_slice`) against diffusers' `UNet2DConditionModel.set_attention_slice`.

Tiny random diffusers UNets (minidiff.reference) are saved with `save_pretrained` and loaded
through minidiff's production loader. Both libraries get the same slice setting and the same
inputs; the outputs must agree, and minidiff's sliced output must agree with its unsliced one for
the "math" and "sdpa" backends. Then: bad sizes are refused, and a structural check that slicing
really cuts the attention calls (hence the "math" backend's score matrices) to slice_size rows.
"""

import pytest
import torch

import minidiff.models.attention as attention_module
from minidiff.models.attention import Attention, attention_backend, set_attention_slice
from minidiff.models.unet import UNet2DConditionModel
from minidiff.reference import TEXT_HIDDEN, tiny_unet, tiny_vae

diffusers = pytest.importorskip("diffusers")

# fp32 against fp32 with identical weights (outputs of magnitude ~1). Slicing changes no
# arithmetic within a (sample, head) row, but diffusers' sliced processor forms the scores with
# baddbmm and minidiff's "math" backend with a matmul of another batch shape, so summation orders
# (a few ulps per attention layer) differ. Measured, max |diff| / max |ref|: minidiff sliced vs
# diffusers sliced <= 1.2e-6; minidiff sliced vs unsliced <= 1.4e-6 with "math", 0 with "sdpa".
# 1e-5 (as in test_unet.py) leaves room for other CPUs and still fails on a wrong head order or a
# dropped or doubled slice.
RTOL = ATOL = 1e-5

BATCH = 2  # a classifier-free-guidance batch: B*heads rows, so slices can straddle two samples
SIZES = ["auto", "max", 1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"sd1": (diffusers model, folder), "sd2": ...}. sd1: 4 heads in every layer; sd2: 2, 4, 4
    heads per level, so "auto" gives different sizes to different layers."""
    out = {}
    for flavour in ("sd1", "sd2"):
        ref = tiny_unet(flavour)
        folder = tmp_path_factory.mktemp(flavour)
        ref.save_pretrained(folder)
        out[flavour] = (ref, folder)
    return out


def inputs(seed: int = 1, size: int = 16, tokens: int = 7):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(BATCH, 4, size, size, generator=g)
    context = torch.randn(BATCH, tokens, TEXT_HIDDEN, generator=g)
    return x_t, torch.tensor([10, 900]), context


def run(unet, x_t, t, context):
    out = unet(x_t, t, context)
    return out.sample if hasattr(out, "sample") else out


def sizes_of(model) -> dict:
    """{layer name: slice_size} of minidiff's Attention modules."""
    return {name: m.slice_size for name, m in model.named_modules() if isinstance(m, Attention)}


def diffusers_sizes(ref) -> dict:
    """The same for diffusers: {layer name: the SlicedAttnProcessor's slice_size, or None}."""
    return {name.removesuffix(".processor"): getattr(proc, "slice_size", None)
            for name, proc in ref.attn_processors.items()}


# ----------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_matches_diffusers_sliced(checkpoints, flavour):
    ref, folder = checkpoints[flavour]
    unet = UNet2DConditionModel.from_pretrained(folder)
    keys = set(unet.state_dict())
    x_t, t, context = inputs()
    sizes = SIZES + ([3] if flavour == "sd1" else [])  # 3 of 4 heads: slices cross sample borders
    try:
        with torch.no_grad():
            for size in sizes:
                ref.set_attention_slice(size)
                set_attention_slice(unet, size)
                # the same size per layer as diffusers ("auto" is per layer: sd2 gets 1, 2, 2)
                assert sizes_of(unet) == diffusers_sizes(ref), size
                want = run(ref, x_t, t, context)
                with attention_backend("math"):
                    got = run(unet, x_t, t, context)
                torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{flavour} {size!r}: {m}")
    finally:
        ref.set_attention_slice(None)
    assert set(unet.state_dict()) == keys  # slice_size is no parameter or buffer


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_sliced_equals_unsliced(checkpoints, flavour, backend):
    _, folder = checkpoints[flavour]
    unet = UNet2DConditionModel.from_pretrained(folder)
    x_t, t, context = inputs(seed=2)
    with torch.no_grad(), attention_backend(backend):
        want = run(unet, x_t, t, context)
        for size in SIZES + [2]:
            set_attention_slice(unet, size)
            got = run(unet, x_t, t, context)
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{backend} {size!r}: {m}")
        set_attention_slice(unet, None)
        assert set(sizes_of(unet).values()) == {None}
        assert torch.equal(run(unet, x_t, t, context), want)  # off again: the plain path, bit for bit


def test_vae_one_head_attention_sliced(tmp_path):
    """The VAE's SpatialSelfAttention subclasses Attention (one head over all pixels): "auto"
    gives it 1, and a batch of two then runs as two slices with the same result."""
    from minidiff.models.vae import AutoencoderKL

    tiny_vae().save_pretrained(tmp_path)
    vae = AutoencoderKL.from_pretrained(tmp_path)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), attention_backend("math"):
        out = vae.decode(z)
        want = out.sample if hasattr(out, "sample") else out
        set_attention_slice(vae, "auto")
        assert set(sizes_of(vae).values()) == {1}
        out = vae.decode(z)
        got = out.sample if hasattr(out, "sample") else out
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_masks_sliced_like_the_rows():
    """Masks with a batch and/or head axis are cut with the rows; a 2-D mask is shared."""
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, head_dim=8, context_dim=16).eval()
    x, c = torch.randn(3, 10, 32), torch.randn(3, 7, 16)
    for shape in [(10, 7), (3, 1, 1, 7), (1, 4, 10, 7), (3, 4, 10, 7), (4, 10, 7)]:
        keep = torch.rand(shape) > 0.3
        keep[..., 0] = True  # no fully masked row (its softmax would be NaN on both paths)
        for mask in (keep, torch.randn(shape)):  # boolean and additive
            for backend in ("math", "sdpa"):
                with torch.no_grad(), attention_backend(backend):
                    attn.slice_size = None
                    want = attn(x, c, mask=mask)
                    attn.slice_size = 5  # 12 rows: slices of 5, 5, 2, across samples
                    got = attn(x, c, mask=mask)
                torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{shape} {backend}: {m}")


# ----------------------------------------------------------------------------------------------
# Bad values


@pytest.mark.parametrize("bad", [0, -1, 5, "half", "", 2.0, True, [1, 2]])
def test_bad_slice_size_raises(checkpoints, bad):
    _, folder = checkpoints["sd1"]  # 4 heads in every layer
    unet = UNet2DConditionModel.from_pretrained(folder)
    set_attention_slice(unet, 2)
    with pytest.raises(ValueError, match="slice_size"):
        set_attention_slice(unet, bad)
    assert set(sizes_of(unet).values()) == {2}  # checked before anything is changed


def test_size_above_smallest_head_count_raises_like_diffusers(checkpoints):
    """sd2 has a 2-head level: 3 is refused by both libraries, 2 accepted by both."""
    ref, folder = checkpoints["sd2"]
    unet = UNet2DConditionModel.from_pretrained(folder)
    try:
        with pytest.raises(ValueError):
            ref.set_attention_slice(3)
        with pytest.raises(ValueError, match="larger than the 2 heads"):
            set_attention_slice(unet, 3)
        ref.set_attention_slice(2)
        set_attention_slice(unet, 2)
        assert sizes_of(unet) == diffusers_sizes(ref)
    finally:
        ref.set_attention_slice(None)


def test_attribute_set_by_hand_must_be_positive():
    attn = Attention(16, num_heads=2, head_dim=8).eval()
    attn.slice_size = 0
    with pytest.raises(ValueError, match="positive"):
        attn(torch.randn(2, 5, 16))


# ----------------------------------------------------------------------------------------------
# Memory, structurally: the calls the backend sees, not a timed or measured benchmark


def record_calls(monkeypatch) -> list:
    """Wrap the dispatcher that Attention.forward calls; returns the list of (q shape, k shape)."""
    calls = []
    dispatch = attention_module.attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape)))
        return dispatch(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention_module, "attention", spy)
    return calls


@pytest.mark.parametrize("size", ["max", 1, 2, "auto"])
def test_slicing_cuts_every_attention_call(checkpoints, monkeypatch, size):
    _, folder = checkpoints["sd1"]  # 4 heads in every layer: B*H = 8 rows per layer
    unet = UNet2DConditionModel.from_pretrained(folder)
    layers = [m for m in unet.modules() if isinstance(m, Attention)]
    x_t, t, context = inputs()
    calls = record_calls(monkeypatch)
    with torch.no_grad(), attention_backend("math"):
        run(unet, x_t, t, context)
        plain, calls[:] = list(calls), []
        set_attention_slice(unet, size)
        run(unet, x_t, t, context)
    step = {"max": 1, "auto": 2}.get(size, size)
    rows = BATCH * 4
    assert len(plain) == len(layers) and {q[0] * q[1] for q, _ in plain} == {rows}
    # every layer's rows in rows/step calls, none of them larger than step rows
    assert len(calls) == len(layers) * (rows // step)
    assert max(q[0] * q[1] for q, _ in calls) == step
    # the "math" backend's score matrix per call, rows x Nq x Nk, shrinks by step / (B*H)
    scores = lambda cs: max(q[0] * q[1] * q[2] * k[2] for q, k in cs)  # noqa: E731
    assert scores(calls) * rows == scores(plain) * step
