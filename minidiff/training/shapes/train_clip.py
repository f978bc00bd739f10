"""Train the shapes-world CLIP: the text encoder the UNet reads, and a vision tower beside it.

A small CLIP (Radford et al. 2021): a causal text transformer on the real CLIP BPE vocabulary and
a ViT (patch 16 on 128x128), trained together with the symmetric InfoNCE loss and a learnable
temperature. Scenes with the same content (objects + background) in one batch are positives of
each other (soft targets), so no true match is pushed away. AdamW with linear warmup and a cosine
decay; the run's skeleton (resume, checkpoints, time budget, devices) is loop.py's `TrainingRun`.

Saved: `text_encoder/` (a plain CLIPTextModel: the UNet reads its last hidden state, not the
projection), `image_encoder/` (CLIPVisionModelWithProjection) and the text projection on its own.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from minidiff.data import CLIP_TOKENIZER
from minidiff.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)
from minidiff.tokenizer import CLIPTokenizer
from minidiff.training.shapes.configs import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_CKPT_DIR,
    TEXT_CONFIG,
    VISION_CONFIG,
)
from minidiff.training.shapes.data import Scene, scene_batches
from minidiff.training.shapes.loop import TrainingRun, training_device


def load_tokenizer() -> CLIPTokenizer:
    """OpenAI CLIP's vocabulary with SD 1.x's special tokens as plain strings (pad = <|endoftext|>,
    77 tokens): the tokenizer the shapes model is trained with and exported with."""
    return CLIPTokenizer(CLIP_TOKENIZER / "vocab.json", CLIP_TOKENIZER / "merges.txt")


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> CLIPImageProcessor's normalisation (on the images' device)."""
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
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


def scene_key(scene: Scene) -> tuple:
    """What a caption says about a scene, ignoring object order and template wording."""
    return tuple(sorted(scene.object_pairs())), scene.background


def train_clip(out_dir=DEFAULT_CKPT_DIR, steps: int = 1500, batch_size: int = 128, seed: int = 0,
               lr: float = 1e-3, warmup: int = 100, ckpt_every: int = 200, resume: bool = False,
               text_config: dict | None = None, vision_config: dict | None = None,
               max_minutes: float | None = None, device="cpu", progress: bool = True) -> ShapesCLIP:
    """Contrastive training; saves `<out_dir>/text_encoder/` and `<out_dir>/image_encoder/` and
    returns the model on the CPU. `device`: where it trains (loop.py, "Devices"), from the same
    CPU initialisation."""
    out_dir, device = Path(out_dir), training_device(device)
    torch.manual_seed(seed)
    clip = ShapesCLIP(text_config or TEXT_CONFIG, vision_config or VISION_CONFIG).to(device)  # initialised on the CPU
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.01)
    # No generator: nothing in this loop is random but the scenes, which carry their own seeds.
    run = TrainingRun("clip", out_dir, {"model": clip}, opt, None, steps, lr, warmup, ckpt_every,
                      resume=resume, max_minutes=max_minutes, progress=progress)
    tok = load_tokenizer()

    batches = scene_batches(seed + 1, batch_size, start=run.start * batch_size)
    clip.train()
    for step in run:
        batch = next(batches)
        ids = tok(batch.captions).input_ids.to(device)  # (B, 77), padded with <|endoftext|> as SD does
        t = clip.embed_text(ids)
        v = clip.embed_images(batch.images.to(device))
        logits = clip.logit_scale.exp().clamp(max=100) * v @ t.T  # (B_images, B_texts)
        # InfoNCE with soft targets: every caption of the same content is a correct match.
        keys = [scene_key(s) for s in batch.scenes]
        same = torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.float32, device=device)  # (B, B)
        target = same / same.sum(dim=1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(dim=1), dim=1).mean()
                      + torch.sum(-target * logits.T.log_softmax(dim=1), dim=1).mean())
        run.optimize(step, loss)
        if run.end_step(step, loss.item(), loss=f"{loss.item():.3f}", T=f"{1 / clip.logit_scale.exp().item():.3f}"):
            break
    run.finish()

    clip.cpu().eval()
    clip.text.save_pretrained(out_dir / "text_encoder")
    clip.vision.save_pretrained(out_dir / "image_encoder")
    torch.save(clip.text_projection.state_dict(), out_dir / "clip_text_projection.pt")
    return clip
