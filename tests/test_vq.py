"""Parity of minidiff's VQModel (MoVQ / VQ-GAN) with diffusers' VQModel.

Each case builds a tiny random diffusers VQModel, saves it with diffusers' own `save_pretrained`
(the official layout), loads it through minidiff's production loader (strict) and compares, in
fp32, on a batch of 2 images:

    encode(x).latents                         vs diffusers fp32       max rel err <= 1e-5
    quantize(z): z_q, the loss                vs diffusers fp32       <= 1e-5 (measured 0: the same ops)
                 the indices                  vs diffusers, and vs a brute-force argmin: exactly equal
    decode(z, force_not_quantize=True)        vs diffusers fp32       <= 1e-5
    decode(z) (quantised), forward(x)         vs diffusers float64    <= 1e-5
                                              vs diffusers fp32       <= 1e-4 (see below)
    decode(indices, force_not_quantize=True, shape) with lookup_from_codebook
                                              vs diffusers fp32       <= 1e-4 (the same reason)
    encoder gradient of the reconstruction    vs diffusers float64    <= 1e-5
                                              vs diffusers fp32       <= 1e-4 (the same reason)
    codebook / encoder gradient of the VQ loss vs diffusers fp32      <= 1e-5

Cases: "movq" (minidiff.reference.tiny_movq: spatial norms, attention at the lowest level of
encoder and decoder, a non-square 32x48 input), "group-3-level" (norm_type "group", no attention
blocks, vq_embed_dim 3 != latent_channels 4, 24x40) and "group-attn" (norm_type "group" with both
attention block types and no mid-block attention).

Why these tolerances. fp32 on both sides runs the same operations on the same weights, so only
summation orders differ: measured encode <= 6.7e-7, decode (not quantised) <= 4.6e-6; 1e-5 (the
project's fp32 standard) leaves room for other CPUs and still fails on any wrong op, key or order
(mutations tried while writing this file, each caught: conv_y / conv_b swapped in SpatialNorm's
forward, 16 instead of 32 norm groups, bilinear instead of nearest resizing of z_q, the decoder
conditioned after post_quant_conv, attention before the resnet, argmax of the dot product instead
of the nearest code, the legacy beta on the other term, no straight-through estimator).
The quantised paths are different: a quantised latent is piecewise constant (17 codes over 768
pixels here), so the decoder's feature maps have a large mean next to a small variance, and
diffusers' attention blocks hand the next GroupNorm a channels-last view, for which PyTorch's CPU
GroupNorm loses digits to cancellation. Measured on the same input: diffusers fp32 is 2.1e-5 from
diffusers float64, minidiff fp32 1.8e-6. So the quantised outputs are held to 1e-5 against the
float64 run of the same diffusers model (the truth), and to 1e-4 (5x the 2.1e-5 seen) against
diffusers' fp32, which still fails on any real mistake (a swapped conv_y / conv_b moves the image
by more than 1e-1, checked below).

The codebook. tiny_movq keeps diffusers' codebook initialisation U(-1/K, 1/K), about 50x smaller
than the encoder's output (std 0.43), so every pixel picks the same code and an index comparison
would be vacuous; each case replaces the codebook (before saving) by entries at z_e's scale.
"""

import copy
import json

import pytest
import torch

from minidiff.errors import InputError
from minidiff.models.attention import attention_backend
from minidiff.models.vq import VQModel, VQModelConfig
from minidiff.reference import tiny_movq
from tests.helpers import assert_rel_close, max_rel_err

diffusers = pytest.importorskip("diffusers")

FP32_RTOL = 1e-5  # same ops, other summation orders (measured <= 4.6e-6)
QUANTISED_VS_FP32_RTOL = 1e-4  # diffusers' own fp32 error on quantised latents is 2.1e-5 (see above)


def _perturbed(model):
    """diffusers initialises norms to 1 / 0 and biases to 0; perturb every 1-D parameter so a
    swapped norm (norm1 vs norm2, conv_y vs conv_b) changes the output (as tiny_movq does)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() < 2:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _group_3_level():
    torch.manual_seed(0)
    return _perturbed(diffusers.VQModel(
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, norm_num_groups=8,
        latent_channels=4, vq_embed_dim=3, num_vq_embeddings=64, norm_type="group"))


def _group_attn():
    torch.manual_seed(0)
    return _perturbed(diffusers.VQModel(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, norm_num_groups=8,
        latent_channels=4, num_vq_embeddings=64, norm_type="group", mid_block_add_attention=False))


CASES = {
    # name: (diffusers builder, image height, image width)
    "movq": (tiny_movq, 32, 48),
    "group-3-level": (_group_3_level, 24, 40),
    "group-attn": (_group_attn, 16, 24),
}


def _spread_codebook(ref, x):
    """Codebook entries drawn around the encoder's outputs for x, so many different codes win."""
    with torch.no_grad():
        z = ref.encode(x).latents  # (B, D, h, w)
        K, D = ref.quantize.embedding.weight.shape
        noise = torch.randn(K, D, generator=torch.Generator().manual_seed(2))
        ref.quantize.embedding.weight.copy_(z.mean(dim=(0, 2, 3)) + z.std() * noise)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(diffusers fp32 model, the same in float64, minidiff's model loaded from its folder, a batch
    of 2 images in [-1, 1], the folder)."""
    build, H, W = CASES[request.param]
    ref = build()
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(1)) * 2 - 1
    _spread_codebook(ref, x)
    folder = tmp_path_factory.mktemp(f"vq-{request.param}")
    ref.save_pretrained(folder)
    ours = VQModel.from_pretrained(folder)
    return ref, copy.deepcopy(ref).double(), ours, x, folder


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@torch.no_grad()
def test_encode_and_unquantised_decode(case, backend):
    ref, _, ours, x, _ = case
    z_ref = ref.encode(x).latents
    with attention_backend(backend):
        z = ours.encode(x).latents
        assert_rel_close(z, z_ref, FP32_RTOL, f"{backend} encode")
        f = ours.downsample_factor
        assert z.shape == (2, ours.config.embed_dim, x.shape[2] // f, x.shape[3] // f)
        out, out_ref = ours.decode(z_ref, force_not_quantize=True), ref.decode(z_ref, force_not_quantize=True)
    assert_rel_close(out.sample, out_ref.sample, FP32_RTOL, f"{backend} decode(force_not_quantize)")
    assert out.sample.shape == x.shape
    assert torch.equal(out.commit_loss, out_ref.commit_loss)  # zeros (B,)


@torch.no_grad()
def test_quantizer(case):
    ref, _, ours, x, _ = case
    z = ref.encode(x).latents  # (B, D, h, w)
    z_q, loss, (perplexity, encodings, idx) = ours.quantize(z)
    z_q_ref, loss_ref, (_, _, idx_ref) = ref.quantize(z)
    assert torch.equal(idx, idx_ref), "codebook indices differ from diffusers'"
    assert idx.shape == (z.shape[0] * z.shape[2] * z.shape[3],) and perplexity is None and encodings is None
    # Brute force, independent of both implementations: k = argmin_j ||z - e_j||^2.
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N, D)
    assert torch.equal(idx, ((flat[:, None] - ours.quantize.embedding.weight[None]) ** 2).sum(-1).argmin(1))
    assert idx.unique().numel() >= 8, "too few distinct codes for the index check to mean anything"
    assert_rel_close(z_q, z_q_ref, FP32_RTOL, "z_q")
    assert_rel_close(loss, loss_ref, FP32_RTOL, "commitment loss")
    # z_q holds codebook rows (to rounding: the straight-through form z + (e_k - z) is not exactly e_k).
    assert_rel_close(z_q, ours.quantize.get_codebook_entry(idx, (z.shape[0], *z.shape[2:], z.shape[1])),
                     1e-6, "z_q vs the looked-up codes")


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@torch.no_grad()
def test_quantised_decode_and_forward(case, backend):
    ref, ref64, ours, x, _ = case
    z = ref.encode(x).latents
    with attention_backend(backend):
        out, recon = ours.decode(z), ours(x)
        # diffusers' return types: decode -> (sample, commit_loss), forward -> (sample, commit_loss).
        sample, commit_loss = ours(x, return_dict=False)
        decoded, _ = ours.decode(z, return_dict=False)
    truth, truth_recon = ref64.decode(z.double()), ref64(x.double())
    assert_rel_close(out.sample, truth.sample, FP32_RTOL, f"{backend} decode vs diffusers float64")
    assert_rel_close(recon.sample, truth_recon.sample, FP32_RTOL, f"{backend} forward vs diffusers float64")
    out_ref, recon_ref = ref.decode(z), ref(x)
    assert_rel_close(out.sample, out_ref.sample, QUANTISED_VS_FP32_RTOL, f"{backend} decode vs diffusers fp32")
    assert_rel_close(recon.sample, recon_ref.sample, QUANTISED_VS_FP32_RTOL, f"{backend} forward vs diffusers fp32")
    assert_rel_close(out.commit_loss, out_ref.commit_loss, FP32_RTOL, "decode commit_loss")
    assert_rel_close(recon.commit_loss, recon_ref.commit_loss, FP32_RTOL, "forward commit_loss")
    assert torch.equal(sample, recon.sample) and torch.equal(commit_loss, recon.commit_loss)
    assert torch.equal(decoded, out.sample)
    assert out[0] is out.sample and out[1] is out.commit_loss
    (latents,) = ours.encode(x, return_dict=False)
    assert latents.shape == z.shape


@torch.no_grad()
def test_decode_from_codebook_indices(case, tmp_path):
    """lookup_from_codebook: decode(indices, force_not_quantize=True, shape=(B, h, w, D))."""
    ref, _, _, x, folder = case
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "lookup_from_codebook": True}))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes())
    ours = VQModel.from_pretrained(tmp_path)
    ref = diffusers.VQModel.from_pretrained(tmp_path).eval()
    z = ref.encode(x).latents
    idx = ref.quantize(z)[2][2]  # (B*h*w,)
    shape = (z.shape[0], z.shape[2], z.shape[3], z.shape[1])
    out = ours.decode(idx, force_not_quantize=True, shape=shape)
    out_ref = ref.decode(idx, force_not_quantize=True, shape=shape)
    assert_rel_close(out.sample, out_ref.sample, QUANTISED_VS_FP32_RTOL, "decode from indices")
    assert torch.equal(out.commit_loss, out_ref.commit_loss)
    # The same image as quantising z (to the straight-through rounding of z_q).
    assert_rel_close(out.sample, ours.decode(z).sample, 1e-5, "indices vs quantised latent")
    with pytest.raises(InputError, match=r"shape=\(B, h, w, \d\)"):
        ours.decode(idx, force_not_quantize=True)


@torch.no_grad()
def test_negative_controls(case):
    """The comparisons above can fail: two same-shaped tensors swapped in the decoder's last norm
    (conv_y / conv_b of MoVQ's SpatialNorm, or a GroupNorm's weight / bias), or the decoder
    conditioned on the latent after post_quant_conv instead of before, move the image far away."""
    ref, _, ours, x, _ = case
    z = ref.encode(x).latents
    expected = ref.decode(z, force_not_quantize=True).sample
    spatial = ours.config.norm_type == "spatial"
    pairs = ([(f"decoder.conv_norm_out.conv_y.{k}", f"decoder.conv_norm_out.conv_b.{k}") for k in ("weight", "bias")]
             if spatial else [("decoder.conv_norm_out.weight", "decoder.conv_norm_out.bias")])
    state = dict(ours.state_dict())
    for a, b in pairs:
        state[a], state[b] = state[b], state[a]
    swapped = VQModel(ours.config)
    swapped.load_state_dict(state, strict=True)
    assert max_rel_err(swapped.decode(z, force_not_quantize=True).sample, expected) > 1e-1
    if spatial:
        after_conv = ours.decoder(ours.post_quant_conv(z), ours.post_quant_conv(z))
        assert max_rel_err(after_conv, expected) > 1e-1


def test_training_step_reaches_the_encoder(case):
    """The straight-through estimator carries the reconstruction gradient past the argmin into the
    encoder; the gradients equal diffusers' (float64: 1e-5, fp32: 1e-4, the forward's reasons) and
    one SGD step changes the encoder's weights."""
    ref, ref64, ours, x, _ = case
    ours, ref, ref64 = copy.deepcopy(ours), copy.deepcopy(ref), copy.deepcopy(ref64)
    grads = []
    for model, inputs in ((ours, x), (ref, x), (ref64, x.double())):
        out = model(inputs)
        # Reconstruction only: without the straight-through estimator no gradient would reach the
        # encoder (the codebook lookup is not differentiable in z).
        ((out.sample - inputs) ** 2).mean().backward()
        grad = model.encoder.conv_in.weight.grad
        assert grad is not None and grad.abs().max() > 0, f"no gradient reached {type(model).__module__}'s encoder"
        grads.append(grad.clone())
        assert model.quantize.embedding.weight.grad is None  # the reconstruction does not train the codebook
    assert_rel_close(grads[0], grads[2], FP32_RTOL, "encoder gradient vs diffusers float64")
    assert_rel_close(grads[0], grads[1], QUANTISED_VS_FP32_RTOL, "encoder gradient vs diffusers fp32")

    # With the VQ loss the codebook learns too (its only gradient is the codebook term).
    for model in (ours, ref):
        model.zero_grad()
        model(x).commit_loss.backward()
    assert_rel_close(ours.quantize.embedding.weight.grad, ref.quantize.embedding.weight.grad, FP32_RTOL,
                     "codebook gradient vs diffusers")
    assert_rel_close(ours.encoder.conv_in.weight.grad, ref.encoder.conv_in.weight.grad, FP32_RTOL,
                     "encoder gradient of the commitment loss vs diffusers")

    before = ours.encoder.conv_in.weight.detach().clone()
    optimizer = torch.optim.SGD(ours.parameters(), lr=1e-2)
    optimizer.zero_grad()
    out = ours(x)
    (((out.sample - x) ** 2).mean() + out.commit_loss).backward()
    optimizer.step()
    assert not torch.equal(ours.encoder.conv_in.weight, before)


@torch.no_grad()
def test_save_pretrained_round_trip(case, tmp_path):
    ref, _, ours, x, _ = case
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "VQModel"
    back = diffusers.VQModel.from_pretrained(tmp_path).eval()

    def plain(cfg):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if not k.startswith("_")}
    assert plain(back.config) == plain(ref.config)
    ref_state, back_state = ref.state_dict(), back.state_dict()
    assert ref_state.keys() == back_state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], back_state[k]), k
    # Same weights and same code: bit-identical outputs.
    assert torch.equal(back(x).sample, ref(x).sample)
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"


def test_official_movq_config_on_meta():
    from minidiff.data import config_folder

    config = json.loads((config_folder("kandinsky-2-2-decoder") / "movq" / "config.json").read_text())
    with torch.device("meta"):
        ours = VQModel.from_config(config)
        ref = diffusers.VQModel.from_config(config)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes.keys() == ref_shapes.keys(), sorted(ours_shapes.keys() ^ ref_shapes.keys())
    assert ours_shapes == ref_shapes
    assert ours.downsample_factor == 8
    assert ours_shapes["quantize.embedding.weight"] == (16384, 4)
    assert "decoder.up_blocks.0.attentions.0.spatial_norm.conv_y.weight" in ours_shapes


def _tiny(**changes):
    """A small MoVQ-layout model with random weights (the input checks need no reference)."""
    config = dict(block_out_channels=(32, 64), norm_num_groups=8, latent_channels=4, num_vq_embeddings=16,
                  norm_type="spatial", down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                  up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"))
    return VQModel(VQModelConfig(**{**config, **changes}))


def test_bad_input():
    model = _tiny()
    with pytest.raises(InputError, match=r"encode expects images shaped \(B, 3, H, W\); got shape \(2, 4, 16, 16\)"):
        model.encode(torch.zeros(2, 4, 16, 16))
    with pytest.raises(InputError, match="multiples of 2"):
        model.encode(torch.zeros(2, 3, 16, 15))
    with pytest.raises(InputError, match=r"weights are torch.float32, but the image is torch.float16"):
        model.encode(torch.zeros(2, 3, 16, 16, dtype=torch.float16))
    with pytest.raises(InputError, match=r"weights are torch.float32, but the latent is torch.float16; cast it"):
        model.decode(torch.zeros(2, 4, 8, 8, dtype=torch.float16))
    with pytest.raises(InputError, match=r"weights are torch.float32, but the latent is torch.int64"):
        model.decode(torch.zeros(2, 4, 8, 8, dtype=torch.long), force_not_quantize=True)
    with pytest.raises(InputError, match=r"decode expects latents shaped \(B, 4, h, w\)"):
        model.decode(torch.zeros(2, 3, 8, 8))
    with pytest.raises(InputError, match="integer codebook indices"):
        _tiny(lookup_from_codebook=True).decode(torch.zeros(2, 4, 8, 8), force_not_quantize=True, shape=(2, 8, 8, 4))


@pytest.mark.parametrize("change, option", [
    (dict(down_block_types=("DownBlock2D", "AttnDownEncoderBlock2D")), "down_block_types"),
    (dict(up_block_types=("AttnUpDecoderBlock2D",)), "up_block_types"),
    (dict(act_fn="gelu"), "act_fn"),
    (dict(norm_type="ada_group"), "norm_type"),
    (dict(block_out_channels=(16, 64), norm_num_groups=8), "multiple of 32"),
    (dict(vq_embed_dim=3), "vq_embed_dim"),
])
def test_unsupported_config_is_rejected(change, option):
    with pytest.raises(InputError, match=option):
        _tiny(**change)
