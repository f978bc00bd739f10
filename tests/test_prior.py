"""The Kandinsky 2.2 / unCLIP prior against diffusers' PriorTransformer.

Tiny diffusers priors, every parameter random (clip_mean / clip_std and the zero-initialised
positional and prd embeddings included), are saved with diffusers' `save_pretrained` and loaded
through minidiff's production loader; both run the same inputs, with no mask and with a padding
mask. The official Kandinsky 2.2 and Karlo configs are compared key by key on the meta device.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import minidiff.data
from helpers import assert_rel_close, max_rel_err
from minidiff.errors import InputError
from minidiff.models.attention import attention_backend
from minidiff.models.prior import MASK_VALUE, PriorTransformer, PriorTransformerConfig

diffusers = pytest.importorskip("diffusers")

# fp32 against fp32, the same operations: with "sdpa" the result is bit-identical (measured 0);
# the "math" backend sums the attention scores in another order than diffusers' SDPA (measured
# <= 5.5e-7 over the three configs). 1e-5 leaves room for that and nothing else.
FP32_RTOL = 1e-5

# Kandinsky 2.2 and Karlo set only sizes: text width E (1280 / 768) below the transformer width
# D = heads x head_dim (2048). "options" turns on everything else minidiff implements.
KANDINSKY_LIKE = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=12,
                      num_embeddings=7, additional_embeddings=4)
KARLO_LIKE = dict(num_attention_heads=4, attention_head_dim=4, num_layers=3, embedding_dim=8,
                  num_embeddings=5)  # additional_embeddings left at its default (4), as Karlo's file does
OPTIONS = dict(KANDINSKY_LIKE, norm_in_type="layer", embedding_proj_norm_type="layer", time_embed_act_fn="gelu",
               time_embed_dim=24, embedding_proj_dim=10, clip_embed_dim=14)
TINY = {"kandinsky": KANDINSKY_LIKE, "karlo": KARLO_LIKE, "options": OPTIONS}

BATCH = 3


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random: weights ~ N(0, 1/fan_in), norm scales near 1, small biases, the
    embeddings O(1), clip_std positive and far from 1 and clip_mean far from 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name == "clip_std":
                p.copy_(r.abs() + 0.5)
            elif name in ("clip_mean", "positional_embedding", "prd_embedding"):
                p.copy_(r)
            elif p.ndim >= 2:
                p.copy_(r / math.sqrt(p.shape[1]))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.1 * r)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{name: (diffusers model, folder written by diffusers' save_pretrained)}."""
    out = {}
    for name, config in TINY.items():
        ref = diffusers.PriorTransformer(**config).eval()
        randomize(ref)
        folder = tmp_path_factory.mktemp(name)
        ref.save_pretrained(folder)
        out[name] = (ref, folder)
    return out


def inputs(config: dict, seed: int = 1):
    """z_i^(t), text embedding, text states and a text mask: sample 0 unpadded, sample 1 padded
    after 3 tokens, sample 2 with its first token masked too (a row where every key is masked:
    finite with -10000, NaN if the mask used -inf)."""
    g = torch.Generator().manual_seed(seed)
    E = config["embedding_dim"]
    n = config["num_embeddings"]
    hidden = torch.randn(BATCH, E, generator=g)
    proj = torch.randn(BATCH, config.get("embedding_proj_dim") or E, generator=g)
    text = torch.randn(BATCH, n, E, generator=g)
    mask = torch.ones(BATCH, n, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 0] = False
    mask[2, n - 2:] = False
    return hidden, proj, text, mask


# ----------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("name", list(TINY))
def test_matches_diffusers_fp32(checkpoints, name, backend):
    ref, folder = checkpoints[name]
    prior = PriorTransformer.from_pretrained(folder)
    hidden, proj, text, mask = inputs(TINY[name])
    timesteps = {
        "int": 981,
        "float (truncated to 500 by both)": 500.7,
        "0-d tensor": torch.tensor(261),
        "(B,) tensor": torch.tensor([1, 500, 999]),
    }
    with torch.no_grad():
        for what, t in timesteps.items():
            for mask_name, m in (("no mask", None), ("padding mask", mask)):
                want = ref(hidden, t, proj, text, attention_mask=m).predicted_image_embedding
                with attention_backend(backend):
                    got = prior(hidden, t, proj, text, attention_mask=m).predicted_image_embedding
                assert torch.isfinite(got).all()
                assert_rel_close(got, want, FP32_RTOL, f"{name} {backend} timestep {what}, {mask_name}")


def test_masks_change_the_output(checkpoints):
    """Negative controls: each part of the mask changes the answer, so the parity above would see
    a mask that was dropped, always applied, or applied without its causal half."""
    ref, folder = checkpoints["kandinsky"]
    prior = PriorTransformer.from_pretrained(folder)
    hidden, proj, text, mask = inputs(KANDINSKY_LIKE)
    all_ones = torch.ones_like(mask)
    with torch.no_grad():
        def run(model, m):
            return model(hidden, 10, proj, text, attention_mask=m).predicted_image_embedding

        no_mask, causal_only, padded = run(prior, None), run(prior, all_ones), run(prior, mask)
        # diffusers with attention_mask=None is bidirectional: not the causal-only result.
        assert max_rel_err(no_mask, causal_only) > 1e-2
        assert max_rel_err(run(ref, None), run(ref, all_ones)) > 1e-2
        assert_rel_close(causal_only, run(ref, all_ones), FP32_RTOL, "all-ones mask = causal mask only")
        # Padding hides text tokens: samples 1 and 2 change, sample 0 (no padding) does not.
        assert max_rel_err(padded[1:], causal_only[1:]) > 1e-2
        assert torch.equal(padded[0], causal_only[0])
    bias = prior.attention_bias(mask, torch.float32)  # (B, 1, 11, 11)
    assert bias.shape == (BATCH, 1, 11, 11)
    assert bias[0, 0, 3, 4] == MASK_VALUE == -10000.0  # causal: query 3 cannot see key 4
    assert bias[1, 0, 10, 3] == MASK_VALUE and bias[1, 0, 10, 7] == 0  # padded text key; extra tokens visible
    # Query 0 of sample 2 sees no key: its own is padding, the rest are in its future (padded ones twice).
    assert bias[2, 0, 0, 0] == bias[2, 0, 0, 1] == MASK_VALUE and bias[2, 0, 0, 6] == 2 * MASK_VALUE


def test_per_sample_timestep_is_per_sample(checkpoints):
    _, folder = checkpoints["karlo"]
    prior = PriorTransformer.from_pretrained(folder)
    hidden, proj, text, mask = inputs(KARLO_LIKE)
    with torch.no_grad():
        each = prior(hidden, torch.tensor([1, 500, 999]), proj, text, mask).predicted_image_embedding
        same = prior(hidden, 1, proj, text, mask).predicted_image_embedding
    assert torch.equal(each[0], same[0])
    assert max_rel_err(each[1:], same[1:]) > 1e-3


def test_return_dict_like_diffusers(checkpoints):
    ref, folder = checkpoints["options"]
    prior = PriorTransformer.from_pretrained(folder)
    hidden, proj, text, mask = inputs(OPTIONS)
    with torch.no_grad():
        out, ref_out = prior(hidden, 5, proj, text, mask), ref(hidden, 5, proj, text, mask)
        assert type(out).__name__ == type(ref_out).__name__ == "PriorTransformerOutput"
        assert out.predicted_image_embedding.shape == ref_out.predicted_image_embedding.shape == (BATCH, 14)
        assert torch.equal(out[0], out.predicted_image_embedding)
        plain = prior(hidden, 5, proj, text, mask, return_dict=False)
        assert type(plain) is tuple and len(plain) == len(ref(hidden, 5, proj, text, mask, return_dict=False)) == 1
        assert torch.equal(plain[0], out.predicted_image_embedding)


def test_save_pretrained_round_trip_into_diffusers(checkpoints, tmp_path):
    ref, folder = checkpoints["options"]
    prior = PriorTransformer.from_pretrained(folder)
    prior.save_pretrained(tmp_path)
    back = diffusers.PriorTransformer.from_pretrained(tmp_path).eval()
    assert back.config.norm_in_type == "layer" and back.config.clip_embed_dim == 14
    hidden, proj, text, mask = inputs(OPTIONS)
    with torch.no_grad():
        # Same weights, same diffusers code: bit-identical.
        assert torch.equal(back(hidden, 7, proj, text, mask).predicted_image_embedding,
                           ref(hidden, 7, proj, text, mask).predicted_image_embedding)
    assert PriorTransformer.from_pretrained(tmp_path).config == prior.config


def test_diffusers_config_keys_are_all_understood(checkpoints):
    _, folder = checkpoints["kandinsky"]
    keys = json.loads((folder / "config.json").read_text()).keys()
    fields = set(PriorTransformerConfig.__dataclass_fields__)
    assert not [k for k in keys if not k.startswith("_") and k not in fields]


def test_bf16_load(checkpoints):
    """bf16 keeps 8 significant bits (unit roundoff 3.9e-3): a few rounded layers land ~0.5-1%
    from the fp32 result, for diffusers' own bf16 model exactly as much as for ours (measured
    4.5e-3 for both on this model). Required: <= 2e-2 and at most twice diffusers' bf16 error."""
    ref, folder = checkpoints["kandinsky"]
    prior = PriorTransformer.from_pretrained(folder, torch_dtype=torch.bfloat16)
    ref_bf16 = diffusers.PriorTransformer.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    assert prior.dtype == torch.bfloat16 and prior.causal_attention_mask.dtype == torch.float32
    hidden, proj, text, mask = inputs(KANDINSKY_LIKE)
    args = (hidden.bfloat16(), 300, proj.bfloat16(), text.bfloat16(), mask)
    with torch.no_grad():
        want = ref(hidden, 300, proj, text, mask).predicted_image_embedding
        got = prior(*args).predicted_image_embedding
        diffusers_err = max_rel_err(ref_bf16(*args).predicted_image_embedding, want)
    assert got.dtype == torch.bfloat16
    err = max_rel_err(got, want)
    assert err <= 2e-2 and err <= 2 * diffusers_err, f"bf16 error {err:.3e} vs diffusers' {diffusers_err:.3e}"


# ----------------------------------------------------------------------------------------------
# clip_mean / clip_std


def test_post_process_latents(checkpoints):
    ref, folder = checkpoints["kandinsky"]
    prior = PriorTransformer.from_pretrained(folder)
    z = torch.randn(BATCH, 12)
    # Loaded from the file, not left at their zero initial values.
    assert torch.equal(prior.clip_std, ref.clip_std) and (prior.clip_std > 0.4).all()
    want = z * ref.clip_std.detach() + ref.clip_mean.detach()
    torch.testing.assert_close(prior.post_process_latents(z), want, rtol=0, atol=0)
    torch.testing.assert_close(prior.post_process_latents(z), ref.post_process_latents(z), rtol=0, atol=0)
    assert not torch.allclose(prior.post_process_latents(z), z)  # it is not the identity


def test_freeze_clip_stats_before_training(checkpoints):
    _, folder = checkpoints["kandinsky"]
    prior = PriorTransformer.from_pretrained(folder).train()
    assert prior.freeze_clip_stats() is prior
    hidden, proj, text, mask = inputs(KANDINSKY_LIKE)
    prior(hidden, 3, proj, text, mask).predicted_image_embedding.square().mean().backward()
    trainable = {n for n, p in prior.named_parameters() if p.requires_grad}
    assert "clip_mean" not in trainable and "clip_std" not in trainable
    # Every parameter that still asks for a gradient gets one: what DDP requires.
    assert all(p.grad is not None for n, p in prior.named_parameters() if n in trainable)
    assert len(trainable) == len(list(prior.parameters())) - 2


# ----------------------------------------------------------------------------------------------
# Full-size official configs


def official_kandinsky() -> dict:
    path = minidiff.data.config_folder("kandinsky-2-2-prior") / "prior" / "config.json"
    return json.loads(path.read_text())


KARLO = {"_class_name": "PriorTransformer", "attention_head_dim": 64, "embedding_dim": 768,
         "num_attention_heads": 32, "num_embeddings": 77, "num_layers": 20}  # kakaobrain/karlo-v1-alpha


@pytest.mark.parametrize("name", ["kandinsky-2-2-prior", "karlo-v1-alpha"])
def test_official_config_has_diffusers_keys_and_shapes(name):
    config = official_kandinsky() if name == "kandinsky-2-2-prior" else KARLO
    with torch.device("meta"):
        ref = diffusers.PriorTransformer.from_config(config)
        prior = PriorTransformer.from_config(config)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in prior.state_dict().items()}
    assert got == want
    assert "causal_attention_mask" not in got  # a non-persistent buffer on both sides
    assert tuple(prior.causal_attention_mask.shape) == tuple(ref.causal_attention_mask.shape) == (1, 81, 81)
    if name == "kandinsky-2-2-prior":
        assert got["positional_embedding"] == (1, 81, 2048) and got["clip_mean"] == (1, 1280)
        assert 1.0e9 < sum(math.prod(s) for s in got.values()) < 1.1e9  # ~1.0B parameters


def test_causal_mask_buffer_matches_diffusers(checkpoints):
    ref, folder = checkpoints["kandinsky"]
    prior = PriorTransformer.from_pretrained(folder)  # built on meta, the buffer recomputed
    assert not prior.causal_attention_mask.is_meta
    torch.testing.assert_close(prior.causal_attention_mask, ref.causal_attention_mask, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Bad input


def test_missing_key_is_named(checkpoints, tmp_path):
    _, folder = checkpoints["kandinsky"]
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    del state["prd_embedding"]
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(InputError) as info:
        PriorTransformer.from_pretrained(tmp_path)
    message = str(info.value)
    assert "do not fit this model" in message
    assert "1 missing key(s)" in message and "prd_embedding" in message


@pytest.mark.parametrize(
    "option, value",
    [
        ("encoder_hid_proj_type", None),  # Shap-E: no text tokens
        ("added_emb_type", None),  # Shap-E: no prd token
        ("additional_embeddings", 0),
        ("norm_in_type", "group"),
        ("embedding_proj_norm_type", "rms"),
        ("dropout", 0.1),
    ],
)
def test_unsupported_option_is_named(option, value):
    with pytest.raises(InputError, match=f"option {option}="):
        PriorTransformer.from_config(dict(KANDINSKY_LIKE, **{option: value}))


def test_bad_inputs_raise_clear_errors(checkpoints):
    _, folder = checkpoints["kandinsky"]
    prior = PriorTransformer.from_pretrained(folder)
    hidden, proj, text, mask = inputs(KANDINSKY_LIKE)
    with pytest.raises(InputError, match=r"hidden_states .* \(batch, 12\)"):
        prior(hidden[:, :5], 1, proj, text)
    with pytest.raises(InputError, match="proj_embedding"):
        prior(hidden, 1, proj[:2], text)
    with pytest.raises(InputError, match="needs encoder_hidden_states"):
        prior(hidden, 1, proj)
    with pytest.raises(InputError, match="exactly 7 text tokens"):
        prior(hidden, 1, proj, text[:, :5])
    with pytest.raises(InputError, match="attention_mask must have shape"):
        prior(hidden, 1, proj, text, mask[:, :5])
    with pytest.raises(InputError, match="timestep"):
        prior(hidden, torch.tensor([1, 2]), proj, text)
    with pytest.raises(InputError, match="cast the inputs"):
        prior(hidden.double(), 1, proj.double(), text.double())
