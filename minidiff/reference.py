"""Tiny random Stable Diffusion checkpoints written by the *reference* libraries.

diffusers and transformers build each component with small random weights and save it in the
official layout; minidiff then loads it through its production loader. Tests, the `minidiff
check` demo, benchmarks and notebooks all use this one builder, so "the reference" means the
same thing everywhere.

Needs the test extras (`pip install -e ".[test]"`): diffusers and transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from minidiff.data import CLIP_TOKENIZER

# diffusers and transformers are imported inside each builder: they are test extras, and the
# settings below (FLAVOURS, scheduler_config) are read without them (notebook 03).

# Shapes of each tiny flavour. "sd1": 1x1-conv projections, one head count for every block,
# quick_gelu CLIP (like SD 1.5). "sd2": linear projections, a head count per block, upcast
# attention, gelu CLIP with "!" padding and v-prediction (like SD 2.1-v).
FLAVOURS = {
    "sd1": dict(
        unet=dict(block_out_channels=(32, 64), attention_head_dim=4, use_linear_projection=False,
                  upcast_attention=False,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        text=dict(hidden_act="quick_gelu"),
        pad_token="<|endoftext|>",
        prediction_type="epsilon",
    ),
    "sd2": dict(
        unet=dict(block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4), use_linear_projection=True,
                  upcast_attention=True,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        text=dict(hidden_act="gelu"),
        pad_token="!",
        prediction_type="v_prediction",
    ),
}

TEXT_HIDDEN = 32


def tiny_unet(flavour: str = "sd1", seed: int = 0, sample_size: int = 16):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    f = FLAVOURS[flavour]["unet"]
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=TEXT_HIDDEN, **f,
    ).eval()


def tiny_vae(seed: int = 0, sample_size: int = 64):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=sample_size, in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()


def tiny_text_encoder(flavour: str = "sd1", seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_HIDDEN,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407 if flavour == "sd1" else 0,
        **FLAVOURS[flavour]["text"],
    )
    return CLIPTextModel(config).eval()


def scheduler_config(flavour: str = "sd1") -> dict:
    """SD's DDIM settings (scaled_linear 0.00085..0.012, leading spacing, steps_offset 1)."""
    return {
        "_class_name": "DDIMScheduler",
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False,
        "steps_offset": 1, "timestep_spacing": "leading",
        "prediction_type": FLAVOURS[flavour]["prediction_type"],
    }


def tiny_scheduler(flavour: str = "sd1"):
    """diffusers' DDIMScheduler with SD's settings; its save_pretrained writes the scheduler/ folder."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler_config(flavour))


def save_tiny_pipeline(folder: str | Path, flavour: str = "sd1", seed: int = 0) -> Path:
    """Write a complete tiny random SD pipeline in the diffusers layout and return its folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tiny_unet(flavour, seed).save_pretrained(folder / "unet")
    tiny_vae(seed).save_pretrained(folder / "vae")
    tiny_text_encoder(flavour, seed).save_pretrained(folder / "text_encoder")
    tok = folder / "tokenizer"
    tok.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(CLIP_TOKENIZER / name, tok / name)
    pad = FLAVOURS[flavour]["pad_token"]
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad}
    (tok / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (tok / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}, indent=2))
    tiny_scheduler(flavour).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def tiny_prior(seed: int = 0, embedding_dim: int = TEXT_HIDDEN):
    """diffusers' PriorTransformer in Kandinsky 2.2's layout (81 tokens), tiny, every weight
    random (clip_mean / clip_std too, which diffusers starts at zero)."""
    from diffusers import PriorTransformer

    torch.manual_seed(seed)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=embedding_dim,
                             num_embeddings=77, additional_embeddings=4)
    with torch.no_grad():
        for p in prior.parameters():
            if p.dim() < 2:  # biases, norms, the learned tokens: diffusers starts many at 0 or 1
                p.normal_(0, 0.2)
        prior.clip_std.uniform_(0.5, 1.5)
    return prior.eval()


def save_tiny_prior_pipeline(folder: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A complete tiny random Kandinsky 2.2 prior pipeline folder (kandinsky-2-2-prior's layout),
    written by diffusers' KandinskyV22PriorPipeline.save_pretrained."""
    from diffusers import KandinskyV22PriorPipeline, UnCLIPScheduler
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from minidiff.data import config_folder

    folder = Path(folder)
    torch.manual_seed(seed)
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=TEXT_HIDDEN, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407)).eval()
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=8, projection_dim=TEXT_HIDDEN)).eval()
    tokenizer = CLIPTokenizer(str(CLIP_TOKENIZER / "vocab.json"), str(CLIP_TOKENIZER / "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=77)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    scheduler = UnCLIPScheduler.from_pretrained(config_folder("kandinsky-2-2-prior"), subfolder="scheduler")
    pipe = KandinskyV22PriorPipeline(prior=tiny_prior(seed), image_encoder=vision, text_encoder=text,
                                     tokenizer=tokenizer, scheduler=scheduler, image_processor=processor)
    pipe.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------
# Kandinsky 2.2 decoder: MoVQ, the image-conditioned UNet and the decoder pipeline folder.

def tiny_movq(seed: int = 0, num_vq_embeddings: int = 64):
    """diffusers' VQModel in kandinsky-2-2-decoder/movq's layout (spatial norms, attention at the
    lowest level of encoder and decoder), tiny; norms and biases perturbed away from 1 / 0."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    movq = VQModel(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, norm_num_groups=8,
        latent_channels=4, vq_embed_dim=4, num_vq_embeddings=num_vq_embeddings, norm_type="spatial",
        sample_size=32,
    )
    with torch.no_grad():
        for p in movq.parameters():
            if p.dim() < 2:
                p.add_(0.2 * torch.randn_like(p))
    return movq.eval()


def tiny_decoder_unet(seed: int = 0, image_embed_dim: int = TEXT_HIDDEN, sample_size: int = 8):
    """diffusers' UNet2DConditionModel with every option kandinsky-2-2-decoder/unet sets: resnet
    up/down-sampling blocks, simple cross-attention with added key/values, scale-shift time
    conditioning, image_proj context tokens, the "image" added embedding, 8 output channels
    (eps and the learned variance). Tiny; norms and biases perturbed."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=8, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=16,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=48,
        encoder_hid_dim=image_embed_dim, encoder_hid_dim_type="image_proj",
        addition_embed_type="image", addition_embed_type_num_heads=64, resnet_time_scale_shift="scale_shift",
    )
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() < 2:
                p.add_(0.2 * torch.randn_like(p))
    return unet.eval()


def save_tiny_decoder_pipeline(folder: str | Path, seed: int = 0, image_embed_dim: int = TEXT_HIDDEN) -> Path:
    """A complete tiny random Kandinsky 2.2 decoder folder (kandinsky-2-2-decoder's layout: unet,
    movq, scheduler), written by diffusers' KandinskyV22Pipeline.save_pretrained."""
    from diffusers import DDPMScheduler, KandinskyV22Pipeline

    from minidiff.data import config_folder

    folder = Path(folder)
    scheduler = DDPMScheduler.from_pretrained(config_folder("kandinsky-2-2-decoder"), subfolder="scheduler")
    pipe = KandinskyV22Pipeline(unet=tiny_decoder_unet(seed, image_embed_dim), scheduler=scheduler,
                                movq=tiny_movq(seed))
    pipe.save_pretrained(folder)
    return folder
