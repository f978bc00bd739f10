"""Train the shapes-world model family (VAE, CLIP, UNet) and export it in the diffusers layout.

Three plain training loops, one per component, in the order Stable Diffusion needs them:

    train_vae   AutoencoderKL, f=8 (128x128x3 <-> 16x16x4): L1 reconstruction + a tiny KL term
                (LDM paper, Rombach et al. 2022, section 3 and appendix G: "KL-reg" with weight ~1e-6).
                Afterwards scaling_factor = 1 / std(latents), measured on training scenes
                (SD's 0.18215 is the same rule applied to its VAE: LDM section 4.3.2).
    train_clip  a small CLIP (Radford et al. 2021): causal text transformer on the real CLIP BPE
                vocabulary + ViT (patch 16 on 128x128), trained with the symmetric InfoNCE loss and a
                learnable temperature. Scenes with the same content (objects + background) in one
                batch are positives of each other (soft targets), so no true match is pushed away.
    train_unet  SD's UNet on 16x16x4 latents: epsilon prediction (DDPM, Ho et al. 2020, eq. 14) on
                SD's scaled_linear schedule (0.00085..0.012, 1000 steps), frozen VAE and text encoder,
                the caption dropped to "" 10% of the time so one network gives both the conditional
                and the unconditional eps that classifier-free guidance needs (Ho & Salimans 2022),
                AdamW with linear warmup and an EMA of the weights.
    save_pipeline  assemble weights/shapes: model_index.json, unet/, vae/, text_encoder/,
                tokenizer/, scheduler/ (SD's DDIM settings) and image_encoder/ (the vision tower),
                weights stored in fp16 to keep the folder small.

Every loop is seeded, draws its data from `scene_batches(seed, B, start=step * B)` (scene i of the
stream has its own generator, so resuming needs only the step count), shows a tqdm bar, and writes a
checkpoint (model, optimizer, EMA, step, torch RNG state) every `ckpt_every` steps: first to a
temporary file, then os.replace, so a run killed mid-write never leaves a half-written checkpoint.
`resume=True` continues from `<ckpt_dir>/<name>.pt`.

Command line:
    minidiff train-shapes vae  --steps 4000 --batch-size 16      (= python -m minidiff.training.shapes.train ...)
    minidiff train-shapes clip --steps 800 --batch-size 128
    minidiff train-shapes unet --steps 7000 --batch-size 32 --resume
    minidiff train-shapes export --out weights/shapes
    minidiff train-shapes eval --out weights/shapes --n 200        (text-to-image, judged)
    minidiff train-shapes eval-edit --out weights/shapes --n 200   (DiffEdit, judged)
    (checkpoints default to /tmp/shapes_ckpt, or $SHAPES_CKPT_DIR / --ckpt-dir)

References: LDM (Rombach et al. 2022), CLIP (Radford et al. 2021), DDPM (Ho et al. 2020),
classifier-free guidance (Ho & Salimans 2022), the diffusers `train_text_to_image.py` example
(what SD fine-tuning does per step).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minidiff.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection
from minidiff.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL, AutoencoderKLConfig
from minidiff.schedulers.ddpm import DDPMScheduler
from minidiff.tokenizer import CLIPTokenizer
from minidiff.training.shapes.data import held_out_scenes, scene_batches, scenes_to_tensor
from minidiff.training.shapes.evaluate import evaluate_diffedit, evaluate_text_to_image, mean_psnr, reconstruct

ROOT = Path(__file__).resolve().parents[3]
CLIP_TOKENIZER = ROOT / "weights" / "clip-tokenizer"
DEFAULT_CKPT_DIR = Path(os.environ.get("SHAPES_CKPT_DIR", "/tmp/shapes_ckpt"))

# CLIPImageProcessor's normalisation (OpenAI CLIP's training statistics): the vision tower sees
# (x01 - mean) / std with x01 the image in [0, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# SD's training noise schedule (stable-diffusion v1-inference.yaml: linear_start/linear_end).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# ----------------------------------------------------------------------------------------------
# Model configs (small enough to train on two CPU cores within an hour)

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=128, layers_per_block=1,
    block_out_channels=(16, 32, 64, 64), norm_num_groups=8,  # 4 levels: f = 2**3 = 8
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
# Real CLIP vocabulary (49408 rows): any prompt a user types tokenizes into known ids, at a cost of
# 49408 x 64 = 3.2M embedding parameters (6 MB in fp16), the largest single tensor of the family.
TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, projection_dim=64, num_hidden_layers=3,
    num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,  # SD 1.x pads with <|endoftext|>
)
VISION_CONFIG = dict(
    hidden_size=64, intermediate_size=256, projection_dim=64, num_hidden_layers=3, num_attention_heads=4,
    image_size=128, patch_size=16, hidden_act="quick_gelu",  # 8 x 8 = 64 patches + the class token
)
UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 64), norm_num_groups=16, attention_head_dim=4,  # 4 heads of 8 / 16
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_CONFIG["hidden_size"], use_linear_projection=False,
)


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic write, resume


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save to `path.tmp`, then os.replace: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


def _start(name: str, ckpt_dir, resume: bool, modules: dict, optimizer, generator,
           history: list | None = None) -> int:
    """Restore a run from `<ckpt_dir>/<name>.pt` when resuming; return the step to start at.
    `history` (the loss curve so far, a list) is refilled from the checkpoint."""
    path = Path(ckpt_dir) / f"{name}.pt"
    state = load_checkpoint(path) if resume else None
    if state is None:
        if resume:
            print(f"[{name}] no checkpoint at {path}; starting from step 0")
        return 0
    for key, module in modules.items():
        module.load_state_dict(state[key])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["rng"])
    if history is not None:
        history[:] = state.get("history", [])
    print(f"[{name}] resumed from {path} at step {state['step']}")
    return state["step"]


def _save(name: str, ckpt_dir, step: int, modules: dict, optimizer, generator, history: list | None = None) -> None:
    state = {key: m.state_dict() for key, m in modules.items()}
    state.update(optimizer=optimizer.state_dict(), rng=generator.get_state(), step=step, history=history or [])
    save_checkpoint(state, Path(ckpt_dir) / f"{name}.pt")


def _write_history(name: str, ckpt_dir, history: list) -> None:
    """The loss curve as `<ckpt_dir>/<name>_history.json`: [[step, loss, seconds since start], ...]."""
    (Path(ckpt_dir) / f"{name}_history.json").write_text(json.dumps(history))


def _out_of_time(t_start: float, max_minutes: float | None) -> bool:
    return max_minutes is not None and time.time() - t_start > 60 * max_minutes


def _lr_at(step: int, lr: float, warmup: int, total: int | None = None, floor: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then (when `total` is given) a cosine decay from lr to
    floor * lr at step `total` (SGDR, Loshchilov & Hutter 2017, without restarts)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if total is None or total <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / (total - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def random_crops(images: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """One random size x size window per image (B, C, H, W) -> (B, C, size, size)."""
    B, _, H, W = images.shape
    ys = torch.randint(0, H - size + 1, (B,), generator=g).tolist()
    xs = torch.randint(0, W - size + 1, (B,), generator=g).tolist()
    return torch.stack([im[:, y:y + size, x:x + size] for im, y, x in zip(images, ys, xs)])


# ----------------------------------------------------------------------------------------------
# VAE


@torch.no_grad()
def measure_latent_std(vae: AutoencoderKL, n: int = 512, seed: int = 12345, batch_size: int = 64) -> float:
    """Std of posterior samples z over n training scenes (SD's 0.18215 = 1 / this for its VAE)."""
    g = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, n)
    batches = scene_batches(seed, batch_size)
    zs = [vae.encode(next(batches).images).latent_dist.sample(g) for _ in range(math.ceil(n / batch_size))]  # (B, 4, 16, 16) each
    return torch.cat(zs).std().item()


def train_vae(out_dir=DEFAULT_CKPT_DIR, steps: int = 4000, batch_size: int = 16, seed: int = 0,
              lr: float = 1e-3, kl_weight: float = 1e-6, warmup: int = 100, ckpt_every: int = 200,
              resume: bool = False, config: dict | None = None, max_minutes: float | None = None,
              std_scenes: int = 512, crop: int | None = 64, progress: bool = True) -> AutoencoderKL:
    """Train the f=8 autoencoder; saves `<out_dir>/vae/` (diffusers layout) with a measured scaling_factor.

    The autoencoder is fully convolutional, so it trains on random `crop` x `crop` windows of the
    128 x 128 scenes (a quarter of the pixels per image: about 4x cheaper per step) and is used on
    whole images afterwards. The mid-block attention then sees 8 x 8 instead of 16 x 16 latents;
    the held-out PSNR on whole images is what `evaluate_vae` reports."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    vae = AutoencoderKL(AutoencoderKLConfig(**(config or VAE_CONFIG)))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)  # the posterior noise
    history: list = []
    step = _start("vae", out_dir, resume, {"model": vae}, opt, g, history)

    batches = scene_batches(seed, batch_size, start=step * batch_size)
    vae.train()
    t_start = time.time()
    bar = tqdm(range(step, steps), desc="vae", disable=not progress, initial=step, total=steps)
    for step in bar:
        x = next(batches).images  # (B, 3, 128, 128) in [-1, 1]
        if crop is not None and crop < x.shape[-1]:
            x = random_crops(x, crop, g)  # (B, 3, crop, crop)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(g)  # (B, 4, 16, 16)
        x_hat = vae.decode(z).sample
        rec = F.l1_loss(x_hat, x)
        kl = posterior.kl().mean()  # per image, summed over the 4x16x16 latent
        loss = rec + kl_weight * kl
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, lr, warmup, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.set_postfix(l1=f"{rec.item():.4f}", kl=f"{kl.item():.0f}")
        history.append([step + 1, round(rec.item(), 5), round(time.time() - t_start, 1)])
        done = step + 1 == steps or _out_of_time(t_start, max_minutes)
        if (step + 1) % ckpt_every == 0 or done:
            _save("vae", out_dir, step + 1, {"model": vae}, opt, g, history)
        if done:
            break
    _write_history("vae", out_dir, history)

    vae.eval()
    std = measure_latent_std(vae, n=std_scenes)
    vae.config.scaling_factor = 1.0 / std
    vae.save_pretrained(out_dir / "vae")
    print(f"[vae] latent std {std:.4f} -> scaling_factor {vae.config.scaling_factor:.5f}")
    return vae


@torch.no_grad()
def evaluate_vae(vae: AutoencoderKL, n: int = 200, judge=None) -> dict:
    """PSNR of held-out reconstructions (posterior mean; images in [0, 1]) and the judge's accuracy on them."""
    from minidiff.training.shapes.judge import evaluate_judge, load_judge

    scenes = held_out_scenes("val", n)
    x = scenes_to_tensor(scenes)
    judge = judge or load_judge()
    return {"psnr": mean_psnr(reconstruct(vae, x), x),
            "judge_on_reconstructions": evaluate_judge(judge, scenes, degrade=lambda images: reconstruct(vae, images)),
            "judge_on_originals": evaluate_judge(judge, scenes)}


# ----------------------------------------------------------------------------------------------
# CLIP


def load_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER, subfolder=None)


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> CLIPImageProcessor's normalisation."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


class ShapesCLIP(torch.nn.Module):
    """The two towers and the learnable temperature, trained together, saved separately."""

    def __init__(self, text_config: dict, vision_config: dict):
        super().__init__()
        self.text = CLIPTextModel(CLIPTextConfig(**text_config))
        # The text projection lives here (CLIPModel's `text_projection`); the UNet only reads the
        # text encoder's last hidden state, so the shipped text_encoder is a plain CLIPTextModel.
        self.text_projection = torch.nn.Linear(text_config["hidden_size"], text_config["projection_dim"], bias=False)
        self.vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision_config))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial tau = 0.07

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text(ids).pooler_output), dim=-1)  # (B, P)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision(clip_pixels(images)).image_embeds, dim=-1)  # (B, P)


def scene_key(scene) -> tuple:
    """What a caption says about a scene, ignoring object order and template wording."""
    return tuple(sorted(scene.object_pairs())), scene.background


def train_clip(out_dir=DEFAULT_CKPT_DIR, steps: int = 1500, batch_size: int = 128, seed: int = 0,
               lr: float = 1e-3, warmup: int = 100, ckpt_every: int = 200, resume: bool = False,
               text_config: dict | None = None, vision_config: dict | None = None,
               max_minutes: float | None = None, progress: bool = True) -> ShapesCLIP:
    """Contrastive training; saves `<out_dir>/text_encoder/` and `<out_dir>/image_encoder/`."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    clip = ShapesCLIP(text_config or TEXT_CONFIG, vision_config or VISION_CONFIG)
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)  # unused by the loss; kept so every run resumes alike
    history: list = []
    step = _start("clip", out_dir, resume, {"model": clip}, opt, g, history)
    tok = load_tokenizer()

    batches = scene_batches(seed + 1, batch_size, start=step * batch_size)
    clip.train()
    t_start = time.time()
    bar = tqdm(range(step, steps), desc="clip", disable=not progress, initial=step, total=steps)
    for step in bar:
        batch = next(batches)
        ids = tok(batch.captions).input_ids  # (B, 77), padded with <|endoftext|> as SD does
        t = clip.embed_text(ids)
        v = clip.embed_images(batch.images)
        logits = clip.logit_scale.exp().clamp(max=100) * v @ t.T  # (B_images, B_texts)
        # InfoNCE with soft targets: every caption of the same content is a correct match.
        keys = [scene_key(s) for s in batch.scenes]
        same = torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.float32)  # (B, B)
        target = same / same.sum(dim=1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(dim=1), dim=1).mean()
                      + torch.sum(-target * logits.T.log_softmax(dim=1), dim=1).mean())
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, lr, warmup, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", T=f"{1 / clip.logit_scale.exp().item():.3f}")
        history.append([step + 1, round(loss.item(), 5), round(time.time() - t_start, 1)])
        done = step + 1 == steps or _out_of_time(t_start, max_minutes)
        if (step + 1) % ckpt_every == 0 or done:
            _save("clip", out_dir, step + 1, {"model": clip}, opt, g, history)
        if done:
            break
    _write_history("clip", out_dir, history)

    clip.eval()
    clip.text.save_pretrained(out_dir / "text_encoder")
    clip.vision.save_pretrained(out_dir / "image_encoder")
    torch.save(clip.text_projection.state_dict(), out_dir / "clip_text_projection.pt")
    return clip


@torch.no_grad()
def evaluate_clip(clip: ShapesCLIP, n: int = 200) -> dict:
    """Held-out retrieval: for each image, is the best-scoring caption (among the n canonical
    captions) one with the image's content? And the same from captions to images."""
    scenes = held_out_scenes("val", n)
    tok = load_tokenizer()
    t = clip.embed_text(tok([s.caption for s in scenes]).input_ids)
    v = clip.embed_images(scenes_to_tensor(scenes))
    sim = v @ t.T  # (images, captions)
    keys = [scene_key(s) for s in scenes]
    i2t = sum(keys[int(j)] == keys[i] for i, j in enumerate(sim.argmax(dim=1))) / n
    t2i = sum(keys[int(i)] == keys[j] for j, i in enumerate(sim.argmax(dim=0))) / n
    return {"image_to_text_top1": i2t, "text_to_image_top1": t2i, "n": n}


# ----------------------------------------------------------------------------------------------
# UNet


class TextCache:
    """The frozen text encoder's last hidden state per caption (the shapes world has only a few
    thousand distinct captions, so each is encoded once)."""

    def __init__(self, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer):
        self.text_encoder, self.tokenizer, self.cache = text_encoder, tokenizer, {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        for c in captions:
            if c not in self.cache:
                # One caption at a time: its states then do not depend on which other captions
                # shared its batch (matmul blocking changes with the batch), so a resumed run
                # sees bit-identical context to an uninterrupted one.
                self.cache[c] = self.text_encoder(self.tokenizer([c]).input_ids).last_hidden_state[0]  # (77, D)
        return torch.stack([self.cache[c] for c in captions])  # (B, 77, D)


@torch.no_grad()
def vae_fingerprint(vae: AutoencoderKL) -> float:
    """A number that changes whenever the VAE's weights do (to invalidate a cached latent pool)."""
    return float(sum(p.double().abs().sum() for p in vae.parameters())) + vae.config.scaling_factor


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, seed: int, n: int, batch_size: int = 64, cache: Path | None = None,
                progress: bool = True) -> dict:
    """Encode the first n scenes of the training stream `seed` once: posterior mean and std of the
    scaled latents (n, 4, 16, 16) and the captions. The UNet then draws z = mean + std * noise per
    step (a fresh posterior sample each time, as on-the-fly encoding would) without running the
    VAE encoder, which costs about half as much as a UNet training step.

    `cache`: a file to read the pool from (if it was made with the same VAE, seed and n) or to
    write it to (atomically)."""
    key = {"seed": seed, "n": n, "vae": vae_fingerprint(vae)}
    if cache is not None and cache.is_file():
        pool = torch.load(cache, map_location="cpu", weights_only=False)
        if pool.get("key") == key:
            return pool
    scale = vae.config.scaling_factor
    means, stds, captions = [], [], []
    batches = scene_batches(seed, batch_size)
    for _ in tqdm(range(math.ceil(n / batch_size)), desc="encode latent pool", disable=not progress):
        batch = next(batches)
        posterior = vae.encode(batch.images).latent_dist
        means.append(posterior.mean * scale)  # (B, 4, 16, 16)
        stds.append(posterior.std * scale)
        captions += batch.captions
    pool = {"key": key, "mean": torch.cat(means)[:n], "std": torch.cat(stds)[:n].half(), "captions": captions[:n]}
    if cache is not None:
        save_checkpoint(pool, cache)
    return pool


def min_snr_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al. 2023, eq. 9 and table 1):
    w_t = min(SNR_t, gamma) / SNR_t with SNR_t = abar_t / (1 - abar_t). It stops the nearly
    noise-free steps (huge SNR, easy and uninformative) from dominating the gradient; the paper
    reports about 3x faster convergence with gamma = 5. gamma=None gives weight 1 (DDPM's loss)."""
    if gamma is None:
        return torch.ones(t.shape)
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return snr.clamp(max=gamma) / snr


def train_unet(out_dir=DEFAULT_CKPT_DIR, steps: int = 12000, batch_size: int = 32, seed: int = 0,
               lr: float = 1e-3, warmup: int = 200, ema_decay: float = 0.999, cfg_drop: float = 0.1,
               snr_gamma: float | None = 5.0, pool_size: int = 48000, ckpt_every: int = 250,
               resume: bool = False, config: dict | None = None, max_minutes: float | None = None,
               progress: bool = True) -> UNet2DConditionModel:
    """Train the UNet on frozen VAE latents and frozen text states (read from `out_dir`);
    saves `<out_dir>/unet/` with the EMA weights. `max_minutes` stops early (with a checkpoint).

    The training scenes are the first `pool_size` scenes of stream seed+2, encoded once
    (`encode_pool`, cached in `<out_dir>/latent_pool.pt`); each step draws a batch of them at
    random, a fresh posterior sample, noise level and noise."""
    out_dir = Path(out_dir)
    vae = AutoencoderKL.from_pretrained(out_dir / "vae").requires_grad_(False)
    text = TextCache(CLIPTextModel.from_pretrained(out_dir / "text_encoder").requires_grad_(False), load_tokenizer())
    noise_scheduler = DDPMScheduler(**SD_SCHEDULE)
    pool = encode_pool(vae, seed + 2, pool_size, cache=out_dir / "latent_pool.pt", progress=progress)

    torch.manual_seed(seed)
    cfg = dict(config or UNET_CONFIG, cross_attention_dim=text.text_encoder.config.hidden_size)
    unet = UNet2DConditionModel(UNet2DConditionConfig(**cfg))
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)  # batch indices, posterior noise, eps, t and caption dropout
    history: list = []
    step = _start("unet", out_dir, resume, {"model": unet, "ema": ema}, opt, g, history)

    unet.train()
    t_start = time.time()
    bar = tqdm(range(step, steps), desc="unet", disable=not progress, initial=step, total=steps)
    for step in bar:
        idx = torch.randint(0, pool_size, (batch_size,), generator=g)
        mean, std = pool["mean"][idx], pool["std"][idx].float()
        x_0 = mean + std * torch.randn(mean.shape, generator=g)  # (B, 4, 16, 16), about unit variance
        drop = torch.rand(batch_size, generator=g) < cfg_drop
        captions = ["" if d else pool["captions"][i] for i, d in zip(idx.tolist(), drop.tolist())]
        context = text(captions)  # (B, 77, D)
        eps = torch.randn(x_0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        x_t = noise_scheduler.add_noise(x_0, eps, t)  # DDPM eq. 4
        per_sample = (unet(x_t, t, context).sample - eps).pow(2).mean(dim=(1, 2, 3))  # DDPM eq. 14, per image
        loss = (min_snr_weight(noise_scheduler.alphas_cumprod, t, snr_gamma) * per_sample).mean()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, lr, warmup, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        # EMA with the usual warmup: early on the average follows the weights closely.
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}", mse=f"{per_sample.mean().item():.4f}")
        history.append([step + 1, round(per_sample.mean().item(), 5), round(time.time() - t_start, 1)])
        done = step + 1 == steps or _out_of_time(t_start, max_minutes)
        if (step + 1) % ckpt_every == 0 or done:
            _save("unet", out_dir, step + 1, {"model": unet, "ema": ema}, opt, g, history)
        if done:
            break
    _write_history("unet", out_dir, history)

    ema.eval().save_pretrained(out_dir / "unet")
    return ema


# ----------------------------------------------------------------------------------------------
# Export


def _fp16(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).to(torch.float16)


def save_pipeline(out_dir=ROOT / "weights" / "shapes", ckpt_dir=DEFAULT_CKPT_DIR, dtype=torch.float16) -> Path:
    """Assemble the diffusers layout in `out_dir` from the trained components in `ckpt_dir`.

    The judge (out_dir/judge) is left alone. Weights are cast to `dtype` (fp16: half the size)."""
    out_dir, ckpt_dir = Path(out_dir), Path(ckpt_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel),
                     ("image_encoder", CLIPVisionModelWithProjection)):
        model = cls.from_pretrained(ckpt_dir / sub).to(dtype)
        if (out_dir / sub).exists():
            shutil.rmtree(out_dir / sub)
        model.save_pretrained(out_dir / sub)
    (out_dir / "image_encoder" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 128},
        "do_center_crop": True, "crop_size": {"height": 128, "width": 128}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "do_convert_rgb": True, "resample": 3}, indent=2))

    tok = out_dir / "tokenizer"
    tok.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(CLIP_TOKENIZER / name, tok / name)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (tok / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}, indent=2))

    (out_dir / "scheduler").mkdir(exist_ok=True)
    (out_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDIMScheduler", **SD_SCHEDULE, "clip_sample": False, "set_alpha_to_one": False,
        "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon", "trained_betas": None},
        indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2))
    return out_dir


def folder_size_mb(folder, exclude=("judge",)) -> float:
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.rglob("*")
               if p.is_file() and p.relative_to(folder).parts[0] not in exclude) / 2**20


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv=None, prog: str | None = None) -> None:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["vae", "clip", "unet", "export", "eval", "eval-edit"],
                   help="a component to train (vae, clip, unet: in that order), export (assemble the "
                        "diffusers folder --out), eval (text-to-image) or eval-edit (DiffEdit), judged")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--ckpt-dir", default=str(DEFAULT_CKPT_DIR))
    p.add_argument("--out", default=str(ROOT / "weights" / "shapes"))
    p.add_argument("--n", type=int, default=200, help="evaluation cases")
    args = p.parse_args(argv)
    kw = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v is not None}
    t0 = time.time()
    if args.what == "vae":
        vae = train_vae(args.ckpt_dir, seed=args.seed, resume=args.resume, max_minutes=args.max_minutes, **kw)
        print(json.dumps(evaluate_vae(vae), indent=2))
    elif args.what == "clip":
        clip = train_clip(args.ckpt_dir, seed=args.seed, resume=args.resume, max_minutes=args.max_minutes, **kw)
        print(json.dumps(evaluate_clip(clip), indent=2))
    elif args.what == "unet":
        train_unet(args.ckpt_dir, seed=args.seed, resume=args.resume, max_minutes=args.max_minutes, **kw)
    elif args.what == "export":
        save_pipeline(args.out, args.ckpt_dir)
        print(f"{args.out}: {folder_size_mb(args.out):.1f} MB (without the judge)")
    elif args.what == "eval":
        print(json.dumps(evaluate_text_to_image(args.out, n=args.n), indent=2))
    else:
        print(json.dumps(evaluate_diffedit(args.out, n=args.n), indent=2))
    print(f"wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
