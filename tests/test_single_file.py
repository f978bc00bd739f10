"""Single-file (LDM / CompVis) checkpoints: minidiff.single_file against diffusers' converters.

The synthetic checkpoints are built from an independent description of the ORIGINAL architectures
(CompVis openaimodel.UNetModel, ldm Encoder/Decoder, transformers-4 CLIPTextModel inside
FrozenCLIPEmbedder, OpenCLIP's text tower) below, not by inverting minidiff's key map, so a wrong
template fails here. That description is itself checked: diffusers' converted state dict must load
with strict=True into diffusers' / transformers' own model.

    conversion tests   diffusers.loaders.single_file_utils.convert_* and minidiff.single_file.convert_*
                       give the same keys and bit-identical tensors (tiny configs, and the full-size
                       SD 1.5 / 2.1 key sets on the meta device)
    loading tests      Model.from_single_file(file.safetensors) computes what the reference model
                       loaded with diffusers' converted weights computes (fp32, max rel err 1e-5)
    bad input          missing file, pickled .ckpt, a file without the component
"""

import json

import pytest
import torch

from minidiff import single_file as sf
from tests.helpers import assert_rel_close

dsf = pytest.importorskip("diffusers.loaders.single_file_utils")
import diffusers  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

# fp32. Observed: 0.0 for every output on CPU (same kernels in the same order); 1e-5 leaves room for
# another attention backend or BLAS summation order, and is far below what a wrong key gives (~1).
RTOL = 1e-5


# ----------------------------------------------------------------------------------------------
# Independent description of the LDM layouts: key -> shape


class Shapes(dict):
    def add(self, name, *shape):
        self[name] = tuple(shape)

    def conv(self, name, cin, cout, k=3):
        self.add(f"{name}.weight", cout, cin, k, k)
        self.add(f"{name}.bias", cout)

    def linear(self, name, cin, cout, bias=True):
        self.add(f"{name}.weight", cout, cin)
        if bias:
            self.add(f"{name}.bias", cout)

    def norm(self, name, c):  # GroupNorm or LayerNorm
        self.add(f"{name}.weight", c)
        self.add(f"{name}.bias", c)


def ldm_unet_shapes(ch, mult, num_res_blocks, attn_levels, context_dim, linear_proj, depth=1,
                    in_ch=4, out_ch=4, prefix="model.diffusion_model."):
    """openaimodel.UNetModel: input_blocks / middle_block / output_blocks with TimestepEmbedSequential."""
    s, temb = Shapes(), 4 * ch

    def resblock(name, cin, cout):
        s.norm(f"{name}.in_layers.0", cin)
        s.conv(f"{name}.in_layers.2", cin, cout)
        s.linear(f"{name}.emb_layers.1", temb, cout)
        s.norm(f"{name}.out_layers.0", cout)
        s.conv(f"{name}.out_layers.3", cout, cout)
        if cin != cout:
            s.conv(f"{name}.skip_connection", cin, cout, 1)

    def spatial_transformer(name, c):
        proj = s.linear if linear_proj else (lambda n, a, b: s.conv(n, a, b, 1))
        s.norm(f"{name}.norm", c)
        proj(f"{name}.proj_in", c, c)
        for d in range(depth):
            b = f"{name}.transformer_blocks.{d}"
            for attn, kv in (("attn1", c), ("attn2", context_dim)):
                s.linear(f"{b}.{attn}.to_q", c, c, bias=False)
                s.linear(f"{b}.{attn}.to_k", kv, c, bias=False)
                s.linear(f"{b}.{attn}.to_v", kv, c, bias=False)
                s.linear(f"{b}.{attn}.to_out.0", c, c)
            s.linear(f"{b}.ff.net.0.proj", c, 8 * c)  # GEGLU: value and gate, 4c each
            s.linear(f"{b}.ff.net.2", 4 * c, c)
            for k in (1, 2, 3):
                s.norm(f"{b}.norm{k}", c)
        proj(f"{name}.proj_out", c, c)

    s.linear("time_embed.0", ch, temb)
    s.linear("time_embed.2", temb, temb)
    s.conv("input_blocks.0.0", in_ch, ch)
    skips, cur, k = [ch], ch, 1
    for level, m in enumerate(mult):
        for _ in range(num_res_blocks):
            resblock(f"input_blocks.{k}.0", cur, m * ch)
            cur = m * ch
            if level in attn_levels:
                spatial_transformer(f"input_blocks.{k}.1", cur)
            skips.append(cur)
            k += 1
        if level < len(mult) - 1:
            s.conv(f"input_blocks.{k}.0.op", cur, cur)
            skips.append(cur)
            k += 1
    resblock("middle_block.0", cur, cur)
    spatial_transformer("middle_block.1", cur)
    resblock("middle_block.2", cur, cur)
    k = 0
    for level in reversed(range(len(mult))):
        for j in range(num_res_blocks + 1):
            resblock(f"output_blocks.{k}.0", cur + skips.pop(), mult[level] * ch)
            cur, layer = mult[level] * ch, 1
            if level in attn_levels:
                spatial_transformer(f"output_blocks.{k}.1", cur)
                layer = 2
            if level > 0 and j == num_res_blocks:
                s.conv(f"output_blocks.{k}.{layer}.conv", cur, cur)
            k += 1
    s.norm("out.0", ch)
    s.conv("out.2", ch, out_ch)
    return {prefix + k: v for k, v in s.items()}


def ldm_vae_shapes(ch, mult, num_res_blocks, z, in_ch=3, out_ch=3, prefix="first_stage_model."):
    """ldm.modules.diffusionmodules.model Encoder + Decoder, quant_conv, post_quant_conv."""
    s = Shapes()

    def block(name, cin, cout):
        s.norm(f"{name}.norm1", cin)
        s.conv(f"{name}.conv1", cin, cout)
        s.norm(f"{name}.norm2", cout)
        s.conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            s.conv(f"{name}.nin_shortcut", cin, cout, 1)

    def mid(coder, c):
        block(f"{coder}.mid.block_1", c, c)
        s.norm(f"{coder}.mid.attn_1.norm", c)
        for p in ("q", "k", "v", "proj_out"):  # AttnBlock: 1x1 convs
            s.conv(f"{coder}.mid.attn_1.{p}", c, c, 1)
        block(f"{coder}.mid.block_2", c, c)

    s.conv("encoder.conv_in", in_ch, ch)
    cur = ch
    for i, m in enumerate(mult):
        for j in range(num_res_blocks):
            block(f"encoder.down.{i}.block.{j}", cur, m * ch)
            cur = m * ch
        if i < len(mult) - 1:
            s.conv(f"encoder.down.{i}.downsample.conv", cur, cur)
    mid("encoder", cur)
    s.norm("encoder.norm_out", cur)
    s.conv("encoder.conv_out", cur, 2 * z)
    s.conv("quant_conv", 2 * z, 2 * z, 1)
    s.conv("post_quant_conv", z, z, 1)
    s.conv("decoder.conv_in", z, cur)
    mid("decoder", cur)
    for level in reversed(range(len(mult))):
        for j in range(num_res_blocks + 1):
            block(f"decoder.up.{level}.block.{j}", cur, mult[level] * ch)
            cur = mult[level] * ch
        if level > 0:
            s.conv(f"decoder.up.{level}.upsample.conv", cur, cur)
    s.norm("decoder.norm_out", cur)
    s.conv("decoder.conv_out", cur, out_ch)
    return {prefix + k: v for k, v in s.items()}


def ldm_clip_shapes(vocab, width, layers, inter, ctx, text_model_level=True):
    """transformers-4 CLIPTextModel as saved inside FrozenCLIPEmbedder (position_ids included)."""
    s = Shapes()
    s.add("embeddings.token_embedding.weight", vocab, width)
    s.add("embeddings.position_embedding.weight", ctx, width)
    s.add("embeddings.position_ids", 1, ctx)
    for i in range(layers):
        b = f"encoder.layers.{i}"
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s.linear(f"{b}.self_attn.{p}", width, width)
        s.norm(f"{b}.layer_norm1", width)
        s.linear(f"{b}.mlp.fc1", width, inter)
        s.linear(f"{b}.mlp.fc2", inter, width)
        s.norm(f"{b}.layer_norm2", width)
    s.norm("final_layer_norm", width)
    level = "text_model." if text_model_level else ""
    return {f"cond_stage_model.transformer.{level}{k}": v for k, v in s.items()}


def openclip_shapes(vocab, width, layers, inter, ctx, embed_dim, prefix="cond_stage_model.model."):
    """OpenCLIP text tower (FrozenOpenCLIPEmbedder deletes the visual tower)."""
    s = Shapes()
    s.add("token_embedding.weight", vocab, width)
    s.add("positional_embedding", ctx, width)
    for i in range(layers):
        b = f"transformer.resblocks.{i}"
        s.norm(f"{b}.ln_1", width)
        s.add(f"{b}.attn.in_proj_weight", 3 * width, width)
        s.add(f"{b}.attn.in_proj_bias", 3 * width)
        s.linear(f"{b}.attn.out_proj", width, width)
        s.norm(f"{b}.ln_2", width)
        s.linear(f"{b}.mlp.c_fc", width, inter)
        s.linear(f"{b}.mlp.c_proj", inter, width)
    s.norm("ln_final", width)
    s.add("text_projection", width, embed_dim)
    s.add("logit_scale")
    s.add("attn_mask", ctx, ctx)
    return {prefix + k: v for k, v in s.items()}


def random_state(shapes, seed=0, device="cpu"):
    """Random tensors of a size that keeps activations O(1): norms near 1, weights ~ 1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in sorted(shapes.items()):
        if device == "meta":
            out[k] = torch.empty(shape, device="meta")
        elif k.endswith("position_ids"):
            out[k] = torch.arange(shape[-1]).expand(shape).clone()
        elif len(shape) >= 2:
            fan_in = max(1, torch.Size(shape[1:]).numel())
            out[k] = torch.randn(shape, generator=g) / fan_in**0.5
        elif len(shape) == 1 and k.endswith(".weight") and ("norm" in k or "ln_" in k):
            out[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[k] = 0.1 * torch.randn(shape, generator=g)
    return out


# ----------------------------------------------------------------------------------------------
# Tiny configs (diffusers / transformers names) and the matching LDM descriptions

UNET_SD1 = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64, 64],
                layers_per_block=2, cross_attention_dim=24, attention_head_dim=4, norm_num_groups=32,
                down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
UNET_SD2 = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64],
                layers_per_block=1, cross_attention_dim=48, attention_head_dim=[2, 4], norm_num_groups=32,
                use_linear_projection=True, upcast_attention=True,
                down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])


def unet_ldm_for(cfg, depth=1):
    n = len(cfg["block_out_channels"])
    return ldm_unet_shapes(cfg["block_out_channels"][0], [c // cfg["block_out_channels"][0] for c in cfg["block_out_channels"]],
                           cfg["layers_per_block"], {i for i in range(n) if "CrossAttn" in cfg["down_block_types"][i]},
                           cfg["cross_attention_dim"], cfg.get("use_linear_projection", False), depth)


VAE_CFG = dict(in_channels=3, out_channels=3, block_out_channels=[32, 64], layers_per_block=1, latent_channels=4,
               norm_num_groups=32, sample_size=32,
               down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
VAE_LDM = dict(ch=32, mult=[1, 2], num_res_blocks=1, z=4)

CLIP_CFG = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, hidden_act="quick_gelu", projection_dim=32, bos_token_id=97,
                eos_token_id=98, pad_token_id=1)
# OpenCLIP: diffusers hard-codes the 24th resblock (index 23) as the one SD 2 drops, so the tiny
# tower keeps 24 layers (narrow ones) for an exact comparison.
OPENCLIP_CFG = dict(vocab_size=99, hidden_size=16, intermediate_size=24, num_hidden_layers=23, num_attention_heads=2,
                    max_position_embeddings=16, hidden_act="gelu", projection_dim=12, bos_token_id=97,
                    eos_token_id=98, pad_token_id=1)
OPENCLIP_LDM = dict(vocab=99, width=16, layers=24, inter=24, ctx=16, embed_dim=12)


def assert_same_state(ours, theirs, what):
    assert sorted(ours) == sorted(theirs), (
        f"{what}: only ours {sorted(ours.keys() - theirs.keys())[:5]}, only diffusers {sorted(theirs.keys() - ours.keys())[:5]}")
    for k in theirs:
        assert ours[k].shape == theirs[k].shape, f"{what}: {k} {tuple(ours[k].shape)} vs {tuple(theirs[k].shape)}"
        if ours[k].device.type != "meta":
            assert torch.equal(ours[k], theirs[k]), f"{what}: {k} differs"


def strip_text_model(state):
    """transformers >= 5 saves/loads a bare CLIPTextModel without the `text_model.` level."""
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------------------------
# Conversion: minidiff's templates against diffusers' converters


@pytest.mark.parametrize("cfg,depth", [(UNET_SD1, 1), (UNET_SD2, 1), (UNET_SD2, 2)],
                         ids=["sd1-conv-proj", "sd2-linear-proj", "sd2-two-transformer-layers"])
def test_unet_conversion_matches_diffusers(cfg, depth):
    ckpt = random_state(unet_ldm_for(cfg, depth))
    ckpt["model_ema.decay"] = torch.tensor(0.9999)  # training-checkpoint extra, to be ignored
    theirs = dsf.convert_ldm_unet_checkpoint(ckpt, cfg)
    # The LDM description above is the official layout: diffusers' model accepts its conversion.
    ref = diffusers.UNet2DConditionModel(**cfg, transformer_layers_per_block=depth)
    ref.load_state_dict(theirs, strict=True)
    assert_same_state(sf.convert_unet(ckpt, cfg), theirs, "unet")


@pytest.mark.parametrize("prefix", ["first_stage_model.", ""], ids=["in-full-checkpoint", "standalone-vae"])
def test_vae_conversion_matches_diffusers(prefix):
    ckpt = random_state(ldm_vae_shapes(**VAE_LDM, prefix=prefix))
    assert ckpt[f"{prefix}encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)  # conv in the file
    theirs = dsf.convert_ldm_vae_checkpoint(ckpt, VAE_CFG)
    diffusers.AutoencoderKL(**VAE_CFG).load_state_dict(theirs, strict=True)
    ours = sf.convert_vae(ckpt, VAE_CFG, prefix=prefix)
    assert ours["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)  # Linear in diffusers
    assert_same_state(ours, theirs, "vae")


@pytest.mark.parametrize("text_model_level", [True, False], ids=["text_model.", "old-no-text_model."])
def test_clip_sd1_conversion_matches_diffusers(text_model_level):
    ckpt = random_state(ldm_clip_shapes(99, 32, 2, 37, 16, text_model_level))
    theirs = dsf.convert_ldm_clip_checkpoint(ckpt)
    # diffusers keeps the position_ids buffer (transformers >= 4.31 no longer saves it); we drop it.
    theirs = {k: v for k, v in theirs.items() if not k.endswith("position_ids")}
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_CFG)).load_state_dict(strip_text_model(theirs), strict=True)
    if not text_model_level:  # diffusers strips the prefix only; minidiff adds the missing level
        theirs = {f"text_model.{k}": v for k, v in theirs.items()}
    assert_same_state(sf.convert_clip_sd1(ckpt), theirs, "clip")


def test_openclip_conversion_matches_diffusers():
    ckpt = random_state(openclip_shapes(**OPENCLIP_LDM))
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(**OPENCLIP_CFG))
    theirs = dsf.convert_open_clip_checkpoint(hf, ckpt)  # drops resblocks.23 and text_projection
    hf.load_state_dict(strip_text_model(theirs), strict=True)
    assert_same_state(sf.convert_openclip_sd2(ckpt, num_layers=23), theirs, "openclip")

    # All 24 layers and the projection: diffusers' SDXL-refiner prefix runs the same converter
    # without the SD 2 skip list.
    refiner = {k.replace("cond_stage_model.model.", "conditioner.embedders.0.model."): v for k, v in ckpt.items()}
    theirs = dsf.convert_open_clip_checkpoint(hf, refiner, prefix="conditioner.embedders.0.model.")
    assert theirs["text_projection.weight"].shape == (12, 16)  # (projection_dim, hidden): transposed
    assert_same_state(sf.convert_openclip_sd2(ckpt, num_layers=24, with_projection=True), theirs, "openclip+proj")


# Full-size official layouts (shapes only, on the meta device): LDM names -> both converters ->
# exactly the keys and shapes of minidiff's models built from the official configs.
FULL = {
    "stable-diffusion-v1-5": dict(unet=dict(ch=320, mult=[1, 2, 4, 4], num_res_blocks=2, attn_levels={0, 1, 2},
                                            context_dim=768, linear_proj=False),
                                  text=ldm_clip_shapes(49408, 768, 12, 3072, 77)),
    "stable-diffusion-2-1": dict(unet=dict(ch=320, mult=[1, 2, 4, 4], num_res_blocks=2, attn_levels={0, 1, 2},
                                           context_dim=1024, linear_proj=True),
                                 text=openclip_shapes(49408, 1024, 24, 4096, 77, 1024)),
}


@pytest.mark.parametrize("family", list(FULL))
def test_full_size_official_layout(family):
    from minidiff.loading import check_state_dict
    from minidiff.models.clip import CLIPTextModel
    from minidiff.models.unet import UNet2DConditionModel
    from minidiff.models.vae import AutoencoderKL

    if not (sf.CONFIGS_DIR / family / "unet" / "config.json").is_file():
        pytest.skip(f"minidiff/data/configs/{family} is not there yet")
    shapes = {**ldm_unet_shapes(**FULL[family]["unet"]), **ldm_vae_shapes(128, [1, 2, 4, 4], 2, 4),
              **FULL[family]["text"]}
    assert sf.detect_family(list(shapes), shapes.__getitem__) == family
    ckpt = random_state(shapes, device="meta")
    cfg = {sub: sf.resolve_config(None, sub, family) for sub in ("unet", "vae", "text_encoder")}
    if family == "stable-diffusion-v1-5":
        theirs = {k: v for k, v in dsf.convert_ldm_clip_checkpoint(ckpt).items() if "position_ids" not in k}
        ours = sf.convert_clip_sd1(ckpt)
    else:
        with torch.device("meta"):
            hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg["text_encoder"]))
        theirs = dsf.convert_open_clip_checkpoint(hf, ckpt)
        ours = sf.convert_openclip_sd2(ckpt, cfg["text_encoder"]["num_hidden_layers"])
    converted = [(UNet2DConditionModel, "unet", sf.convert_unet(ckpt, cfg["unet"]),
                  dsf.convert_ldm_unet_checkpoint(ckpt, cfg["unet"])),
                 (AutoencoderKL, "vae", sf.convert_vae(ckpt, cfg["vae"]), dsf.convert_ldm_vae_checkpoint(ckpt, cfg["vae"])),
                 (CLIPTextModel, "text_encoder", ours, theirs)]
    for cls, sub, ours, theirs in converted:
        assert_same_state(ours, theirs, f"{family} {sub}")
        with torch.device("meta"):
            model = cls.from_config(cfg[sub])
        check_state_dict({k: v.shape for k, v in model.state_dict().items()}, ours, f"{family} {sub}")


# ----------------------------------------------------------------------------------------------
# Loading a synthetic single file: minidiff.from_single_file against diffusers' from_single_file


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny full checkpoints (SD 1-like and SD 2-like) and a diffusers config folder for each."""
    root = tmp_path_factory.mktemp("single_file")
    out = {}
    for family, unet_cfg, text_shapes, text_cfg in [
        ("sd1", UNET_SD1, ldm_clip_shapes(99, 32, 2, 37, 16), CLIP_CFG),
        ("sd2", UNET_SD2, openclip_shapes(**OPENCLIP_LDM), OPENCLIP_CFG),
    ]:
        shapes = {**unet_ldm_for(unet_cfg), **ldm_vae_shapes(**VAE_LDM), **text_shapes}
        ckpt = random_state(shapes, seed=len(family))
        ckpt["model_ema.decay"] = torch.tensor(0.9999)
        path = root / f"{family}.safetensors"
        save_file(ckpt, str(path))
        folder = root / f"{family}-configs"
        write_json(folder / "unet" / "config.json", {"_class_name": "UNet2DConditionModel", **unet_cfg})
        write_json(folder / "vae" / "config.json", {"_class_name": "AutoencoderKL", **VAE_CFG})
        transformers.CLIPTextConfig(**text_cfg).save_pretrained(folder / "text_encoder")
        out[family] = dict(path=path, folder=folder, ckpt=ckpt, unet=unet_cfg, text=text_cfg)
    return out


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_unet_from_single_file(checkpoints, family):
    from minidiff.models.unet import UNet2DConditionModel

    c = checkpoints[family]
    ours = UNet2DConditionModel.from_single_file(c["path"], config=c["unet"])  # config as a dict
    ref = diffusers.UNet2DConditionModel.from_single_file(str(c["path"]), config=str(c["folder"]), subfolder="unet")
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 7, c["unet"]["cross_attention_dim"])
    with torch.no_grad():
        assert_rel_close(ours(x, t, context).sample, ref(x, t, context).sample, RTOL, f"{family} unet")


def test_vae_from_single_file(checkpoints, tmp_path):
    from minidiff.models.vae import AutoencoderKL

    c = checkpoints["sd1"]
    ours = AutoencoderKL.from_single_file(c["path"], config=c["folder"] / "vae")  # a component folder
    ref = diffusers.AutoencoderKL.from_single_file(str(c["path"]), config=str(c["folder"]), subfolder="vae")
    x, z = torch.rand(1, 3, 32, 32) * 2 - 1, torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        q, q_ref = ours.encode(x).latent_dist, ref.encode(x).latent_dist
        assert_rel_close(q.mean, q_ref.mean, RTOL, "vae mean")
        assert_rel_close(q.std, q_ref.std, RTOL, "vae std")
        assert_rel_close(ours.decode(z).sample, ref.decode(z).sample, RTOL, "vae decode")
    half = AutoencoderKL.from_single_file(c["path"], config=c["folder"], torch_dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    # A VAE released on its own (no prefix, training extras beside it) loads the same weights.
    alone = {k.removeprefix("first_stage_model."): v for k, v in c["ckpt"].items() if k.startswith("first_stage_model.")}
    save_file({**alone, "model_ema.decay": torch.tensor(0.9999)}, str(tmp_path / "vae.safetensors"))
    standalone = AutoencoderKL.from_single_file(tmp_path / "vae.safetensors", config=VAE_CFG)
    with torch.no_grad():
        assert torch.equal(standalone.decode(z).sample, ours.decode(z).sample)


def token_ids(vocab, eos, n=16):
    ids = torch.randint(0, eos - 1, (2, n))
    ids[0, 5], ids[1, -1] = eos, eos  # the pooled output is read at the EOS token
    return ids


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_text_encoder_from_single_file(checkpoints, family):
    from minidiff.models.clip import CLIPTextModel, CLIPTextModelWithProjection

    c = checkpoints[family]
    ours = CLIPTextModel.from_single_file(c["path"], config=c["folder"])  # a pipeline folder
    # diffusers' single-file CLIP loader, as StableDiffusionPipeline.from_single_file calls it
    ref = dsf.create_diffusers_clip_model_from_ldm(transformers.CLIPTextModel, c["ckpt"], config=str(c["folder"]),
                                                   subfolder="text_encoder", local_files_only=True)
    assert len(ours.text_model.encoder.layers) == c["text"]["num_hidden_layers"]
    ids = token_ids(c["text"]["vocab_size"], c["text"]["eos_token_id"])
    with torch.no_grad():
        out, expected = ours(ids), ref(ids)
        assert_rel_close(out.last_hidden_state, expected.last_hidden_state, RTOL, f"{family} text states")
        assert_rel_close(out.pooler_output, expected.pooler_output, RTOL, f"{family} pooled")
    if family == "sd2":
        # diffusers leaves the projection of an SD 2 file unloaded (on the meta device); minidiff
        # loads it. Reference: OpenCLIP's own formula, text_embeds = pooled @ text_projection.
        proj = CLIPTextModelWithProjection.from_single_file(c["path"], config=c["folder"])
        with torch.no_grad():
            expected_embeds = expected.pooler_output @ c["ckpt"]["cond_stage_model.model.text_projection"]
            assert_rel_close(proj(ids).text_embeds, expected_embeds, RTOL, "sd2 text_embeds")


# ----------------------------------------------------------------------------------------------
# Defaults and bad input


def test_default_config_follows_the_file(checkpoints):
    sd1, sd2 = (list(checkpoints[f]["ckpt"]) for f in ("sd1", "sd2"))
    assert sf.detect_family(sd1, lambda k: checkpoints["sd1"]["ckpt"][k].shape) == sf.SD1
    assert sf.detect_family(sd2, lambda k: checkpoints["sd2"]["ckpt"][k].shape) == sf.SD2
    # A UNet-only SD 2 file is recognised by its 1024-wide cross-attention context.
    unet_only = ldm_unet_shapes(**FULL["stable-diffusion-2-1"]["unet"])
    assert sf.detect_family(list(unet_only), unet_only.__getitem__) == sf.SD2
    if (sf.CONFIGS_DIR / "stable-diffusion-2-1-base").is_dir():
        base = sf.resolve_config("stable-diffusion-2-1-base", "unet", sf.SD2)
        assert base == json.loads((sf.CONFIGS_DIR / "stable-diffusion-2-1-base" / "unet" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="No unet config"):
        sf.resolve_config(checkpoints["sd1"]["path"].parent, "unet", sf.SD1)


def test_bad_input(checkpoints, tmp_path):
    import pickle

    from minidiff.models.clip import CLIPTextModel
    from minidiff.models.unet import UNet2DConditionModel
    from minidiff.models.vae import AutoencoderKL

    c = checkpoints["sd1"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AutoencoderKL.from_single_file(tmp_path / "nope.safetensors", config=VAE_CFG)

    # A pickle that would create a file if it were ever unpickled: it must be refused unread.
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("model.ckpt", "pickle-in-disguise.safetensors"):
        (tmp_path / name).write_bytes(pickle.dumps({"state_dict": Payload()}))
        with pytest.raises(ValueError, match="pickle|not a readable safetensors"):
            UNet2DConditionModel.from_single_file(tmp_path / name, config=c["unet"])
    assert not marker.exists()

    unet_only = tmp_path / "unet-only.safetensors"
    save_file({k: v for k, v in c["ckpt"].items() if k.startswith("model.diffusion_model.")}, str(unet_only))
    with pytest.raises(ValueError, match="no keys starting with 'first_stage_model.'"):
        AutoencoderKL.from_single_file(unet_only, config=VAE_CFG)
    with pytest.raises(ValueError, match="cond_stage_model.transformer."):
        CLIPTextModel.from_single_file(unet_only, config=CLIP_CFG)

    # The SD 2-like UNet config does not fit the SD 1-like weights: the strict loader lists why.
    with pytest.raises(ValueError, match="missing key|unexpected key|wrong shape"):
        UNet2DConditionModel.from_single_file(c["path"], config=UNET_SD2)
    with pytest.raises(ValueError, match="not part of an SD checkpoint"):
        sf.load_model(torch.nn.Linear, c["path"])
