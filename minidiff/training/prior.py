"""Train a Kandinsky 2.2 prior: the PriorTransformer that turns a caption into a CLIP image embedding.

diffusers' train_text_to_image_prior.py, written out (../shared/reference/kandinsky22-prior-training.md):

    frozen CLIPTextModelWithProjection:  caption -> text_embeds y (B, P), states (B, 77, D), mask (B, 77)
    frozen CLIPVisionModelWithProjection: image  -> image_embeds z_0 (B, P)
    z_0 <- (z_0 - clip_mean) / clip_std            the prior works on normalised embeddings
    t ~ U{0, ..., 999}, eps ~ N(0, I)
    z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps  DDPM eq. 4, squaredcos_cap_v2 schedule
    loss = w_t || prior(z_t, t, y, states, mask) - z_0 ||^2    the prior predicts z_0 ("sample");
                                                   w_t = 1, or min(SNR_t, gamma) (min_snr.py)

with DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample") built fresh and
AdamW (lr 1e-4 constant, betas 0.9 / 0.999, no weight decay, eps 1e-8, grad norm clipped to 1.0)
as the script's defaults. Two things differ from the script, both on purpose:

- Caption dropout (`caption_dropout`, default 0 = the script): the script never shows the prior an
  empty caption, yet its pipeline guides with scale 4 against "" (the original Kandinsky trainer
  drops the text with p = 0.1). With p > 0 a caption is replaced by "" (its own states and mask),
  so the unconditional branch the pipeline asks for has been trained.
- The encoders are frozen and the script applies no augmentation (resize + centre crop only), so
  every caption's text outputs and every image's embedding are computed once before training
  (`encode_pairs`, cached in output_dir/embeddings.pt) and the loop runs the prior alone.

`clip_mean` / `clip_std` are loaded with the prior and never trained (requires_grad False: as
trainable-but-unused parameters they would also break DistributedDataParallel). A prior built
from `prior_config` (a fresh one, as the shapes world's) gets them from the training embeddings.

The loop around one micro-batch (AdamW, schedule, accumulation, EMA, checkpoints, resume) is
trainer.py's, shared with train-decoder. Checkpoints: output_dir/checkpoint-<step>/ (atomic,
`checkpoints_total_limit`, "latest" resume, corrupt ones refused). All randomness comes from one torch.Generator saved in
the checkpoint, so stopping and resuming gives the uninterrupted run's weights bit for bit (CPU).
At the end output_dir becomes a prior pipeline folder, as kandinsky-2-2-prior is laid out
(model_index.json, prior/, text_encoder/, image_encoder/, tokenizer/, scheduler/, image_processor/),
so `DiffusionPipeline.from_pretrained(output_dir)` loads it, as the guide's inference code does.

Validation (the script renders images with a decoder; this one measures): on held-out pairs,
sample the prior pipeline (25 steps, guidance 4 unless told) and report the mean cosine between
predicted and true image embeddings, and retrieval among 10: is the image whose embedding is
closest to the predicted one the caption's own? Beside it the same retrieval with the text
embedding itself, which a useful prior must beat.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minidiff.errors import InputError
from minidiff.loading import write_json
from minidiff.training.captioned_images import (
    CaptionedImage,
    read_captioned_images,
    shapes_captioned_images,
)
from minidiff.training.checkpoints import resolve_checkpoint
from minidiff.training.min_snr import min_snr_weights
from minidiff.training.trainer import Trainer, add_loop_arguments, check_loop_arguments, check_output_dir, save_pipeline
from minidiff.validation import check_choice, check_number, check_positive_int


# ----------------------------------------------------------------------------------------------
# The frozen encoders and the embedding cache


def load_encoders(folder, dtype=torch.float32, device="cpu") -> dict:
    """text_encoder (with projection), image_encoder, tokenizer, image_processor of a prior folder."""
    from minidiff.image_processor import CLIPImageProcessor
    from minidiff.models.clip import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
    from minidiff.tokenizer import CLIPTokenizer

    folder = Path(folder)
    return {
        "text_encoder": CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype)
        .requires_grad_(False).eval().to(device),
        "image_encoder": CLIPVisionModelWithProjection.from_pretrained(folder, subfolder="image_encoder", torch_dtype=dtype)
        .requires_grad_(False).eval().to(device),
        "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        "image_processor": CLIPImageProcessor.from_pretrained(folder, subfolder="image_processor"),
    }


def _fingerprint(pairs: list[CaptionedImage], encoders: dict) -> str:
    """Changes whenever the pairs (files, sizes, times, captions) or the encoders' weights do."""
    h = hashlib.sha256()
    for p in pairs:
        stat = (p.image.stat().st_size, p.image.stat().st_mtime_ns) if isinstance(p.image, Path) else ()
        h.update(json.dumps([str(p.image), *stat, p.caption]).encode())
    for name in ("text_encoder", "image_encoder"):
        h.update(repr(float(sum(w.double().abs().sum() for w in encoders[name].parameters()))).encode())
    return h.hexdigest()


@torch.no_grad()
def encode_pairs(pairs: list[CaptionedImage], encoders: dict, batch_size: int = 64, cache: Path | None = None,
                 progress: bool = True, desc: str = "encode pairs") -> dict:
    """Every distinct caption's text outputs and every image's embedding, once:

        captions        the distinct captions ("" always among them: caption dropout's)
        caption_index   (N,) which caption each pair has
        text_embeds     (C, P)      states (C, 77, D)      mask (C, 77) bool
        image_embeds    (N, P)

    float32, on the CPU. `cache`: a file read back if made from the same pairs and encoders."""
    key = _fingerprint(pairs, encoders)
    if cache is not None and cache.is_file():
        stored = torch.load(cache, map_location="cpu", weights_only=True)
        if stored.get("key") == key:
            return stored
    text_encoder, image_encoder = encoders["text_encoder"], encoders["image_encoder"]
    device = next(text_encoder.parameters()).device
    captions = sorted({p.caption for p in pairs} | {""})
    where = {c: i for i, c in enumerate(captions)}
    text_embeds, states, masks = [], [], []
    for start in range(0, len(captions), batch_size):
        tokens = encoders["tokenizer"](captions[start:start + batch_size], padding="max_length",
                                       max_length=encoders["tokenizer"].model_max_length, truncation=True,
                                       return_tensors="pt")
        out = text_encoder(tokens.input_ids.to(device))
        text_embeds.append(out.text_embeds.float().cpu())
        states.append(out.last_hidden_state.float().cpu())
        masks.append(tokens.attention_mask.bool())
    image_embeds = []
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress):
        images = [p.load() for p in pairs[start:start + batch_size]]
        pixels = encoders["image_processor"](images=images, return_tensors="pt").pixel_values
        weight = next(image_encoder.parameters())
        image_embeds.append(image_encoder(pixels.to(device=device, dtype=weight.dtype)).image_embeds.float().cpu())
    data = {"key": key, "captions": captions,
            "caption_index": torch.tensor([where[p.caption] for p in pairs]),
            "text_embeds": torch.cat(text_embeds), "states": torch.cat(states), "mask": torch.cat(masks),
            "image_embeds": torch.cat(image_embeds)}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        torch.save(data, tmp)
        tmp.replace(cache)
    return data


# ----------------------------------------------------------------------------------------------
# Validation: what the prior's samples are worth


@torch.no_grad()
def evaluate_prior(pipe, data: dict, n: int | None = None, guidance_scale: float = 4.0, num_inference_steps: int = 25,
                   group: int = 10, seed: int = 0, batch_size: int = 50) -> dict:
    """Held-out pairs `data` (encode_pairs' dict): sample the prior for each caption, then

        cosine                 mean cos(predicted, true image embedding)
        retrieval_prior        among each group of `group` pairs, how often the image closest to the
                               prediction has the caption's content (the same caption string)
        retrieval_text         the same retrieval with the caption's text embedding itself
        cosine_text            mean cos(text embedding, true image embedding), for scale
    """
    total = len(data["caption_index"]) if n is None else min(n, len(data["caption_index"]))
    group = min(group, total)  # fewer pairs than a group: one group of all of them
    total -= total % group
    if total < 2:
        raise InputError("Validation needs at least 2 held-out pairs.")
    idx = data["caption_index"][:total]
    captions = [data["captions"][int(i)] for i in idx]
    truth = F.normalize(data["image_embeds"][:total], dim=-1)
    predicted = []
    g = torch.Generator().manual_seed(seed)
    for start in range(0, total, batch_size):
        out = pipe(captions[start:start + batch_size], guidance_scale=guidance_scale,
                   num_inference_steps=num_inference_steps, generator=g)
        predicted.append(out.image_embeds.float().cpu())
    predicted = F.normalize(torch.cat(predicted), dim=-1)
    text = F.normalize(data["text_embeds"][idx], dim=-1)

    def retrieval(queries: torch.Tensor) -> float:
        hits = 0
        for start in range(0, total, group):
            sim = queries[start:start + group] @ truth[start:start + group].T  # (group, group)
            best = sim.argmax(dim=1)
            hits += sum(captions[start + int(j)] == captions[start + i] for i, j in enumerate(best))
        return hits / total

    return {"n": total, "guidance_scale": guidance_scale, "cosine": float((predicted * truth).sum(-1).mean()),
            "cosine_text": float((text * truth).sum(-1).mean()), "retrieval_prior": retrieval(predicted),
            "retrieval_text": retrieval(text), "group": group}


@torch.no_grad()
def describe_prompts(pipe, prompts: list[str], data: dict, k: int = 3, seed: int = 0) -> dict:
    """For each validation prompt, the captions of the k held-out images nearest to its predicted
    embedding: a readable check (the script renders images here)."""
    truth = F.normalize(data["image_embeds"], dim=-1)
    out = pipe(prompts, generator=torch.Generator().manual_seed(seed))
    sim = F.normalize(out.image_embeds.float().cpu(), dim=-1) @ truth.T
    return {p: [data["captions"][int(data["caption_index"][int(j)])] for j in row.topk(min(k, len(truth))).indices]
            for p, row in zip(prompts, sim)}


# ----------------------------------------------------------------------------------------------
# Training


def build_prior(folder: Path, prior_config: dict | str | None, image_embeds: torch.Tensor):
    """The prior to train: `prior_config` (a dict or a config.json path) builds a fresh one whose
    clip_mean / clip_std are the training embeddings' per-dimension mean and std; otherwise
    folder/prior is loaded (fine-tuning, as the guide does). Either way the two are frozen."""
    from minidiff.models.prior import PriorTransformer

    if prior_config is not None:
        config = json.loads(Path(prior_config).read_text()) if isinstance(prior_config, (str, Path)) else prior_config
        prior = PriorTransformer.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        with torch.no_grad():
            prior.clip_mean.copy_(image_embeds.mean(0).view_as(prior.clip_mean))
            prior.clip_std.copy_(image_embeds.std(0).clamp(min=1e-6).view_as(prior.clip_std))
    else:
        prior = PriorTransformer.from_pretrained(folder, subfolder="prior", torch_dtype=torch.float32)
    return prior.freeze_clip_stats()


def prior_pipeline(prior, source: Path, encoders: dict):
    """The prior pipeline of a prior being trained: the source folder's UnCLIP scheduler (or
    kandinsky-2-2-prior's settings when it has none), the frozen encoders, no progress bar."""
    from minidiff.pipelines.kandinsky import KandinskyV22PriorPipeline
    from minidiff.schedulers.unclip import UnCLIPScheduler

    scheduler = (UnCLIPScheduler.from_pretrained(source, subfolder="scheduler")
                 if (source / "scheduler").is_dir() else UnCLIPScheduler(prediction_type="sample", clip_sample_range=10.0))
    pipe = KandinskyV22PriorPipeline(prior=prior, scheduler=scheduler, **encoders)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_prior_pipeline(output_dir: Path, pipe) -> None:
    """output_dir as a prior pipeline folder (kandinsky-2-2-prior's layout): trainer.save_pipeline."""
    save_pipeline(output_dir, pipe)


def train_prior(
    pretrained_prior_model_name_or_path,
    output_dir,
    train_data_dir=None,
    dataset: str | None = None,
    num_train_samples: int = 20000,
    image_column: str = "image",
    caption_column: str = "text",
    validation_data_dir=None,
    num_validation_pairs: int = 200,
    validation_prompts: list[str] | None = None,
    validation_steps: int | None = None,
    prior_config: dict | str | None = None,
    train_batch_size: int = 1,
    max_train_steps: int = 1000,
    learning_rate: float = 1e-4,
    lr_scheduler: str = "constant",
    lr_warmup_steps: int = 0,
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
    caption_dropout: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    max_minutes: float | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict:
    """Train (or fine-tune) the prior of the folder `pretrained_prior_model_name_or_path` on
    `train_data_dir` (captioned_images.py's layouts) or `dataset="shapes"` (its first
    `num_train_samples` training scenes); write checkpoints and, when the last step is done, the
    prior pipeline folder `output_dir`. Returns a summary (steps, seconds, loss history,
    validation). `stop_after`: stop (with a checkpoint) after that many steps of this call, as a
    killed run would; `max_minutes` the same by wall time. Argument names: the guide's script."""
    source, output_dir = Path(pretrained_prior_model_name_or_path), Path(output_dir)
    # 1. Every argument and input is checked before a model is loaded.
    for name in ("text_encoder", "image_encoder", "tokenizer", "image_processor"):
        if not (source / name).is_dir():
            raise InputError(f"{source}: a prior folder needs {name}/ (kandinsky-2-2-prior's layout).")
    if prior_config is None and not (source / "prior").is_dir():
        raise InputError(f"{source} has no prior/ to fine-tune; pass --prior_config CONFIG.json to train a new one.")
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
    check_number("--caption_dropout", caption_dropout, low=0, high=1, why="a probability")
    check_output_dir(output_dir, resume_from_checkpoint)
    resume_folder = resolve_checkpoint(output_dir, resume_from_checkpoint) if resume_from_checkpoint else None
    if train_data_dir is not None:
        pairs = read_captioned_images(train_data_dir, image_column, caption_column)
        val_pairs = read_captioned_images(validation_data_dir, image_column, caption_column) if validation_data_dir else []
        if len(val_pairs) == 1:
            raise InputError(f"--validation_data_dir {validation_data_dir}: validation needs at least 2 pairs; it lists 1.")
    else:
        pairs = shapes_captioned_images(num_train_samples)
        val_pairs = shapes_validation_pairs(num_validation_pairs) if num_validation_pairs else []

    # 2. Frozen encoders; the embeddings of every pair, once.
    encoders = load_encoders(source, device=device)
    data = encode_pairs(pairs, encoders, cache=output_dir / "embeddings.pt", progress=progress)
    val = encode_pairs(val_pairs, encoders, cache=output_dir / "validation_embeddings.pt", progress=progress,
                       desc="encode validation pairs") if val_pairs else None
    empty = data["captions"].index("")

    # 3. The prior, and the shared loop around it (trainer.py: AdamW, schedule, EMA, checkpoints).
    from minidiff.schedulers.ddpm import DDPMScheduler

    noise_scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample")
    alphas_cumprod = noise_scheduler.alphas_cumprod
    torch.manual_seed(seed)
    prior = build_prior(source, prior_config, data["image_embeds"]).to(device).train()
    trainer = Trainer("prior", prior, output_dir, max_train_steps=max_train_steps, learning_rate=learning_rate,
                      lr_scheduler=lr_scheduler, lr_warmup_steps=lr_warmup_steps, adam_beta1=adam_beta1,
                      adam_beta2=adam_beta2, adam_weight_decay=adam_weight_decay, adam_epsilon=adam_epsilon,
                      max_grad_norm=max_grad_norm, gradient_accumulation_steps=gradient_accumulation_steps,
                      mixed_precision=mixed_precision, checkpointing_steps=checkpointing_steps,
                      checkpoints_total_limit=checkpoints_total_limit, use_ema=use_ema, ema_decay=ema_decay,
                      seed=seed, device=device, desc="train prior", progress=progress)
    if resume_folder is not None:
        trainer.resume(resume_folder)
    mean, std = prior.clip_mean.detach().cpu(), prior.clip_std.detach().cpu()
    kept = trainer.kept  # what validation samples and the folder gets
    val_pipe = prior_pipeline(kept, source, encoders) if val is not None else None  # follows kept's weights
    n = len(data["caption_index"])

    # 4. One micro-batch: normalised image embeddings, noised; the prior predicts them back.
    def micro_batch(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, n, (train_batch_size,), generator=g)
        caption = data["caption_index"][idx]
        drop = torch.rand(train_batch_size, generator=g) < caption_dropout
        caption = torch.where(drop, torch.full_like(caption, empty), caption)
        z_0 = (data["image_embeds"][idx] - mean) / std  # normalised image embeddings (B, P)
        eps = torch.randn(z_0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (train_batch_size,), generator=g)
        z_t = noise_scheduler.add_noise(z_0, eps, t)  # DDPM eq. 4
        weight = min_snr_weights(alphas_cumprod, t, snr_gamma, "sample")
        z_0, z_t, t, weight = (x.to(device) for x in (z_0, z_t, t, weight))
        with trainer.autocast():
            pred = prior(z_t, timestep=t, proj_embedding=data["text_embeds"][caption].to(device),
                         encoder_hidden_states=data["states"][caption].to(device),
                         attention_mask=data["mask"][caption].to(device)).predicted_image_embedding
        per_sample = (pred.float() - z_0).pow(2).mean(dim=1)  # (B,)
        return (weight * per_sample).mean()

    summary = trainer.run(micro_batch, max_minutes=max_minutes, stop_after=stop_after,
                          validate=(lambda: _validate(val_pipe, val)) if val is not None else None,
                          validation_steps=validation_steps)
    if not summary["finished"]:
        return summary

    # 5. The finished run: the prior pipeline folder, and what it is worth.
    encoders = {k: (v.cpu() if hasattr(v, "cpu") else v) for k, v in encoders.items()}
    pipe = prior_pipeline(kept.cpu().eval(), source, encoders)
    save_prior_pipeline(output_dir, pipe)
    if val is not None:
        summary["validation"] = _validate(pipe, val)
        if validation_prompts:
            summary["validation_prompts"] = describe_prompts(pipe, validation_prompts, val)
    write_json(summary, output_dir / "training_summary.json")
    return summary


def _validate(pipe, val: dict) -> dict:
    """evaluate_prior with the pipeline's prior in eval mode, then back as it was."""
    was_training = pipe.prior.training
    pipe.prior.eval()
    try:
        return evaluate_prior(pipe, val)
    finally:
        pipe.prior.train(was_training)


def shapes_validation_pairs(n: int, split: str = "val") -> list[CaptionedImage]:
    """The first n held-out shapes scenes of `split` as pairs, each drawn again from its index
    when loaded, as the training scenes are."""
    from minidiff.training.shapes.data import held_out_scenes

    return [_HeldOut(i, s.caption, split) for i, s in enumerate(held_out_scenes(split, n))]


@dataclass(frozen=True)
class _HeldOut(CaptionedImage):
    """A held-out shapes scene, drawn on load."""

    split: str = "val"

    def load(self):
        from minidiff.training.shapes.data import held_out_scene

        return held_out_scene(self.split, self.image).pil()


@torch.no_grad()
def evaluate_shapes_prior(folder, n: int = 200, guidance_scales=(1.0, 4.0), split: str = "test", seed: int = 0) -> dict:
    """A trained shapes prior folder on the first n held-out `split` scenes: evaluate_prior at each
    guidance scale (the same pairs, the same seed)."""
    from minidiff.pipelines.kandinsky import KandinskyV22PriorPipeline

    pipe = KandinskyV22PriorPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    encoders = {k: getattr(pipe, k) for k in ("text_encoder", "image_encoder", "tokenizer", "image_processor")}
    data = encode_pairs(shapes_validation_pairs(n, split), encoders, progress=False)
    out = {f"guidance_{g:g}": evaluate_prior(pipe, data, guidance_scale=g, seed=seed) for g in guidance_scales}
    for g in guidance_scales:
        out[f"guidance_{g:g}"].update(shapes_binding(pipe, n, split, g, seed))
    return out


@torch.no_grad()
def shapes_binding(pipe, n: int = 200, split: str = "test", guidance_scale: float = 4.0, seed: int = 0) -> dict:
    """Attribute binding, where retrieval among random scenes is easy: for two-object held-out scenes
    of different colours and shapes, is the prediction for the caption closer to the scene's image
    than to the same scene with the two colours swapped (same shapes, places, sizes)? 0.5 = blind.
    Beside it the same test with the text embedding itself."""
    from minidiff.training.shapes.data import render, swappable_scenes

    scenes = swappable_scenes(split, n)
    swapped = []
    for s in scenes:
        specs = s.object_specs()
        specs[0]["colour"], specs[1]["colour"] = specs[1]["colour"], specs[0]["colour"]
        swapped.append(render(specs, s.background))
    weight = next(pipe.image_encoder.parameters())

    def embed(images):
        pixels = pipe.image_processor(images=[x.pil() for x in images], return_tensors="pt").pixel_values
        return F.normalize(pipe.image_encoder(pixels.to(weight.dtype)).image_embeds.float(), dim=-1)

    true, wrong = embed(scenes), embed(swapped)
    captions = [s.caption for s in scenes]
    predicted = F.normalize(pipe(captions, guidance_scale=guidance_scale,
                                 generator=torch.Generator().manual_seed(seed)).image_embeds.float(), dim=-1)
    text = F.normalize(pipe._encode_text(captions, pipe.device)[0].float(), dim=-1)
    score = lambda q: float(((q * true).sum(-1) > (q * wrong).sum(-1)).float().mean())  # noqa: E731
    return {"binding_prior": score(predicted), "binding_text": score(text), "n_binding": len(scenes)}


# ----------------------------------------------------------------------------------------------
# The command: minidiff train-prior


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a Kandinsky 2.2 prior (diffusers' "
                                "train_text_to_image_prior.py arguments).")

    def arg(name, **kw):  # the guide's --snake_case, and --kebab-case beside it
        p.add_argument(f"--{name}", *([f"--{name.replace('_', '-')}"] if "_" in name else []), **kw)

    arg("pretrained_prior_model_name_or_path", required=True,
        help="a prior pipeline folder (kandinsky-2-2-prior's layout: text_encoder/, image_encoder/, tokenizer/, "
             "image_processor/, scheduler/, prior/)")
    arg("output_dir", required=True, help="checkpoints, then the trained prior pipeline folder")
    arg("train_data_dir", default=None, help="a folder with metadata.jsonl (imagefolder), a .jsonl or a .csv file")
    arg("dataset", default=None, choices=["shapes"], help="shapes: the shapes world's training stream")
    arg("num_train_samples", type=int, default=20000, help="--dataset shapes: training scenes (default 20000)")
    arg("image_column", default="image")
    arg("caption_column", default="text")
    arg("validation_data_dir", default=None, help="held-out pairs, same layouts as --train_data_dir")
    arg("num_validation_pairs", type=int, default=200, help="--dataset shapes: held-out scenes (default 200)")
    arg("validation_prompts", nargs="+", default=None, help="prompts whose nearest held-out images are reported")
    arg("validation_steps", type=int, default=None, help="validate every N steps (default: at the end only)")
    arg("prior_config", default=None, help="a PriorTransformer config.json: train a new prior instead of fine-tuning")
    add_loop_arguments(arg, lr_warmup_steps=0)
    arg("caption_dropout", type=float, default=0.0,
        help="probability of training on the empty caption (0 = the script; 0.1 = the original Kandinsky trainer)")
    return p


def main(argv=None, prog: str | None = None) -> None:
    args = build_parser(prog).parse_args(argv)
    from minidiff.validation import check_device

    device = check_device(args.device, allowed=("cpu", "cuda"))
    summary = train_prior(**{k: v for k, v in vars(args).items() if k != "device"}, device=device)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    try:
        main()
    except InputError as err:
        print(f"python -m minidiff.training.prior: error: {err}", file=sys.stderr)
        sys.exit(2)
