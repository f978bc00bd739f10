"""Train the shapes-world CLIP: the text encoder the UNet reads, and a vision tower beside it.

A small CLIP (Radford et al. 2021): a causal text transformer on the real CLIP BPE vocabulary and
a ViT (patch 16 on 128x128), trained together with the symmetric InfoNCE loss and a learnable
temperature. Scenes with the same content (objects + background) in one batch are positives of
each other (soft targets), so no true match is pushed away. AdamW with linear warmup and a cosine
decay; the run's skeleton (resume, checkpoints, time budget, devices) is loop.py's `TrainingRun`.

Hard negatives (`hard_negatives=True`, weights/shapes v3): every image is also scored against one caption that
is wrong in the way a bag of words cannot tell: a two-object scene against its caption with the
two colours swapped ("a red circle and a green square" -> "a green circle and a red square"), a
one-object scene against its caption with another colour. They are extra columns of the
image-to-text softmax only (a caption that no image matches has no row of its own), so the text
tower must bind each colour to its shape to rank the true caption first (Yuksekgonul et al. 2023,
"When and why vision-language models behave like bags-of-words", NegCLIP).

`init_from`: a model folder (text_encoder/, image_encoder/) to start both towers from; the text
projection, which the shipped text_encoder does not hold, then starts from random weights.

Saved: `text_encoder/` (a plain CLIPTextModel: the UNet reads its last hidden state, not the
projection), `image_encoder/` (CLIPVisionModelWithProjection) and the text projection on its own.
"""

from __future__ import annotations

import math
import random
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
from minidiff.training.shapes.data import (
    COLOURS,
    PAIR_TEMPLATES,
    SINGLE_TEMPLATES,
    Scene,
    describe,
    scene_batches,
    scenes_to_tensor,
)
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


def content_key(pairs: list[tuple[str, str]], background: str) -> tuple:
    """What a caption of these (colour, shape) pairs says, ignoring object order and template wording."""
    return tuple(sorted(pairs)), background


def scene_key(scene: Scene) -> tuple:
    """What a caption says about a scene (content_key of its objects)."""
    return content_key(scene.object_pairs(), scene.background)


def hard_negative(scene: Scene, rng: random.Random) -> tuple[str, tuple]:
    """A caption for `scene` that names its words but binds them wrongly, and its scene_key.

    Two objects of different colours and shapes: the colours swapped between them (same template,
    same background). Otherwise (one object, or two sharing a colour or a shape): the first
    object in another colour, one neither object has (a random one: `rng`)."""
    pairs = scene.object_pairs()
    (c1, s1), (c2, s2) = pairs[0], pairs[-1]
    if len(pairs) == 2 and c1 != c2 and s1 != s2:
        wrong = [(c2, s1), (c1, s2)]
    else:  # one object, or two that share a colour or a shape (a swap would change nothing)
        other = rng.choice([k for k in COLOURS if k not in (c1, c2)])
        wrong = [(other, s1)] + pairs[1:]
    # The scene's own template (the one that reproduces its caption), so only the binding differs.
    templates = SINGLE_TEMPLATES if len(pairs) == 1 else PAIR_TEMPLATES
    template = next(t for t in range(len(templates)) if describe(pairs, scene.background, t) == scene.caption)
    return describe(wrong, scene.background, template), content_key(wrong, scene.background)


def binding_accuracy(clip: ShapesCLIP, scenes: list[Scene]) -> float:
    """How often an image scores its own caption above its hard negative (for two-object scenes of
    different colours and shapes, the colour-swapped caption: 0.5 is a bag of words)."""
    tok = load_tokenizer()
    with torch.no_grad():
        v = clip.embed_images(scenes_to_tensor(scenes))
        t = clip.embed_text(tok([s.caption for s in scenes]).input_ids)
        swapped = clip.embed_text(tok([hard_negative(s, random.Random(0))[0] for s in scenes]).input_ids)
    return float(((v * t).sum(-1) > (v * swapped).sum(-1)).float().mean())


def train_clip(out_dir=DEFAULT_CKPT_DIR, steps: int = 1500, batch_size: int = 128, seed: int = 0,
               lr: float = 1e-3, warmup: int = 100, ckpt_every: int = 200, resume: bool = False,
               text_config: dict | None = None, vision_config: dict | None = None,
               max_minutes: float | None = None, device="cpu", progress: bool = True,
               hard_negatives: bool = True, init_from=None) -> ShapesCLIP:
    """Contrastive training; saves `<out_dir>/text_encoder/` and `<out_dir>/image_encoder/` and
    returns the model on the CPU. `device`: where it trains (loop.py, "Devices"), from the same
    CPU initialisation. `hard_negatives`, `init_from`: the module docstring."""
    out_dir, device = Path(out_dir), training_device(device)
    torch.manual_seed(seed)
    clip = ShapesCLIP(text_config or TEXT_CONFIG, vision_config or VISION_CONFIG)  # initialised on the CPU
    if init_from is not None:
        init_from = Path(init_from)
        clip.text.load_state_dict(CLIPTextModel.from_pretrained(init_from / "text_encoder", torch_dtype=torch.float32).state_dict())
        clip.vision.load_state_dict(CLIPVisionModelWithProjection.from_pretrained(
            init_from / "image_encoder", torch_dtype=torch.float32).state_dict())
    clip = clip.to(device)
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.01)
    # No generator: nothing in this loop is random but the scenes, which carry their own seeds.
    run = TrainingRun("clip", out_dir, {"model": clip}, opt, None, steps, lr, warmup, ckpt_every,
                      resume=resume, max_minutes=max_minutes, progress=progress)
    tok = load_tokenizer()

    batches = scene_batches(seed + 1, batch_size, start=run.start * batch_size)
    clip.train()
    for step in run:
        batch = next(batches)
        keys = [scene_key(s) for s in batch.scenes]
        captions, caption_keys = list(batch.captions), list(keys)
        if hard_negatives:  # B more captions, one wrong binding per image (its own rng: resumable)
            rng = random.Random(hash((seed, step)) & 0xFFFFFFFF)
            for caption, key in (hard_negative(s, rng) for s in batch.scenes):
                captions.append(caption)
                caption_keys.append(key)
        ids = tok(captions).input_ids.to(device)  # (B or 2B, 77), padded with <|endoftext|> as SD does
        t = clip.embed_text(ids)
        v = clip.embed_images(batch.images.to(device))
        B = len(keys)
        logits = clip.logit_scale.exp().clamp(max=100) * v @ t.T  # (B_images, B_texts [+ B negatives])
        # InfoNCE with soft targets: every caption of the same content is a correct match.
        same = torch.tensor([[a == b for b in caption_keys] for a in keys], dtype=torch.float32, device=device)
        target_i2t = same / same.sum(dim=1, keepdim=True)  # rows: images; columns: all captions
        same_t2i = same[:, :B].T  # rows: the B true captions; columns: images
        target_t2i = same_t2i / same_t2i.sum(dim=1, keepdim=True)
        loss = 0.5 * (torch.sum(-target_i2t * logits.log_softmax(dim=1), dim=1).mean()
                      + torch.sum(-target_t2i * logits[:, :B].T.log_softmax(dim=1), dim=1).mean())
        run.optimize(step, loss)
        if run.end_step(step, loss.item(), loss=f"{loss.item():.3f}", T=f"{1 / clip.logit_scale.exp().item():.3f}"):
            break
    run.finish()

    clip.cpu().eval()
    clip.text.save_pretrained(out_dir / "text_encoder")
    clip.vision.save_pretrained(out_dir / "image_encoder")
    torch.save(clip.text_projection.state_dict(), out_dir / "clip_text_projection.pt")
    return clip
