"""Original single-file Stable Diffusion checkpoints (LDM / CompVis layout) -> minidiff models.

Stability AI and CompVis released SD 1.x / 2.x as ONE file holding the whole latent diffusion
model (`v1-5-pruned-emaonly.safetensors`, `v2-1_768-ema-pruned.safetensors`), with the key names
of the original code (github.com/CompVis/stable-diffusion, github.com/Stability-AI/stablediffusion).
minidiff's models use the diffusers / transformers key names, so loading such a file is a renaming,
plus three small tensor surgeries:

    component      prefix in the file                   minidiff model
    UNet           model.diffusion_model.               UNet2DConditionModel
    VAE            first_stage_model.                   AutoencoderKL
    SD 1 text      cond_stage_model.transformer.        CLIPTextModel (already transformers' names)
    SD 2 text      cond_stage_model.model.              CLIPTextModel (OpenCLIP names)

    surgery 1  VAE mid-block attention: q, k, v, proj_out are 1x1 convs (C, C, 1, 1) in LDM and
               Linear layers (C, C) in diffusers: drop the two trailing axes.
    surgery 2  OpenCLIP packs q, k, v into one `in_proj_weight` (3D, D): split it in three.
    surgery 3  OpenCLIP's `text_projection` is used as x @ P with P (D, P_dim); a Linear stores its
               transpose (P_dim, D).

`Model.from_single_file(path)` comes from `SingleFileMixin` at the end of this file, which the
UNet, VAE and CLIP text classes list beside `PretrainedMixin`; the last steps (meta-device build,
dtype cast, strict load, eval) are loading.py's `build_loaded`, the same as `from_pretrained`'s.

The UNet and VAE maps depend on the architecture (blocks per level, which levels have attention),
so they are generated from the diffusers config as templates, not written out as tables. Each map
takes LDM *module* paths to diffusers module paths (plus renames of the leaves inside the module);
a key is converted by its longest mapped module prefix. A key no template covers keeps its LDM
name, so the strict loader lists it as "unexpected" instead of it being dropped silently.

What is deliberately skipped (all as diffusers does):
    - `model_ema.*`: full (non-pruned) training checkpoints also hold EMA copies under flattened
      names; the weights under `model.diffusion_model.` are used (in "-emaonly" files they ARE the EMA).
    - SD 1 `...embeddings.position_ids`: a saved arange buffer, no learned weight.
    - SD 2 OpenCLIP: `logit_scale`, `attn_mask` and the last resblock. SD 2 conditions on the
      penultimate layer (`layer="penultimate"` in FrozenOpenCLIPEmbedder), so the text encoder has
      23 of the 24 layers (num_hidden_layers in text_encoder/config.json decides). `text_projection`
      is used only by CLIPTextModelWithProjection.

Only .safetensors files are read. A .ckpt is a Python pickle, and unpickling can run any code the
file contains: we refuse it and say how to convert it once.

References:
    CompVis ldm/modules/diffusionmodules/openaimodel.py (UNetModel), .../model.py (Encoder, Decoder),
    ldm/modules/encoders/modules.py (FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder);
    diffusers loaders/single_file_utils.py (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
    convert_ldm_clip_checkpoint, convert_open_clip_checkpoint): the reference in tests/test_single_file.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open

from minidiff.data import CONFIGS
from minidiff.errors import InputError
from minidiff.loading import build_loaded, read_json

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1: a transformers CLIPTextModel inside LDM
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2: an OpenCLIP text tower

# Official diffusers configs collected in the repository (unet/, vae/, text_encoder/ config.json).
CONFIGS_DIR = CONFIGS  # package data (minidiff/data/configs)
SD1, SD2 = "stable-diffusion-v1-5", "stable-diffusion-2-1"  # 2-1 is the 768-v model; 2-1-base via config=

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}

# Leaf renames inside one block. Keys are LDM names relative to the block, values diffusers names.
# LDM ResBlock: in_layers = [GroupNorm, SiLU, conv], out_layers = [GroupNorm, SiLU, Dropout, conv].
UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}  # norm1, conv1, norm2, conv2 are named alike
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                  "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
SAME: dict[str, str] = {}  # a block whose inner names already agree (e.g. the SpatialTransformer)

ModuleMap = dict[str, tuple[str, dict[str, str]]]  # LDM module path -> (diffusers path, leaf renames)


# ----------------------------------------------------------------------------------------------
# Key maps as templates


def unet_module_map(config: dict) -> ModuleMap:
    """LDM UNetModel module paths -> diffusers UNet2DConditionModel paths, for this config.

    LDM numbers its blocks in one flat list per side. With n levels and L = layers_per_block:
        input_blocks.0                 conv_in
        input_blocks.{(L+1)i + j + 1}  level i, layer j: .0 ResBlock, .1 SpatialTransformer
        input_blocks.{(L+1)(i+1)}      level i's downsampler (.0.op), for every level but the last
        middle_block.0 / .1 / .2       ResBlock, SpatialTransformer, ResBlock
        output_blocks.{(L+1)i + j}     up level i, layer j (L+1 layers): .0 ResBlock, .1 transformer,
                                       and after the last layer the upsampler (.1.conv, or .2.conv
                                       when .1 is a transformer)
    """
    L, n = int(config["layers_per_block"]), len(config["block_out_channels"])
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    m: ModuleMap = {
        "time_embed.0": ("time_embedding.linear_1", SAME),  # time_embed = [Linear, SiLU, Linear]
        "time_embed.2": ("time_embedding.linear_2", SAME),
        "input_blocks.0.0": ("conv_in", SAME),
        "middle_block.0": ("mid_block.resnets.0", UNET_RESNET),
        "middle_block.1": ("mid_block.attentions.0", SAME),
        "middle_block.2": ("mid_block.resnets.1", UNET_RESNET),
        "out.0": ("conv_norm_out", SAME),  # out = [GroupNorm, SiLU, conv]
        "out.2": ("conv_out", SAME),
    }
    for i in range(n):
        for j in range(L):
            k = (L + 1) * i + j + 1
            m[f"input_blocks.{k}.0"] = (f"down_blocks.{i}.resnets.{j}", UNET_RESNET)
            if down_attn[i]:
                m[f"input_blocks.{k}.1"] = (f"down_blocks.{i}.attentions.{j}", SAME)
        if i < n - 1:
            m[f"input_blocks.{(L + 1) * (i + 1)}.0.op"] = (f"down_blocks.{i}.downsamplers.0.conv", SAME)
        for j in range(L + 1):
            k = (L + 1) * i + j
            m[f"output_blocks.{k}.0"] = (f"up_blocks.{i}.resnets.{j}", UNET_RESNET)
            if up_attn[i]:
                m[f"output_blocks.{k}.1"] = (f"up_blocks.{i}.attentions.{j}", SAME)
        if i < n - 1:
            last = (L + 1) * i + L
            m[f"output_blocks.{last}.{2 if up_attn[i] else 1}.conv"] = (f"up_blocks.{i}.upsamplers.0.conv", SAME)
    return m


def vae_module_map(config: dict) -> ModuleMap:
    """LDM Encoder/Decoder module paths -> diffusers AutoencoderKL paths, for this config.

    The LDM decoder builds its levels deepest-first but stores them at their resolution index,
    so diffusers' up_blocks.{i} (i = 0 the deepest) is LDM's up.{n-1-i}; it has L+1 resnets.
    """
    L, n = int(config["layers_per_block"]), len(config["block_out_channels"])
    m: ModuleMap = {"quant_conv": ("quant_conv", SAME), "post_quant_conv": ("post_quant_conv", SAME)}
    for coder in ("encoder", "decoder"):
        m[f"{coder}.conv_in"] = (f"{coder}.conv_in", SAME)
        m[f"{coder}.mid.block_1"] = (f"{coder}.mid_block.resnets.0", VAE_RESNET)
        m[f"{coder}.mid.attn_1"] = (f"{coder}.mid_block.attentions.0", VAE_ATTENTION)
        m[f"{coder}.mid.block_2"] = (f"{coder}.mid_block.resnets.1", VAE_RESNET)
        m[f"{coder}.norm_out"] = (f"{coder}.conv_norm_out", SAME)
        m[f"{coder}.conv_out"] = (f"{coder}.conv_out", SAME)
    for i in range(n):
        for j in range(L):
            m[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET)
        if i < n - 1:
            m[f"encoder.down.{i}.downsample.conv"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv", SAME)
        level = n - 1 - i
        for j in range(L + 1):
            m[f"decoder.up.{level}.block.{j}"] = (f"decoder.up_blocks.{i}.resnets.{j}", VAE_RESNET)
        if level > 0:
            m[f"decoder.up.{level}.upsample.conv"] = (f"decoder.up_blocks.{i}.upsamplers.0.conv", SAME)
    return m


def _rename(state: dict[str, torch.Tensor], prefix: str, module_map: ModuleMap) -> dict[str, torch.Tensor]:
    """Keys under `prefix`, renamed by their longest mapped module path (unmapped ones unchanged)."""
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        parts = key[len(prefix):].split(".")
        new_key = ".".join(parts)
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if module in module_map:
                new_module, leaves = module_map[module]
                rest = ".".join(parts[cut:])
                for old, new in leaves.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                        break
                new_key = f"{new_module}.{rest}"
                break
        out[new_key] = value
    return out


# ----------------------------------------------------------------------------------------------
# Converters: full checkpoint state dict -> diffusers / transformers keyed state dict


def convert_unet(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    return _rename(state, UNET_PREFIX, unet_module_map(config))


def convert_vae(state: dict[str, torch.Tensor], config: dict, prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    out = _rename(state, prefix, vae_module_map(config))
    for key, value in out.items():
        if ".mid_block.attentions.0.to_" in key and value.ndim == 4:
            out[key] = value[:, :, 0, 0]  # surgery 1: 1x1 conv (C, C, 1, 1) -> Linear (C, C)
    return out


def convert_clip_sd1(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not key.startswith(CLIP_PREFIX) or key.endswith("embeddings.position_ids"):
            continue
        key = key[len(CLIP_PREFIX):]
        # transformers' CLIPTextModel gained the `text_model.` level after the first SD releases.
        out[key if key.startswith("text_model.") else f"text_model.{key}"] = value
    return out


def convert_openclip_sd2(state: dict[str, torch.Tensor], num_layers: int,
                         with_projection: bool = False) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower -> transformers CLIPTextModel keys, keeping resblocks 0..num_layers-1."""
    p, out = OPENCLIP_PREFIX, {}
    fixed = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
             "positional_embedding": "text_model.embeddings.position_embedding.weight",
             "ln_final.weight": "text_model.final_layer_norm.weight",
             "ln_final.bias": "text_model.final_layer_norm.bias"}
    for key, value in state.items():
        if not key.startswith(p):
            continue
        key = key[len(p):]
        if key in fixed:
            out[fixed[key]] = value
        elif key == "text_projection":
            if with_projection:
                out["text_projection.weight"] = value.T.contiguous()  # surgery 3: (D, P) -> (P, D)
        elif key.startswith("transformer.resblocks."):
            i, rest = key.removeprefix("transformer.resblocks.").split(".", 1)
            if int(i) >= num_layers:
                continue  # the layers after the one SD 2 conditions on
            layer = f"text_model.encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.removeprefix("attn.in_proj_")  # "weight" (3D, D) or "bias" (3D,)
                q, k, v = value.chunk(3, dim=0)  # surgery 2: rows [W_q; W_k; W_v], each (D, D)
                for name, part in zip("qkv", (q, k, v)):
                    out[f"{layer}self_attn.{name}_proj.{kind}"] = part
                continue
            module, leaf = rest.rsplit(".", 1)
            out[layer + f"{OPENCLIP_LAYER.get(module, module)}.{leaf}"] = value
        elif key not in ("logit_scale", "attn_mask"):
            out[key] = value  # unknown: left for the strict loader to report
    return out


# ----------------------------------------------------------------------------------------------
# Reading the file, choosing the config, building the model


COMPONENTS = {  # class name -> (config subfolder, what it is called, where its keys start)
    "UNet2DConditionModel": ("unet", "UNet", repr(UNET_PREFIX)),
    "AutoencoderKL": ("vae", "VAE", repr(VAE_PREFIX)),
    "CLIPTextModel": ("text_encoder", "text encoder", f"{CLIP_PREFIX!r} (SD 1) or {OPENCLIP_PREFIX!r} (SD 2)"),
    "CLIPTextModelWithProjection": ("text_encoder", "text encoder", f"{CLIP_PREFIX!r} (SD 1) or {OPENCLIP_PREFIX!r} (SD 2)"),
}
VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def component_prefix(name: str, keys: list[str]) -> str | None:
    """Where the keys of component `name` start in the file, or None when it has none."""
    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if name == "UNet2DConditionModel":
        return UNET_PREFIX if has(UNET_PREFIX) else None
    if name == "AutoencoderKL":
        if has(VAE_PREFIX):
            return VAE_PREFIX
        # A VAE released on its own in LDM names (e.g. vae-ft-mse-840000-ema-pruned.safetensors).
        return "" if "encoder.conv_in.weight" in keys else None
    return next((p for p in (OPENCLIP_PREFIX, CLIP_PREFIX) if has(p)), None)


def _open_safetensors(path: Path):
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(
            f"{str(path)!r} is a pickled PyTorch checkpoint ({path.suffix}). minidiff reads only "
            ".safetensors files: unpickling a file can run any code it contains. Convert it once, in an "
            "environment you trust, e.g.\n    import torch, safetensors.torch as st\n"
            f"    sd = torch.load({path.name!r}, weights_only=True, map_location='cpu')\n"
            "    sd = sd.get('state_dict', sd)\n"
            "    st.save_file({k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}, "
            f"{path.with_suffix('.safetensors').name!r})")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # SafetensorError / OSError for a bad header
        raise InputError(f"{str(path)!r} is not a readable safetensors file ({err}). It may be truncated, "
                         "or a pickled checkpoint with the wrong extension.") from err


def detect_family(keys: list[str], shape_of) -> str:
    """SD 2 has an OpenCLIP text encoder and a 1024-wide cross-attention context; SD 1 has 768."""
    if any(k.startswith(OPENCLIP_PREFIX) for k in keys):
        return SD2
    to_k = next((k for k in keys if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")), None)
    return SD2 if to_k is not None and shape_of(to_k)[-1] == 1024 else SD1


def resolve_config(config: str | os.PathLike | dict | None, subfolder: str, family: str) -> dict:
    """A dict is used as it is; a folder is a pipeline folder (with `subfolder/config.json`), a
    component folder (with `config.json`), or the name of a folder in minidiff/data/configs."""
    if isinstance(config, dict):
        return config
    folder = CONFIGS_DIR / family if config is None else Path(config).expanduser()
    if config is not None and not folder.exists() and (CONFIGS_DIR / str(config)).is_dir():
        folder = CONFIGS_DIR / str(config)  # a short name such as "stable-diffusion-2-1-base"
    if folder.is_file():
        return read_json(folder.parent, folder.name)
    for candidate in (folder / subfolder, folder):
        if (candidate / "config.json").is_file():
            return read_json(candidate, "config.json")
    raise FileNotFoundError(
        f"No {subfolder} config found for {str(folder)!r} (looked for {subfolder}/config.json and config.json). "
        "Pass config= a diffusers pipeline folder, a component folder, or the config dict.")


def load_model(cls, path: str | os.PathLike, config: str | os.PathLike | dict | None = None,
               torch_dtype: torch.dtype | None = None):
    """Build `cls` from its config and load its part of the single-file checkpoint at `path`.

    config: None picks minidiff/data/configs/stable-diffusion-v1-5 or -2-1 from the file's keys. The keys
        of 2-1 (768 px, v-prediction, upcast_attention) and 2-1-base (512 px) are identical, so
        pass config="stable-diffusion-2-1-base" for the base model.
    torch_dtype: converts the floating tensors; None keeps the file's dtype.
    """
    name = cls.__name__
    if name not in COMPONENTS:
        raise InputError(f"from_single_file supports {sorted(COMPONENTS)}; {name} is not part of an SD checkpoint.")
    subfolder, what, expected = COMPONENTS[name]
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {str(path)!r}: the path does not exist or is a folder.")

    with _open_safetensors(path) as f:  # read only this component's tensors, not the whole file
        keys = list(f.keys())
        family = detect_family(keys, lambda k: f.get_slice(k).get_shape())
        prefix = component_prefix(name, keys)
        if prefix is None:
            raise InputError(f"{str(path)!r} has no keys starting with {expected}, so it holds no {what}; "
                             "is it a full Stable Diffusion checkpoint in the original (LDM) layout?")
        state = {k: f.get_tensor(k) for k in keys if k.startswith(prefix) and (prefix or k.startswith(VAE_ROOTS))}

    cfg = resolve_config(config, subfolder, family)
    if name == "UNet2DConditionModel":
        state = convert_unet(state, cfg)
    elif name == "AutoencoderKL":
        state = convert_vae(state, cfg, prefix=prefix)
    elif prefix == CLIP_PREFIX:
        state = convert_clip_sd1(state)
    else:
        state = convert_openclip_sd2(state, int(cfg["num_hidden_layers"]),
                                     with_projection=name == "CLIPTextModelWithProjection")
    return build_loaded(cls, cfg, state, source=f"the {what} of {str(path)!r}", dtype=torch_dtype)


class SingleFileMixin:
    """`Model.from_single_file(path)` for the models an SD checkpoint holds (UNet, VAE, CLIP text
    encoder): a model class lists this mixin beside `PretrainedMixin`. It lives here, not on
    `PretrainedMixin`, so that loading.py never imports this file (which imports loading.py)."""

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, config: str | os.PathLike | dict | None = None,
                         torch_dtype: torch.dtype | None = None):
        """Load this component out of an original (LDM / CompVis) single-file checkpoint, e.g.
        `v1-5-pruned-emaonly.safetensors`; see `load_model` for `config` and `torch_dtype`."""
        return load_model(cls, path, config=config, torch_dtype=torch_dtype)
