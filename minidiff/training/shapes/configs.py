"""The shapes-world model family's configs and the constants its training and export share.

    VAE_CONFIG, TEXT_CONFIG, VISION_CONFIG, UNET_CONFIG   the four components, small enough to
                        train on two CPU cores within an hour (train_vae.py, train_clip.py, train_unet.py)
    SD_SCHEDULE         SD's training noise schedule (the UNet's DDPM forward process)
    SD_DDIM             SD's sampling scheduler settings, written to scheduler/ by export.py
    CLIP_MEAN, CLIP_STD the vision tower's input normalisation (CLIPImageProcessor's)
    DEFAULT_CKPT_DIR    where the loops write checkpoints and trained components unless told
"""

from __future__ import annotations

import os
from pathlib import Path

# Checkpoints and trained components go here unless a folder is given (--ckpt-dir on the command
# line); $SHAPES_CKPT_DIR moves the default. Outside the source tree on purpose.
DEFAULT_CKPT_DIR = Path(os.environ.get("SHAPES_CKPT_DIR", "/tmp/shapes_ckpt"))

# CLIPImageProcessor's normalisation (OpenAI CLIP's training statistics): the vision tower sees
# (x01 - mean) / std with x01 the image in [0, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# SD's training noise schedule (stable-diffusion v1-inference.yaml: linear_start/linear_end).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# SD 1.x's DDIM sampler on that schedule, as its scheduler_config.json sets it: no x_0 clipping,
# alpha_bar_prev of the last step = alpha_bar_0 (set_alpha_to_one=False), timesteps 1, 21, ..., 981
# for 50 steps ("leading" spacing shifted by steps_offset=1), epsilon prediction.
SD_DDIM = dict(SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
               prediction_type="epsilon")

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
# The shapes prior (a Kandinsky 2.2 PriorTransformer, 81 tokens): CLIP's 64-wide embeddings in,
# 4 pre-LayerNorm blocks of width 4 x 32 = 128 (the official prior: 20 blocks of 32 x 64 = 2048).
PRIOR_CONFIG = dict(
    num_attention_heads=4, attention_head_dim=32, num_layers=4, embedding_dim=TEXT_CONFIG["projection_dim"],
    num_embeddings=TEXT_CONFIG["max_position_embeddings"], additional_embeddings=4, dropout=0.0,
)
# The prior's sampler, as kandinsky-2-2-prior's scheduler_config.json sets it.
PRIOR_SCHEDULER = dict(num_train_timesteps=1000, variance_type="fixed_small_log", clip_sample=True,
                       clip_sample_range=10.0, prediction_type="sample")
# The shapes MoVQ (kandinsky-2-2-decoder/movq's block layout at a quarter of the width or less):
# f = 8, 4 latent channels, attention at the lowest level of encoder and decoder, spatial norms.
# Widths are multiples of 32 because SpatialNorm's GroupNorm always has 32 groups (diffusers).
MOVQ_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, vq_embed_dim=4, num_vq_embeddings=1024, sample_size=128,
    layers_per_block=1, block_out_channels=(32, 32, 64, 64), norm_num_groups=8, norm_type="spatial",
    down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
    up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
)
# The shapes decoder UNet: every option of kandinsky-2-2-decoder/unet (resnet up/down-sampling,
# simple cross-attention with added key/values, scale-shift time conditioning, image_proj tokens
# and the "image" added embedding, 8 output channels), on 16x16 MoVQ latents; conditioned on the
# shapes CLIP's 64-wide image embedding. attention_head_dim is the head *size* in these blocks.
DECODER_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=8, layers_per_block=1, block_out_channels=(32, 64, 64),
    norm_num_groups=16, attention_head_dim=16, cross_attention_dim=64,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", resnet_time_scale_shift="scale_shift",
    encoder_hid_dim=VISION_CONFIG["projection_dim"], encoder_hid_dim_type="image_proj", addition_embed_type="image",
)
