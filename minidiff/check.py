"""`minidiff check MODEL`: load a checkpoint into minidiff and into the reference libraries, run
every component on the same random inputs, and print a per-component error table.

This is how a user with a network and a GPU verifies minidiff on the official weights:

    minidiff check stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --dtype float16

The test suite runs it offline on a tiny random checkpoint (minidiff.reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from minidiff.loading import read_json, resolve_folder

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A red circle and a blue square on a white background.",
    "",
    "Crème brûlée, 3 spoons & a café au lait — 🍮☕",
    "a very long prompt " + "with many many words " * 30,
]


@dataclass
class Row:
    component: str
    what: str
    max_abs: float
    max_rel: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance


def _compare(component: str, what: str, ours: torch.Tensor, ref: torch.Tensor, tol: float) -> Row:
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    if ours.shape != ref.shape:
        return Row(component, f"{what} (shape {tuple(ours.shape)} vs {tuple(ref.shape)})", math.inf, math.inf, tol)
    diff = (ours - ref).abs().max().item()
    return Row(component, what, diff, diff / max(ref.abs().max().item(), 1e-30), tol)


def _tolerance(dtype: torch.dtype) -> float:
    # fp32: both libraries do the same arithmetic in a different order (~1e-6 relative); fp16 and
    # bf16 keep 11 and 8 mantissa bits, and errors grow through the depth of a full-size model.
    return {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-4)


def check_unet(folder: Path, device, dtype, gen, latent_size: int) -> list[Row]:
    import diffusers

    from minidiff.models.unet import UNet2DConditionModel

    ours = UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype).to(device)
    ref = diffusers.UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
    cfg = ref.config
    x = torch.randn(1, cfg.in_channels, latent_size, latent_size, generator=gen).to(device, dtype)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=gen).to(device, dtype)
    t = torch.tensor([500], device=device)
    kwargs = {}
    if cfg.encoder_hid_dim_type == "image_proj":  # Kandinsky 2.2's decoder: conditioned on a CLIP image embedding
        kwargs["added_cond_kwargs"] = {"image_embeds": torch.randn(1, cfg.encoder_hid_dim, generator=gen).to(device, dtype)}
        ctx = None
    with torch.no_grad():
        a = ours(x, t, ctx, **kwargs).sample
        b = ref(x, t, ctx, **kwargs).sample
    return [_compare("unet", f"noise prediction at t=500, latent {latent_size}x{latent_size}", a, b, _tolerance(dtype))]


def check_vae(folder: Path, device, dtype, gen, image_size: int) -> list[Row]:
    import diffusers

    from minidiff.models.vae import AutoencoderKL

    ours = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype).to(device)
    ref = diffusers.AutoencoderKL.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
    x = (torch.rand(1, ref.config.in_channels, image_size, image_size, generator=gen) * 2 - 1).to(device, dtype)
    tol = _tolerance(dtype)
    with torch.no_grad():
        ours_d, ref_d = ours.encode(x).latent_dist, ref.encode(x).latent_dist
        z = ref_d.mean
        return [
            _compare("vae", "encode: posterior mean", ours_d.mean, ref_d.mean, tol),
            _compare("vae", "encode: posterior std", ours_d.std, ref_d.std, tol),
            _compare("vae", "decode", ours.decode(z).sample, ref.decode(z).sample, tol),
        ]


def check_movq(folder: Path, device, dtype, gen, image_size: int) -> list[Row]:
    import diffusers

    from minidiff.models.vq import VQModel

    ours = VQModel.from_pretrained(folder, torch_dtype=dtype).to(device)
    ref = diffusers.VQModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
    x = (torch.rand(1, ref.config.in_channels, image_size, image_size, generator=gen) * 2 - 1).to(device, dtype)
    tol = _tolerance(dtype)
    with torch.no_grad():
        z = ref.encode(x).latents
        return [
            _compare("movq", "encode: latents", ours.encode(x).latents, z, tol),
            _compare("movq", "decode (force_not_quantize, as the pipeline)", ours.decode(z, force_not_quantize=True).sample,
                     ref.decode(z, force_not_quantize=True).sample, tol),
        ]


def check_text_encoder(name: str, cls_name: str, folder: Path, tokenizer_folder: Path | None, device, dtype, gen) -> list[Row]:
    import transformers

    from minidiff.models import clip

    ours = getattr(clip, cls_name).from_pretrained(folder, torch_dtype=dtype).to(device)
    ref = getattr(transformers, cls_name).from_pretrained(folder, torch_dtype=dtype).to(device).eval()
    if tokenizer_folder is not None:
        ids = transformers.CLIPTokenizer.from_pretrained(tokenizer_folder)(
            PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    else:
        ids = torch.randint(0, ref.config.vocab_size, (len(PROMPTS), 77), generator=gen)
    ids = ids.to(device)
    tol = _tolerance(dtype)
    with torch.no_grad():
        a, b = ours(ids, output_hidden_states=True), ref(ids, output_hidden_states=True)
    rows = [_compare(name, "last hidden state", a[0] if cls_name == "CLIPTextModel" else a.last_hidden_state, b.last_hidden_state, tol),
            _compare(name, "penultimate hidden state (clip_skip=1)", a.hidden_states[-2], b.hidden_states[-2], tol)]
    if cls_name == "CLIPTextModel":
        rows.append(_compare(name, "pooled output", a.pooler_output, b.pooler_output, tol))
    else:
        rows.append(_compare(name, "text_embeds", a.text_embeds, b.text_embeds, tol))
    return rows


def check_image_encoder(folder: Path, device, dtype, gen) -> list[Row]:
    import transformers

    from minidiff.models.clip import CLIPVisionModelWithProjection

    ours = CLIPVisionModelWithProjection.from_pretrained(folder, torch_dtype=dtype).to(device)
    ref = transformers.CLIPVisionModelWithProjection.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
    size = ref.config.image_size
    x = torch.randn(2, ref.config.num_channels, size, size, generator=gen).to(device, dtype)
    with torch.no_grad():
        return [_compare("image_encoder", "image_embeds", ours(x).image_embeds, ref(x).image_embeds, _tolerance(dtype))]


def check_tokenizer(folder: Path) -> list[Row]:
    import transformers

    from minidiff.tokenizer import CLIPTokenizer

    kwargs = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    a = CLIPTokenizer.from_pretrained(folder, subfolder=None)(PROMPTS, **kwargs).input_ids
    b = transformers.CLIPTokenizer.from_pretrained(folder)(PROMPTS, **kwargs).input_ids
    wrong = (a != b).any(dim=1).sum().item()
    # "max_abs" here is the number of prompts whose ids differ: it must be exactly 0.
    return [Row("tokenizer", f"ids of {len(PROMPTS)} prompts (count of prompts that differ)", wrong, float(wrong), 0.0)]


def check_scheduler(folder: Path, gen) -> list[Row]:
    import diffusers

    from minidiff.schedulers.ddim import DDIMScheduler

    config = read_json(folder, "scheduler_config.json")
    ours, ref = DDIMScheduler.from_config(config), diffusers.DDIMScheduler.from_config(config)
    ours.set_timesteps(50)
    ref.set_timesteps(50)
    rows = [_compare("scheduler", "DDIM timesteps (50 steps)", ours.timesteps.double(), ref.timesteps.double(), 0.0)]
    x = torch.randn(1, 4, 8, 8, generator=gen)
    eps = torch.randn(1, 4, 8, 8, generator=gen)
    t = int(ref.timesteps[10])
    # Both build the same float32 alpha_bar table; minidiff forms the step's scalar coefficients
    # in float64, diffusers in float32, so float32 samples agree to float32 rounding (~1e-7).
    rows.append(_compare("scheduler", f"DDIM step at t={t} (float32)", ours.step(eps, t, x).prev_sample,
                         ref.step(eps, t, x).prev_sample, 1e-6))
    return rows


def run_check(
    path_or_repo_id: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    latent_size: int = 32,
    image_size: int = 64,
) -> list[Row]:
    """Compare every component named in model_index.json; return the table rows."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a "Loading weights" bar per reference model
    root = resolve_folder(path_or_repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"])
    index = read_json(root, "model_index.json")
    gen = torch.Generator().manual_seed(seed)
    rows: list[Row] = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[1] is None:
            continue
        # resolve_folder's message names the missing subfolder and what the folder holds instead.
        cls_name, folder = spec[1], resolve_folder(root, name)
        if cls_name == "UNet2DConditionModel":
            rows += check_unet(folder, device, dtype, gen, latent_size)
        elif cls_name == "AutoencoderKL":
            rows += check_vae(folder, device, dtype, gen, image_size)
        elif cls_name == "VQModel":
            rows += check_movq(folder, device, dtype, gen, image_size)
        elif cls_name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            tok = root / "tokenizer" if (root / "tokenizer").is_dir() else None
            rows += check_text_encoder(name, cls_name, folder, tok, device, dtype, gen)
        elif cls_name == "CLIPVisionModelWithProjection":
            rows += check_image_encoder(folder, device, dtype, gen)
        elif cls_name in ("CLIPTokenizer", "CLIPTokenizerFast"):
            rows += check_tokenizer(folder)
        elif name == "scheduler":
            rows += check_scheduler(folder, gen)
    return rows


def format_table(rows: list[Row]) -> str:
    head = f"{'component':<14} {'output':<58} {'max abs err':>12} {'max rel err':>12} {'tolerance':>10}  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.component:<14} {r.what[:58]:<58} {r.max_abs:>12.3e} {r.max_rel:>12.3e} {r.tolerance:>10.1e}  {'yes' if r.ok else 'NO'}")
    return "\n".join(lines)
