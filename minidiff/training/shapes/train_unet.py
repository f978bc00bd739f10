"""Train the shapes-world UNet: SD's UNet on 16x16x4 latents, text-conditioned.

Epsilon prediction (DDPM, Ho et al. 2020, eq. 14) on SD's scaled_linear schedule (0.00085..0.012,
1000 steps), with the frozen VAE and text encoder that train_vae.py and train_clip.py wrote. The
caption is dropped to "" 10% of the time, so one network gives both the conditional and the
unconditional eps that classifier-free guidance needs (Ho & Salimans 2022). Each image's loss is
weighted by Min-SNR-gamma (Hang et al. 2023). AdamW with linear warmup and a cosine decay, and an
EMA of the weights, which is what is saved. The run's skeleton (resume, checkpoints, time budget,
devices) is loop.py's `TrainingRun`; what one step does follows the diffusers `train_text_to_image.py`
example.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minidiff.models.clip import CLIPTextModel
from minidiff.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL
from minidiff.schedulers.ddpm import DDPMScheduler
from minidiff.tokenizer import CLIPTokenizer
from minidiff.training.min_snr import min_snr_weights
from minidiff.training.shapes.configs import DEFAULT_CKPT_DIR, SD_SCHEDULE, UNET_CONFIG
from minidiff.training.shapes.data import scene_batches
from minidiff.training.shapes.loop import TrainingRun, save_checkpoint, training_device
from minidiff.training.shapes.train_clip import load_tokenizer


class TextCache:
    """The frozen text encoder's last hidden state per caption (the shapes world has only a few
    thousand distinct captions, so each is encoded once), kept where the text encoder is."""

    def __init__(self, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer):
        self.text_encoder, self.tokenizer, self.cache = text_encoder, tokenizer, {}
        self.device = next(text_encoder.parameters()).device

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        for c in captions:
            if c not in self.cache:
                # One caption at a time: its states then do not depend on which other captions
                # shared its batch (matmul blocking changes with the batch), so a resumed run
                # sees bit-identical context to an uninterrupted one.
                ids = self.tokenizer([c]).input_ids.to(self.device)
                self.cache[c] = self.text_encoder(ids).last_hidden_state[0]  # (77, D)
        return torch.stack([self.cache[c] for c in captions])  # (B, 77, D)


@torch.no_grad()
def vae_fingerprint(vae: AutoencoderKL) -> float:
    """A number that changes whenever the VAE's weights do (to invalidate a cached latent pool).
    Summed on the CPU, so the same weights give the same number on every device."""
    return float(sum(p.cpu().double().abs().sum() for p in vae.parameters())) + vae.config.scaling_factor


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, seed: int, n: int, batch_size: int = 64, cache: Path | None = None,
                progress: bool = True) -> dict:
    """Encode the first n scenes of the training stream `seed` once: posterior mean and std of the
    scaled latents (n, 4, 16, 16) and the captions. The UNet then draws z = mean + std * noise per
    step (a fresh posterior sample each time, as on-the-fly encoding would) without running the
    VAE encoder, which costs about half as much as a UNet training step. The encoder runs where
    the VAE is; the pool is kept on the CPU.

    `cache`: a file to read the pool from (if it was made with the same VAE, seed and n) or to
    write it to (atomically)."""
    key = {"seed": seed, "n": n, "vae": vae_fingerprint(vae)}
    if cache is not None and cache.is_file():
        pool = torch.load(cache, map_location="cpu", weights_only=False)
        if pool.get("key") == key:
            return pool
    scale, device = vae.config.scaling_factor, next(vae.parameters()).device
    means, stds, captions = [], [], []
    batches = scene_batches(seed, batch_size)
    for _ in tqdm(range(math.ceil(n / batch_size)), desc="encode latent pool", disable=not progress):
        batch = next(batches)
        posterior = vae.encode(batch.images.to(device)).latent_dist
        means.append((posterior.mean * scale).cpu())  # (B, 4, 16, 16)
        stds.append((posterior.std * scale).cpu())
        captions += batch.captions
    pool = {"key": key, "mean": torch.cat(means)[:n], "std": torch.cat(stds)[:n].half(), "captions": captions[:n]}
    if cache is not None:
        save_checkpoint(pool, cache)
    return pool


def train_unet(out_dir=DEFAULT_CKPT_DIR, steps: int = 12000, batch_size: int = 32, seed: int = 0,
               lr: float = 1e-3, warmup: int = 200, ema_decay: float = 0.999, cfg_drop: float = 0.1,
               snr_gamma: float | None = 5.0, pool_size: int = 48000, ckpt_every: int = 250,
               resume: bool = False, config: dict | None = None, max_minutes: float | None = None,
               init_from: str | Path | None = None, device="cpu", progress: bool = True) -> UNet2DConditionModel:
    """Train the UNet on frozen VAE latents and frozen text states (read from `out_dir`);
    saves `<out_dir>/unet/` with the EMA weights and returns them on the CPU. `max_minutes` stops
    early (with a checkpoint); it counts from the first step, so the pool encoding is not in it.

    The training scenes are the first `pool_size` scenes of stream seed+2, encoded once
    (`encode_pool`, cached in `<out_dir>/latent_pool.pt`); each step draws a batch of them at
    random, a fresh posterior sample, noise level and noise. `init_from`: a UNet folder to start
    from (fine-tuning an exported model) instead of random weights; the config is then its own.
    `device`: where the VAE encodes the pool and the UNet trains (loop.py, "Devices"); the batch
    indices, posterior samples, noise, t and caption dropout are drawn on the CPU generator, the
    weights start from the same CPU initialisation."""
    out_dir, device = Path(out_dir), training_device(device)
    # float32 whatever the stored dtype: the components may come from an exported (fp16) folder
    vae = AutoencoderKL.from_pretrained(out_dir / "vae", torch_dtype=torch.float32).requires_grad_(False).to(device)
    text_encoder = CLIPTextModel.from_pretrained(out_dir / "text_encoder", torch_dtype=torch.float32)
    text_encoder.requires_grad_(False).to(device)
    text = TextCache(text_encoder, load_tokenizer())
    noise_scheduler = DDPMScheduler(**SD_SCHEDULE)
    pool = encode_pool(vae, seed + 2, pool_size, cache=out_dir / "latent_pool.pt", progress=progress)

    torch.manual_seed(seed)
    if init_from is not None:
        unet = UNet2DConditionModel.from_pretrained(init_from, torch_dtype=torch.float32).train()
    else:
        cfg = dict(config or UNET_CONFIG, cross_attention_dim=text.text_encoder.config.hidden_size)
        unet = UNet2DConditionModel(UNet2DConditionConfig(**cfg))
    unet.to(device)  # initialised (or loaded) on the CPU
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)  # batch indices, posterior noise, eps, t and caption dropout
    run = TrainingRun("unet", out_dir, {"model": unet, "ema": ema}, opt, g, steps, lr, warmup, ckpt_every,
                      resume=resume, max_minutes=max_minutes, progress=progress)

    unet.train()
    for step in run:
        idx = torch.randint(0, pool_size, (batch_size,), generator=g)
        mean, std = pool["mean"][idx], pool["std"][idx].float()
        x_0 = mean + std * torch.randn(mean.shape, generator=g)  # (B, 4, 16, 16), about unit variance
        drop = torch.rand(batch_size, generator=g) < cfg_drop
        captions = ["" if d else pool["captions"][i] for i, d in zip(idx.tolist(), drop.tolist())]
        context = text(captions)  # (B, 77, D)
        eps = torch.randn(x_0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        # Min-SNR-gamma for epsilon prediction, min(SNR_t, gamma) / SNR_t (min_snr.py); the paper reports
        # about 3x faster convergence with gamma = 5. gamma None: weight 1 (DDPM's loss).
        weight = min_snr_weights(noise_scheduler.alphas_cumprod, t, snr_gamma, "epsilon")  # (B,)
        # Drawn on the CPU generator above; from here on the step runs on the device.
        x_0, eps, t, weight = x_0.to(device), eps.to(device), t.to(device), weight.to(device)
        x_t = noise_scheduler.add_noise(x_0, eps, t)  # DDPM eq. 4
        per_sample = (unet(x_t, t, context).sample - eps).pow(2).mean(dim=(1, 2, 3))  # DDPM eq. 14, per image
        loss = (weight * per_sample).mean()
        run.optimize(step, loss, max_grad_norm=1.0)
        # EMA with the usual warmup: early on the average follows the weights closely.
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        mse = per_sample.mean().item()
        if run.end_step(step, mse, loss=f"{loss.item():.4f}", mse=f"{mse:.4f}"):
            break
    run.finish()

    ema.cpu().eval().save_pretrained(out_dir / "unet")
    return ema
