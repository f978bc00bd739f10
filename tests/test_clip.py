"""CLIP text and vision encoders against transformers.

Every parity test builds a tiny random transformers model, saves it with transformers'
`save_pretrained` (the official format), loads it through minidiff's `from_pretrained`, and
compares all outputs. Random weights are perturbed away from transformers' initialisation (which
sets every bias to 0 and every LayerNorm to identity) so that a swapped or unloaded bias or norm
cannot go unnoticed.

Tolerances:
    fp32  1e-5 max relative error: both sides do the same float32 operations in a different order
          (fused SDPA vs explicit softmax, a different matmul split); measured <= 6e-7.
    bf16  minidiff in bfloat16 against the float32 reference: bf16 keeps 8 significant bits, a
          relative rounding of up to 2^-8 ~ 4e-3 per stored value, accumulated over the layers; the
          tolerance is ~2-3x the error measured on these tiny models (see BF16_RTOL).
"""

import json
import warnings

import pytest
import torch

from minidiff.models.attention import attention_backend
from minidiff.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)
from tests.helpers import assert_rel_close, max_rel_err

transformers = pytest.importorskip("transformers")

FP32_RTOL = 1e-5  # float32 reordering only; measured <= 6e-7
# bf16 vs the fp32 reference on these 3-layer models, measured over several input seeds:
# text 1.0e-2 .. 1.8e-2, vision 6.8e-3 .. 1.1e-2 (transformers' own bf16 run: 7e-3 .. 1.6e-2).
# Tolerance ~2-3x the worst measured.
BF16_RTOL = 4e-2

TEXT_SIZES = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, projection_dim=24,
                  num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77)
VISION_SIZES = dict(hidden_size=32, intermediate_size=64, projection_dim=24, num_hidden_layers=3,
                    num_attention_heads=4, image_size=32, patch_size=8, num_channels=3)
# The two pooling rules of transformers' CLIP text model (see CLIPTextTransformer.eos_positions):
#   legacy    eos_token_id 2 (SD 1.x / 2.x configs): pool at argmax(input_ids)
#   explicit  any other eos_token_id (49407 in current configs): pool at the first EOS
EOS_RULES = {
    "legacy": dict(bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "explicit": dict(bos_token_id=997, eos_token_id=998, pad_token_id=1),
}
TOKEN_MAX = 999  # the largest id in the tiny vocabulary, playing 49407's role in the legacy rule


def perturb(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Move every parameter away from its initial value (biases 0, LayerNorm 1/0)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


def hf_text_model(cls_name="CLIPTextModel", hidden_act="quick_gelu", eos_rule="explicit", **overrides):
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(**{**TEXT_SIZES, **EOS_RULES[eos_rule], "hidden_act": hidden_act,
                                            **overrides}, attn_implementation="eager")
    return perturb(getattr(transformers, cls_name)(config))


def hf_vision_model(hidden_act="quick_gelu", **overrides):
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(**{**VISION_SIZES, "hidden_act": hidden_act, **overrides},
                                           attn_implementation="eager")
    return perturb(transformers.CLIPVisionModelWithProjection(config))


def load_quietly(cls, folder, **kwargs):
    """minidiff's from_pretrained; any warning (e.g. an unknown config key) fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return cls.from_pretrained(folder, **kwargs)


def prompt_ids(eos_rule: str, batch: int = 3, length: int = 16, seed: int = 1):
    """Token ids shaped like the tokenizer's: BOS, words, EOS, then padding (and its mask).

    Each row also holds TOKEN_MAX somewhere among its words when the rule is "explicit", so the
    argmax rule and the first-EOS rule pick different positions and a wrong rule fails.
    """
    ids_cfg = EOS_RULES[eos_rule]
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), ids_cfg["pad_token_id"])
    mask = torch.zeros(batch, length, dtype=torch.long)
    eos = TOKEN_MAX if eos_rule == "legacy" else ids_cfg["eos_token_id"]
    for b in range(batch):
        n_words = int(torch.randint(2, length - 2, (1,), generator=g))
        words = torch.randint(3, 990, (n_words,), generator=g)
        if eos_rule == "explicit":
            words[int(torch.randint(0, n_words, (1,), generator=g))] = TOKEN_MAX
        row = torch.cat([torch.tensor([ids_cfg["bos_token_id"]]), words, torch.tensor([eos])])
        ids[b, : len(row)] = row
        mask[b, : len(row)] = 1
    return ids, mask


def compare_text(ours, ref, rtol, what):
    assert_rel_close(ours.last_hidden_state, ref.last_hidden_state, rtol, f"{what} last_hidden_state")
    assert len(ours.hidden_states) == len(ref.hidden_states) == TEXT_SIZES["num_hidden_layers"] + 1
    for i, (h, h_ref) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
        assert_rel_close(h, h_ref, rtol, f"{what} hidden_states[{i}]")


# ----------------------------------------------------------------------------------------------
# fp32 parity


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("eos_rule", ["legacy", "explicit"])
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_text_model_matches_transformers(tmp_path, hidden_act, eos_rule, backend):
    ref_model = hf_text_model("CLIPTextModel", hidden_act, eos_rule)
    ref_model.save_pretrained(tmp_path)
    model = load_quietly(CLIPTextModel, tmp_path)
    ids, mask = prompt_ids(eos_rule)
    for attention_mask in (None, mask):
        what = f"{hidden_act}/{eos_rule}/{backend}/mask={attention_mask is not None}"
        with torch.no_grad(), attention_backend(backend):
            ref = ref_model(ids, attention_mask=attention_mask, output_hidden_states=True)
            ours = model(ids, attention_mask=attention_mask, output_hidden_states=True)
            # clip_skip=1 as diffusers does it: the penultimate layer through the final norm.
            skip_ref = ref_model.final_layer_norm(ref.hidden_states[-2])
            skip_ours = model.text_model.final_layer_norm(ours[-1][-2])
        compare_text(ours, ref, FP32_RTOL, what)
        assert_rel_close(ours.pooler_output, ref.pooler_output, FP32_RTOL, f"{what} pooler_output")
        assert_rel_close(skip_ours, skip_ref, FP32_RTOL, f"{what} clip_skip=1")
        assert ours[0] is ours.last_hidden_state and ours["pooler_output"] is ours.pooler_output
    # The padding mask must change the padded positions (or this test could not catch a lost mask).
    with torch.no_grad():
        assert max_rel_err(model(ids).last_hidden_state, model(ids, mask).last_hidden_state) > 1e-3


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_left_padding_stays_finite(tmp_path, backend):
    """Leading pads have no token to attend to; their rows must not turn the output into NaN.
    The token rows match transformers (whose padded rows differ between its own backends)."""
    ref_model = hf_text_model("CLIPTextModel", "gelu", "explicit")
    ref_model.save_pretrained(tmp_path)
    model = load_quietly(CLIPTextModel, tmp_path)
    ids = torch.tensor([[1, 1, 1, 997, 5, 999, 7, 998], [997, 8, 999, 998, 1, 1, 1, 1]])
    mask = (ids != 1).long()
    with torch.no_grad(), attention_backend(backend):
        ref, ours = ref_model(ids, attention_mask=mask), model(ids, attention_mask=mask)
    assert torch.isfinite(ours.last_hidden_state).all()
    assert_rel_close(ours.last_hidden_state[0, 3:], ref.last_hidden_state[0, 3:], FP32_RTOL, "left-padded tokens")
    assert_rel_close(ours.last_hidden_state[1], ref.last_hidden_state[1], FP32_RTOL, "right-padded row")
    assert_rel_close(ours.pooler_output, ref.pooler_output, FP32_RTOL, "pooler_output")


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_text_projection_matches_transformers(tmp_path, backend):
    ref_model = hf_text_model("CLIPTextModelWithProjection", "gelu", "explicit")
    ref_model.save_pretrained(tmp_path)
    model = load_quietly(CLIPTextModelWithProjection, tmp_path)
    ids, mask = prompt_ids("explicit", length=77)  # full CLIP context, as SD pads prompts
    for attention_mask in (None, mask):
        with torch.no_grad(), attention_backend(backend):
            ref = ref_model(ids, attention_mask=attention_mask, output_hidden_states=True)
            ours = model(ids, attention_mask=attention_mask, output_hidden_states=True)
        compare_text(ours, ref, FP32_RTOL, f"projection/{backend}")
        assert_rel_close(ours.text_embeds, ref.text_embeds, FP32_RTOL, f"{backend} text_embeds")
        assert ours[0] is ours.text_embeds


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_vision_projection_matches_transformers(tmp_path, hidden_act, backend):
    ref_model = hf_vision_model(hidden_act)
    ref_model.save_pretrained(tmp_path)
    model = load_quietly(CLIPVisionModelWithProjection, tmp_path)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), attention_backend(backend):
        ref = ref_model(pixels, output_hidden_states=True)
        ours = model(pixels, output_hidden_states=True)
    assert_rel_close(ours.image_embeds, ref.image_embeds, FP32_RTOL, "image_embeds")
    assert_rel_close(ours.last_hidden_state, ref.last_hidden_state, FP32_RTOL, "last_hidden_state")
    assert len(ours.hidden_states) == len(ref.hidden_states) == VISION_SIZES["num_hidden_layers"] + 1
    for i, (h, h_ref) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
        assert_rel_close(h, h_ref, FP32_RTOL, f"hidden_states[{i}]")
    assert ours["image_embeds"] is ours[0] is ours.image_embeds  # Kandinsky reads ["image_embeds"]


# ----------------------------------------------------------------------------------------------
# bf16


def test_bf16_matches_fp32_reference(tmp_path):
    """minidiff in bf16 vs transformers in fp32, beside transformers' own bf16 error."""
    text_ref = hf_text_model("CLIPTextModelWithProjection", "quick_gelu", "explicit")
    vision_ref = hf_vision_model("gelu")
    ids, mask = prompt_ids("explicit", length=77)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cases = [("text", text_ref, CLIPTextModelWithProjection, (ids, mask)),
             ("vision", vision_ref, CLIPVisionModelWithProjection, (pixels,))]  # fp32 pixels: cast inside
    for kind, ref_model, ours_cls, inputs in cases:
        ref_model.save_pretrained(tmp_path / kind)
        ours_model = load_quietly(ours_cls, tmp_path / kind, torch_dtype=torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in ours_model.parameters())
        hf_bf16 = type(ref_model).from_pretrained(tmp_path / kind, dtype=torch.bfloat16, attn_implementation="eager")
        with torch.no_grad():
            ref, ours, theirs = ref_model(*inputs), ours_model(*inputs), hf_bf16.eval()(*inputs)
        assert ours[0].dtype == torch.bfloat16
        for field in (0, "last_hidden_state"):  # text_embeds / image_embeds, then the token states
            what = f"bf16 {kind} output[{field!r}]"
            err, err_hf = max_rel_err(ours[field], ref[field]), max_rel_err(theirs[field], ref[field])
            print(f"{what}: minidiff {err:.2e}, transformers bf16 {err_hf:.2e}")
            assert err <= BF16_RTOL, f"{what}: max relative error {err:.3e} > {BF16_RTOL:.1e}"
            # As accurate as transformers' own bf16 run (ratio measured 0.7-1.4 over input seeds).
            assert err <= 3 * err_hf, f"{what}: {err:.2e} vs transformers' bf16 {err_hf:.2e}"
            assert err > 1e-5, f"{what}: error {err:.1e} is too small for a bf16 computation"


# ----------------------------------------------------------------------------------------------
# Checkpoint formats: save_pretrained round trip, older transformers files


@pytest.mark.parametrize("cls_name", ["CLIPTextModel", "CLIPTextModelWithProjection", "CLIPVisionModelWithProjection"])
def test_save_pretrained_loads_in_transformers(tmp_path, cls_name):
    ours_cls = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
                "CLIPVisionModelWithProjection": CLIPVisionModelWithProjection}[cls_name]
    ref_model = hf_vision_model() if "Vision" in cls_name else hf_text_model(cls_name)
    ref_model.save_pretrained(tmp_path / "ref")
    model = load_quietly(ours_cls, tmp_path / "ref")
    model.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == [cls_name]

    back = getattr(transformers, cls_name).from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert back.config.hidden_size == ref_model.config.hidden_size
    assert back.config.hidden_act == ref_model.config.hidden_act
    if "Vision" in cls_name:
        inputs = (torch.randn(2, 3, 32, 32),)
    else:
        inputs = prompt_ids("explicit")
        assert back.config.eos_token_id == ref_model.config.eos_token_id
    with torch.no_grad():
        want, got = ref_model(*inputs), back(*inputs)
    # Same weights through the same transformers code: bit-identical, or a weight did not load.
    assert torch.equal(got[0], want[0])
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    # ... and minidiff reads its own files back.
    again = load_quietly(ours_cls, tmp_path / "ours")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_loads_transformers_4_text_encoder_file(tmp_path):
    """Text encoders saved by transformers 4.x (as on the hub) keep the "text_model." prefix, may
    store the position_ids buffer, and carry old bookkeeping keys in config.json; all must load."""
    from safetensors.torch import save_file

    ref_model = hf_text_model("CLIPTextModel", "quick_gelu", "legacy")
    state = {f"text_model.{k}": v.contiguous() for k, v in ref_model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, str(tmp_path / "model.safetensors"))
    config = {**ref_model.config.to_dict(), "_name_or_path": "openai/clip-vit-large-patch14",
              "torch_dtype": "float32", "dropout": 0.0, "transformers_version": "4.22.0.dev0"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_quietly(CLIPTextModel, tmp_path)
    ids, mask = prompt_ids("legacy")
    with torch.no_grad():
        assert_rel_close(model(ids, mask).pooler_output, ref_model(ids, mask).pooler_output, FP32_RTOL, "pooler_output")


# ----------------------------------------------------------------------------------------------
# Bad input


def test_checkpoint_of_another_size_is_rejected(tmp_path):
    hf_text_model("CLIPTextModel", hidden_size=48).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(ValueError, match="wrong shape") as err:
        CLIPTextModel.from_pretrained(tmp_path)
    assert "text_model.embeddings.token_embedding.weight: file (1000, 48) vs model (1000, 32)" in str(err.value)


def test_vision_checkpoint_with_another_patch_size_is_rejected(tmp_path):
    hf_vision_model(patch_size=16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "patch_size": 8}))
    with pytest.raises(ValueError, match="vision_model.embeddings.position_embedding.weight"):
        CLIPVisionModelWithProjection.from_pretrained(tmp_path)


def test_unknown_config_key_warns_once(tmp_path):
    hf_vision_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "clip_test_made_up_key": 1}))
    with pytest.warns(UserWarning, match="clip_test_made_up_key"):
        CLIPVisionModelWithProjection.from_pretrained(tmp_path)


def test_bad_inputs_explain_themselves():
    text = CLIPTextModel(CLIPTextConfig(**TEXT_SIZES))
    with pytest.raises(ValueError, match="78 tokens.*77 positions"):
        text(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, tokens\)"):
        text(torch.zeros(77, dtype=torch.long))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION_SIZES))
    with pytest.raises(ValueError, match=r"\(batch, 3, 32, 32\).*\(1, 3, 48, 48\)"):
        vision(torch.zeros(1, 3, 48, 48))
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        CLIPTextModel(CLIPTextConfig(**{**TEXT_SIZES, "hidden_act": "relu"}))


# ----------------------------------------------------------------------------------------------
# Full-size configs: identical parameter names and shapes, checked on the meta device (no memory)

VIT_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                    num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu")
FULL_SIZE = {
    # SD 1.x text_encoder: openai/clip-vit-large-patch14's text tower.
    "sd1-text ViT-L/14": ("CLIPTextModel", VIT_L14_TEXT),
    # SD 2.x text_encoder: OpenCLIP ViT-H/14's text tower with its last layer dropped (SD 2 uses
    # the penultimate layer), hence 23 layers.
    "sd2-text OpenCLIP ViT-H/14": ("CLIPTextModel", dict(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, projection_dim=512,
        num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu")),
    # ViT-L/14 text and image towers with projections (Kandinsky 2.1's prior, SD image variations).
    "text+proj ViT-L/14": ("CLIPTextModelWithProjection", VIT_L14_TEXT),
    "vision+proj ViT-L/14": ("CLIPVisionModelWithProjection", dict(
        hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24,
        num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu")),
    # OpenCLIP ViT-bigG/14 towers (Kandinsky 2.2's prior uses a CLIP ViT-G image encoder).
    "text+proj ViT-bigG/14": ("CLIPTextModelWithProjection", dict(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280,
        num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu")),
    "vision+proj ViT-bigG/14": ("CLIPVisionModelWithProjection", dict(
        hidden_size=1664, intermediate_size=8192, projection_dim=1280, num_hidden_layers=48,
        num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu")),
}


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_state_dict_matches_transformers(name):
    cls_name, sizes = FULL_SIZE[name]
    vision = "Vision" in cls_name
    ours_cls = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
                "CLIPVisionModelWithProjection": CLIPVisionModelWithProjection}[cls_name]
    with torch.device("meta"):
        ref = getattr(transformers, cls_name)(
            (transformers.CLIPVisionConfig if vision else transformers.CLIPTextConfig)(**sizes))
        with warnings.catch_warnings():  # every key transformers' config carries is known or ignored
            warnings.simplefilter("error")
            ours = ours_cls.from_config(ref.config.to_dict())
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}  # persistent keys only
    if cls_name == "CLIPTextModel":
        # transformers >= 5 names a bare CLIPTextModel's keys without the hub's "text_model." prefix.
        want = {f"text_model.{k}": v for k, v in want.items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got.keys() == want.keys(), (sorted(got.keys() - want.keys())[:5], sorted(want.keys() - got.keys())[:5])
    assert got == want
    assert not list(ours.buffers())  # nothing that from_pretrained would leave on the meta device
