"""Train a Kandinsky 2.2 decoder: the UNet that paints an image from its CLIP image embedding.

diffusers' train_text_to_image_decoder.py, written out (../shared/reference/kandinsky22-prior-training.md):

    frozen MoVQ encoder:            image x (B, 3, R, R) in [-1, 1] -> latent z_0 (B, 4, R/f, R/f)
                                    (`movq.encode(x).latents`: before the codebook, unscaled)
    frozen CLIP image encoder:      the same image -> image_embeds e (B, E)
    t ~ U{0, ..., 999}, eps ~ N(0, I)
    z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps        DDPM eq. 4, the decoder folder's scheduler
    loss = w_t || unet(z_t, t, added_cond_kwargs={"image_embeds": e})[:, :4] - eps ||^2
                                    the first 4 of the 8 output channels; the learned-variance
                                    half gets no gradient, as in the script (DDPM's fixed_small
                                    ignores it at sampling time); w_t = 1 or Min-SNR (min_snr.py)

The UNet is conditioned on the image's *own* embedding: at inference the prior supplies one from
text. No caption is used. The script never drops the condition, yet the pipeline guides with
scale 4 against `negative_image_embeds`, the image encoder's embedding of an all-zero image.
`--image_embed_dropout p` (default 0 = the script) replaces e by exactly that embedding with
probability p, so the unconditional branch the pipeline asks for has been trained.

Frozen encoders and no augmentation (resize + centre crop, as the script) mean every image's
latent and embedding are computed once (`encode_images`, cached in output_dir/latents.pt), and
the loop runs the UNet alone. The loop around one micro-batch (AdamW, learning-rate schedule,
accumulation, EMA, checkpoints, exact resume) is trainer.py's, shared with train-prior.

Inputs: `--pretrained_decoder_model_name_or_path` (a decoder folder: movq/, scheduler/, and unet/
to fine-tune, or `--unet_config` for a fresh UNet) and `--pretrained_prior_model_name_or_path`
(a prior folder: its image_encoder/ and image_processor/). At the end output_dir becomes a decoder
pipeline folder in kandinsky-2-2-decoder's layout (model_index.json, unet/, movq/, scheduler/).

Validation: the denoising loss on held-out images at fixed noise and timesteps (a number that
falls as the UNet learns, comparable across runs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from minidiff.errors import InputError
from minidiff.loading import write_json
from minidiff.training.captioned_images import CaptionedImage, read_captioned_images, shapes_captioned_images
from minidiff.training.checkpoints import resolve_checkpoint
from minidiff.training.min_snr import min_snr_weights
from minidiff.training.trainer import Trainer, add_loop_arguments, check_loop_arguments, check_output_dir, save_pipeline
from minidiff.validation import check_choice, check_number, check_positive_int


def load_frozen(decoder_folder: Path, prior_folder: Path, device="cpu") -> dict:
    """The frozen parts: movq and scheduler of the decoder folder, image_encoder and
    image_processor of the prior folder, all float32."""
    from minidiff.image_processor import CLIPImageProcessor
    from minidiff.models.clip import CLIPVisionModelWithProjection
    from minidiff.models.vq import VQModel
    from minidiff.schedulers.ddpm import DDPMScheduler

    return {
        "movq": VQModel.from_pretrained(decoder_folder, subfolder="movq", torch_dtype=torch.float32)
        .requires_grad_(False).eval().to(device),
        "scheduler": DDPMScheduler.from_pretrained(decoder_folder, subfolder="scheduler"),
        "image_encoder": CLIPVisionModelWithProjection.from_pretrained(prior_folder, subfolder="image_encoder",
                                                                       torch_dtype=torch.float32)
        .requires_grad_(False).eval().to(device),
        "image_processor": CLIPImageProcessor.from_pretrained(prior_folder, subfolder="image_processor"),
    }


def movq_pixels(images: list[PIL.Image.Image], resolution: int) -> torch.Tensor:
    """The script's train_transforms: shorter side resized to `resolution` (bilinear), centre crop,
    [0, 255] -> [-1, 1]. -> (B, 3, R, R)."""
    out = []
    for im in images:
        w, h = im.size
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        im = im.resize(size, PIL.Image.BILINEAR) if size != (w, h) else im
        left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(out)


def _fingerprint(pairs: list[CaptionedImage], frozen: dict, resolution: int) -> str:
    h = hashlib.sha256()
    for p in pairs:
        stat = (p.image.stat().st_size, p.image.stat().st_mtime_ns) if isinstance(p.image, Path) else ()
        h.update(json.dumps([str(p.image), *stat]).encode())
    for name in ("movq", "image_encoder"):
        h.update(repr(float(sum(w.double().abs().sum() for w in frozen[name].parameters()))).encode())
    h.update(str(resolution).encode())
    return h.hexdigest()


def zero_image_embed(frozen: dict) -> torch.Tensor:
    """(E,) float32 on the CPU: the prior pipeline's negative_image_embeds (kandinsky.zero_image_embed)."""
    from minidiff.pipelines.kandinsky import zero_image_embed as zero

    return zero(frozen["image_encoder"])[0].float().cpu()


@torch.no_grad()
def encode_images(pairs: list[CaptionedImage], frozen: dict, resolution: int, batch_size: int = 64,
                  cache: Path | None = None, progress: bool = True, desc: str = "encode images") -> dict:
    """Every image's MoVQ latent (N, 4, R/f, R/f) and CLIP image embedding (N, E), once, float32 on
    the CPU, plus the zero-image embedding (E,). `cache`: read back if made from the same images,
    encoders and resolution."""
    key = _fingerprint(pairs, frozen, resolution)
    if cache is not None and cache.is_file():
        stored = torch.load(cache, map_location="cpu", weights_only=True)
        if stored.get("key") == key:
            return stored
    movq, encoder = frozen["movq"], frozen["image_encoder"]
    device = next(movq.parameters()).device
    latents, embeds = [], []
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress):
        images = [p.load() for p in pairs[start:start + batch_size]]
        latents.append(movq.encode(movq_pixels(images, resolution).to(device)).latents.float().cpu())
        pixels = frozen["image_processor"](images=images, return_tensors="pt").pixel_values
        embeds.append(encoder(pixels.to(device)).image_embeds.float().cpu())
    data = {"key": key, "latents": torch.cat(latents), "image_embeds": torch.cat(embeds),
            "zero_embed": zero_image_embed(frozen)}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        torch.save(data, tmp)
        tmp.replace(cache)
    return data


def build_unet(folder: Path, unet_config: dict | str | None, embed_dim: int):
    """The UNet to train: a fresh one from `unet_config` (a dict or a config.json path), or
    folder/unet (fine-tuning). Its image-embedding width must be the image encoder's."""
    from minidiff.models.unet import UNet2DConditionModel

    if unet_config is not None:
        config = json.loads(Path(unet_config).read_text()) if isinstance(unet_config, (str, Path)) else unet_config
        unet = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    else:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)
    if unet.config.encoder_hid_dim != embed_dim:
        raise InputError(f"The UNet takes image embeddings of {unet.config.encoder_hid_dim} features "
                         f"(encoder_hid_dim) but the prior's image encoder makes {embed_dim}; they must match.")
    return unet


@torch.no_grad()
def validation_loss(unet, data: dict, scheduler, seed: int = 0, batch_size: int = 64) -> float:
    """Mean eps-MSE of the UNet on the held-out latents, with noise and timesteps fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    total, n = 0.0, len(data["latents"])
    for start in range(0, n, batch_size):
        z_0 = data["latents"][start:start + batch_size]
        eps = torch.randn(z_0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z_0),), generator=g)
        z_t = scheduler.add_noise(z_0, eps, t)
        pred = unet(z_t.to(device), t.to(device), None,
                    added_cond_kwargs={"image_embeds": data["image_embeds"][start:start + batch_size].to(device)}).sample
        total += float((pred[:, :z_0.shape[1]].float().cpu() - eps).pow(2).mean()) * len(z_0)
    unet.train(was_training)
    return total / n


def decoder_pipeline(unet, frozen: dict):
    from minidiff.pipelines.kandinsky_decoder import KandinskyV22Pipeline

    pipe = KandinskyV22Pipeline(unet=unet, scheduler=frozen["scheduler"], movq=frozen["movq"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_decoder(
    pretrained_decoder_model_name_or_path,
    pretrained_prior_model_name_or_path,
    output_dir,
    train_data_dir=None,
    dataset: str | None = None,
    num_train_samples: int = 20000,
    image_column: str = "image",
    caption_column: str = "text",
    resolution: int | None = None,
    validation_data_dir=None,
    num_validation_images: int = 200,
    validation_steps: int | None = None,
    unet_config: dict | str | None = None,
    train_batch_size: int = 1,
    max_train_steps: int = 1000,
    learning_rate: float = 1e-4,
    lr_scheduler: str = "constant",
    lr_warmup_steps: int = 500,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    adam_weight_decay: float = 0.0,
    adam_epsilon: float = 1e-8,
    max_grad_norm: float = 1.0,
    snr_gamma: float | None = None,
    gradient_accumulation_steps: int = 1,
    mixed_precision: str = "no",
    checkpointing_steps: int = 500,
    checkpoints_total_limit: int | None = None,
    resume_from_checkpoint: str | None = None,
    use_ema: bool = False,
    ema_decay: float = 0.9999,
    image_embed_dropout: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    max_minutes: float | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict:
    """Train (or fine-tune) the decoder UNet of `pretrained_decoder_model_name_or_path` on
    `train_data_dir` (captioned_images.py's layouts; the captions are not used) or
    `dataset="shapes"`; checkpoints, then the decoder pipeline folder `output_dir`. Returns a
    summary. `resolution` defaults to the MoVQ factor x the UNet's sample_size (8 x 64 = 512 for
    kandinsky-2-2-decoder). Argument names: the script's."""
    decoder, prior, output_dir = Path(pretrained_decoder_model_name_or_path), Path(pretrained_prior_model_name_or_path), Path(output_dir)
    # 1. Every argument and input is checked before a model is loaded.
    for folder, name, what in ((decoder, "movq", "decoder"), (decoder, "scheduler", "decoder"),
                               (prior, "image_encoder", "prior"), (prior, "image_processor", "prior")):
        if not (folder / name).is_dir():
            raise InputError(f"{folder}: a {what} folder needs {name}/ (kandinsky-2-2-{what}'s layout).")
    if unet_config is None and not (decoder / "unet").is_dir():
        raise InputError(f"{decoder} has no unet/ to fine-tune; pass --unet_config CONFIG.json to train a new one.")
    if (train_data_dir is None) == (dataset is None):
        raise InputError("Give the training data: --train_data_dir FOLDER_OR_FILE or --dataset shapes (one of them).")
    if dataset is not None:
        check_choice("--dataset", dataset, ("shapes",))
    device = check_loop_arguments(
        train_batch_size=train_batch_size, max_train_steps=max_train_steps,
        gradient_accumulation_steps=gradient_accumulation_steps, checkpointing_steps=checkpointing_steps,
        checkpoints_total_limit=checkpoints_total_limit, learning_rate=learning_rate, lr_warmup_steps=lr_warmup_steps,
        max_grad_norm=max_grad_norm, snr_gamma=snr_gamma, lr_scheduler=lr_scheduler, mixed_precision=mixed_precision,
        device=device)
    check_positive_int("--num_train_samples", num_train_samples)
    if resolution is not None:
        check_positive_int("--resolution", resolution, " pixels")
    check_number("--image_embed_dropout", image_embed_dropout, low=0, high=1, why="a probability")
    check_output_dir(output_dir, resume_from_checkpoint)
    resume_folder = resolve_checkpoint(output_dir, resume_from_checkpoint) if resume_from_checkpoint else None
    if train_data_dir is not None:
        pairs = read_captioned_images(train_data_dir, image_column, caption_column)
        val_pairs = read_captioned_images(validation_data_dir, image_column, caption_column) if validation_data_dir else []
    else:
        pairs = shapes_captioned_images(num_train_samples)
        if num_validation_images:
            from minidiff.training.prior import shapes_validation_pairs

            val_pairs = shapes_validation_pairs(num_validation_images)
        else:
            val_pairs = []

    # 2. Frozen MoVQ and image encoder; every image's latent and embedding, once.
    frozen = load_frozen(decoder, prior, device=device)
    torch.manual_seed(seed)
    unet = build_unet(decoder, unet_config, frozen["image_encoder"].config.projection_dim).to(device).train()
    if resolution is None:
        resolution = frozen["movq"].downsample_factor * (unet.config.sample_size or 64)
    data = encode_images(pairs, frozen, resolution, cache=output_dir / "latents.pt", progress=progress)
    val = encode_images(val_pairs, frozen, resolution, cache=output_dir / "validation_latents.pt", progress=progress,
                        desc="encode validation images") if val_pairs else None
    scheduler = frozen["scheduler"]
    alphas_cumprod = scheduler.alphas_cumprod
    prediction = scheduler.config.prediction_type

    # 3. The shared loop (trainer.py).
    trainer = Trainer("unet", unet, output_dir, max_train_steps=max_train_steps, learning_rate=learning_rate,
                      lr_scheduler=lr_scheduler, lr_warmup_steps=lr_warmup_steps, adam_beta1=adam_beta1,
                      adam_beta2=adam_beta2, adam_weight_decay=adam_weight_decay, adam_epsilon=adam_epsilon,
                      max_grad_norm=max_grad_norm, gradient_accumulation_steps=gradient_accumulation_steps,
                      mixed_precision=mixed_precision, checkpointing_steps=checkpointing_steps,
                      checkpoints_total_limit=checkpoints_total_limit, use_ema=use_ema, ema_decay=ema_decay,
                      seed=seed, device=device, desc="train decoder", progress=progress)
    if resume_folder is not None:
        trainer.resume(resume_folder)
    n, C = len(data["latents"]), data["latents"].shape[1]

    # 4. One micro-batch: a MoVQ latent noised at a random t; the UNet predicts the noise.
    def micro_batch(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, n, (train_batch_size,), generator=g)
        z_0 = data["latents"][idx]  # (B, 4, h, w)
        embeds = data["image_embeds"][idx]  # (B, E)
        drop = torch.rand(train_batch_size, generator=g) < image_embed_dropout
        embeds = torch.where(drop[:, None], data["zero_embed"][None], embeds)
        eps = torch.randn(z_0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (train_batch_size,), generator=g)
        z_t = scheduler.add_noise(z_0, eps, t)  # DDPM eq. 4
        target = eps if prediction == "epsilon" else scheduler.get_velocity(z_0, eps, t)
        weight = min_snr_weights(alphas_cumprod, t, snr_gamma, prediction)
        z_t, t, target, weight, embeds = (x.to(device) for x in (z_t, t, target, weight, embeds))
        with trainer.autocast():
            pred = unet(z_t, t, None, added_cond_kwargs={"image_embeds": embeds}).sample[:, :C]
        return (weight * (pred.float() - target).pow(2).mean(dim=(1, 2, 3))).mean()

    summary = trainer.run(micro_batch, max_minutes=max_minutes, stop_after=stop_after,
                          validate=(lambda: {"val_loss": validation_loss(trainer.kept, val, scheduler)})
                          if val is not None else None, validation_steps=validation_steps)
    summary["resolution"] = resolution
    if not summary["finished"]:
        return summary

    # 5. The finished run: the decoder pipeline folder.
    frozen = {k: (v.cpu() if hasattr(v, "cpu") else v) for k, v in frozen.items()}
    kept = trainer.kept.cpu().eval()
    save_pipeline(output_dir, decoder_pipeline(kept, frozen))
    if val is not None:
        summary["validation"] = {"val_loss": validation_loss(kept, val, scheduler), "n": len(val["latents"])}
    write_json(summary, output_dir / "training_summary.json")
    return summary


# ----------------------------------------------------------------------------------------------
# The command: minidiff train-decoder


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a Kandinsky 2.2 decoder UNet (diffusers' "
                                "train_text_to_image_decoder.py arguments).")

    def arg(name, **kw):  # the script's --snake_case, and --kebab-case beside it
        p.add_argument(f"--{name}", *([f"--{name.replace('_', '-')}"] if "_" in name else []), **kw)

    arg("pretrained_decoder_model_name_or_path", required=True,
        help="a decoder folder (kandinsky-2-2-decoder's layout: movq/, scheduler/, and unet/ to fine-tune)")
    arg("pretrained_prior_model_name_or_path", required=True,
        help="a prior folder: its image_encoder/ and image_processor/ make the conditioning embeddings")
    arg("output_dir", required=True, help="checkpoints, then the trained decoder pipeline folder")
    arg("train_data_dir", default=None, help="a folder with metadata.jsonl (imagefolder), a .jsonl or a .csv file")
    arg("dataset", default=None, choices=["shapes"], help="shapes: the shapes world's training stream")
    arg("num_train_samples", type=int, default=20000, help="--dataset shapes: training scenes (default 20000)")
    arg("image_column", default="image")
    arg("caption_column", default="text")
    arg("resolution", type=int, default=None, help="training image side (default: MoVQ factor x UNet sample_size)")
    arg("validation_data_dir", default=None, help="held-out images, same layouts as --train_data_dir")
    arg("num_validation_images", type=int, default=200, help="--dataset shapes: held-out scenes (default 200)")
    arg("validation_steps", type=int, default=None, help="validate every N steps (default: at the end only)")
    arg("unet_config", default=None, help="a UNet2DConditionModel config.json: train a new UNet instead of fine-tuning")
    add_loop_arguments(arg, lr_warmup_steps=500)
    arg("image_embed_dropout", type=float, default=0.0,
        help="probability of training on the zero-image embedding, guidance's unconditional branch (0 = the script)")
    return p


def main(argv=None, prog: str | None = None) -> None:
    args = build_parser(prog).parse_args(argv)
    from minidiff.validation import check_device

    device = check_device(args.device, allowed=("cpu", "cuda"))
    summary = train_decoder(**{k: v for k, v in vars(args).items() if k != "device"}, device=device)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    try:
        main()
    except InputError as err:
        print(f"python -m minidiff.training.decoder: error: {err}", file=sys.stderr)
        sys.exit(2)
