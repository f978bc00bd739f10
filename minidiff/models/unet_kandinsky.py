"""The blocks of Kandinsky 2.2's decoder UNet (kandinsky-2-2-decoder/unet), an unCLIP decoder.

unCLIP (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents",
section 2.1) generates an image from a CLIP image embedding z_i with a diffusion decoder built on
GLIDE's UNet (Nichol et al. 2021, "GLIDE"), itself ADM's UNet (Dhariwal & Nichol 2021). The
embedding conditions the decoder in two places, and Kandinsky 2.2 keeps both (it drops unCLIP's
text tokens: the image embedding is all the decoder sees):

    z_i (B, 1280) -> add_embedding     Linear + LayerNorm -> (B, 1536), added to the time embedding
    z_i (B, 1280) -> encoder_hid_proj  Linear, split into 32 tokens, LayerNorm -> (B, 32, 768):
                                       the context every attention layer attends to

The UNet itself, with the numbers of the official config (block_out_channels 384/768/1152/1536,
layers_per_block 3, 64-wide heads; h = w = 64 latents for 512 px, as MoVQ downsamples by 8):

    conv_in                                         (B,  384, h,   w)
    down_blocks.0  ResnetDownsampleBlock2D     384  3 resnets, then a resnet that halves h, w
    down_blocks.1  SimpleCrossAttnDownBlock2D  768  3 x (resnet, attention of 12 heads), halve
    down_blocks.2  SimpleCrossAttnDownBlock2D 1152  3 x (resnet, attention of 18 heads), halve
    down_blocks.3  SimpleCrossAttnDownBlock2D 1536  3 x (resnet, attention of 24 heads)
    mid_block      UNetMidBlock2DSimpleCrossAttn    resnet, attention, resnet   (B, 1536, h/8, w/8)
    up_blocks.0-2  SimpleCrossAttnUpBlock2D   1536, 1152, 768: 4 x (concat skip, resnet,
                                                    attention), then a resnet that doubles h, w
    up_blocks.3    ResnetUpsampleBlock2D       384  4 x (concat skip, resnet)
    conv_norm_out -> SiLU -> conv_out               (B,    8, h,   w)

Three differences from Stable Diffusion's UNet (minidiff/models/unet.py), all inherited from ADM
and GLIDE:
  - Resampling is done by resnets (`up=True` / `down=True`, BigGAN style), not by a strided or a
    nearest + conv layer, and the time embedding scales and shifts the normalised features
    (`time_scale_shift`, adaptive group norm). Both are ResnetBlock2D options (resnet.py).
  - Attention is one layer, not a transformer block: GroupNorm, then the image tokens attend to
    themselves and to the context at once. The context is projected by separate `add_k_proj` /
    `add_v_proj` weights and its keys and values are concatenated in front of the image's own
    (GLIDE's "encoder_kv"), so one softmax weighs the 32 image-embedding tokens against the h*w
    pixels. No feed-forward, no projection in or out; a residual around it.
  - 8 output channels: eps (4) and the interpolation weights v (4) of the learned variance
    Sigma = exp(v log beta_t + (1 - v) log beta_tilde_t) (Nichol & Dhariwal 2021, "Improved
    DDPM", eq. 15). The UNet just outputs them; the scheduler decides what to use.

`attention_head_dim` here really is the width of one head (64): a level of C channels has
C // 64 heads (`UNet2DConditionConfig.num_heads_per_block` is where that is read).

The attribute names are diffusers' checkpoint keys (its ResnetDownsampleBlock2D,
SimpleCrossAttnDownBlock2D, UNetMidBlock2DSimpleCrossAttn, SimpleCrossAttnUpBlock2D,
ResnetUpsampleBlock2D, ImageProjection and ImageTimeEmbedding), so the official
diffusion_pytorch_model.safetensors loads with `load_state_dict(strict=True)`. The blocks take and
return what unet.py's SD blocks do, so `UNet2DConditionModel.forward` runs both families.
"""

from __future__ import annotations

import torch
from torch import nn

from minidiff.models.attention import Attention, attention
from minidiff.models.resnet import ResnetBlock2D, up_resnets

# diffusers' Attention builds its group_norm with eps 1e-5 whatever the UNet's norm_eps is.
ATTENTION_NORM_EPS = 1e-5
# ImageProjection's default; kandinsky-2-2-decoder keeps it (its config does not name it).
IMAGE_TOKENS = 32


# ----------------------------------------------------------------------------------------------
# The image embedding as conditioning


class ImageProjection(nn.Module):
    """CLIP image embedding (B, D_img) -> IMAGE_TOKENS context tokens (B, 32, context_dim)."""

    def __init__(self, image_embed_dim: int, context_dim: int, num_tokens: int = IMAGE_TOKENS):
        super().__init__()
        self.num_tokens = num_tokens
        self.image_embeds = nn.Linear(image_embed_dim, num_tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.image_embeds(image_embeds)  # (B, 32 * context_dim)
        tokens = tokens.view(image_embeds.shape[0], self.num_tokens, -1)  # (B, 32, context_dim)
        return self.norm(tokens)  # each token normalised on its own


class ImageTimeEmbedding(nn.Module):
    """CLIP image embedding (B, D_img) -> (B, temb_channels), added to the time embedding."""

    def __init__(self, image_embed_dim: int, temb_channels: int):
        super().__init__()
        self.image_proj = nn.Linear(image_embed_dim, temb_channels)
        self.image_norm = nn.LayerNorm(temb_channels)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.image_norm(self.image_proj(image_embeds))


# ----------------------------------------------------------------------------------------------
# Attention with added key/values (GLIDE)


class AddedKVAttention(Attention):
    """x (B, C, H, W) + context (B, M, context_dim) -> (B, C, H, W).

    x + to_out(softmax(q k^T / sqrt(d)) v) with, for the N = H*W pixel tokens n = GroupNorm(x):
        q = to_q(n)                                   (B, heads, N, d)
        k = [add_k_proj(context), to_k(n)]            (B, heads, M + N, d)   context first
        v = [add_v_proj(context), to_v(n)]            (B, heads, M + N, d)
    All projections have biases. The call goes through `attention()`, so the "math" / "sdpa" /
    "triton" switch applies, and `set_attention_slice` slices it like any `Attention`.
    """

    def __init__(self, channels: int, num_heads: int, context_dim: int, groups: int):
        # diffusers asks for upcast_softmax here, which only its non-SDPA processor reads; its
        # SDPA processor (the one that runs) computes in the model's dtype, as upcast=False does
        # here ("math" computes in fp32 whatever the dtype).
        super().__init__(query_dim=channels, num_heads=num_heads, head_dim=channels // num_heads, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=ATTENTION_NORM_EPS)
        self.add_k_proj = nn.Linear(context_dim, channels)
        self.add_v_proj = nn.Linear(context_dim, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, height, width = x.shape
        H, d = self.num_heads, self.head_dim
        n = self.group_norm(x).view(B, C, height * width).transpose(1, 2)  # (B, N, C): a token per pixel
        q = self.to_q(n).view(B, -1, H, d).transpose(1, 2)  # (B, H, N, d)
        k = torch.cat([self.add_k_proj(context), self.to_k(n)], dim=1)  # (B, M + N, C)
        v = torch.cat([self.add_v_proj(context), self.to_v(n)], dim=1)  # (B, M + N, C)
        k = k.view(B, -1, H, d).transpose(1, 2)  # (B, H, M + N, d)
        v = v.view(B, -1, H, d).transpose(1, 2)  # (B, H, M + N, d)
        if self.slice_size is None or self.slice_size >= B * H:
            out = attention(q, k, v, upcast=self.upcast)  # (B, H, N, d)
        else:
            out = self._sliced_attention(q, k, v, None)  # the same, a few (sample, head) pairs at a time
        out = self.to_out[0](out.transpose(1, 2).reshape(B, -1, H * d))  # merge heads: (B, N, C)
        return x + out.transpose(1, 2).reshape(B, C, height, width)  # back to (B, C, H, W), residual


# ----------------------------------------------------------------------------------------------
# The five block types. Same calling convention as unet.py's SD blocks: down blocks return
# (x, skips), up blocks pop their skips from the end of the down path's list. Every resnet is
# conditioned by scale and shift: the only setting the Kandinsky decoder family accepts.


def _resnet(in_channels, out_channels, temb_channels, groups, eps, up=False, down=False):
    return ResnetBlock2D(in_channels, out_channels, temb_channels, groups, eps, time_scale_shift=True,
                         up=up, down=down)


class ResnetDownsampleBlock2D(nn.Module):
    """num_layers resnets, then (unless deepest) a resnet that halves H and W."""

    def __init__(self, in_channels, out_channels, temb_channels, num_layers, groups, eps, add_downsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [_resnet(in_channels if j == 0 else out_channels, out_channels, temb_channels, groups, eps)
             for j in range(num_layers)]
        )
        self.downsamplers = (nn.ModuleList([_resnet(out_channels, out_channels, temb_channels, groups, eps, down=True)])
                             if add_downsample else None)

    def forward(self, x, temb, context=None):
        skips = []
        for resnet in self.resnets:
            x = resnet(x, temb)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, temb)  # (B, C, H/2, W/2)
            skips.append(x)
        return x, skips


class SimpleCrossAttnDownBlock2D(nn.Module):
    """num_layers x (resnet, added-KV attention), then (unless deepest) a resnet that halves H and W."""

    def __init__(self, in_channels, out_channels, temb_channels, num_layers, groups, eps, add_downsample,
                 num_heads, context_dim):
        super().__init__()
        self.resnets = nn.ModuleList(
            [_resnet(in_channels if j == 0 else out_channels, out_channels, temb_channels, groups, eps)
             for j in range(num_layers)]
        )
        self.attentions = nn.ModuleList(
            [AddedKVAttention(out_channels, num_heads, context_dim, groups) for _ in range(num_layers)]
        )
        self.downsamplers = (nn.ModuleList([_resnet(out_channels, out_channels, temb_channels, groups, eps, down=True)])
                             if add_downsample else None)

    def forward(self, x, temb, context):
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(x, temb), context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, temb)  # (B, C, H/2, W/2)
            skips.append(x)
        return x, skips


class UNetMidBlock2DSimpleCrossAttn(nn.Module):
    """resnet -> added-KV attention -> resnet at the deepest resolution."""

    def __init__(self, channels, temb_channels, groups, eps, num_heads, context_dim):
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(channels, channels, temb_channels, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([AddedKVAttention(channels, num_heads, context_dim, groups)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class ResnetUpsampleBlock2D(nn.Module):
    """num_layers x (concat a skip, resnet), then (unless top) a resnet that doubles H and W."""

    def __init__(self, prev_channels, out_channels, skip_channels_last, temb_channels, num_layers, groups, eps,
                 add_upsample):
        super().__init__()
        self.resnets = up_resnets(prev_channels, out_channels, skip_channels_last, temb_channels, num_layers,
                                  groups, eps, time_scale_shift=True)
        self.upsamplers = (nn.ModuleList([_resnet(out_channels, out_channels, temb_channels, groups, eps, up=True)])
                           if add_upsample else None)

    def forward(self, x, skips, temb, context=None):
        for resnet in self.resnets:
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C_running + C_skip, H, W)
            x = resnet(x, temb)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, temb)  # (B, C, 2H, 2W)
        return x


class SimpleCrossAttnUpBlock2D(nn.Module):
    """num_layers x (concat a skip, resnet, added-KV attention), then (unless top) a resnet that
    doubles H and W."""

    def __init__(self, prev_channels, out_channels, skip_channels_last, temb_channels, num_layers, groups, eps,
                 add_upsample, num_heads, context_dim):
        super().__init__()
        self.resnets = up_resnets(prev_channels, out_channels, skip_channels_last, temb_channels, num_layers,
                                  groups, eps, time_scale_shift=True)
        self.attentions = nn.ModuleList(
            [AddedKVAttention(out_channels, num_heads, context_dim, groups) for _ in range(num_layers)]
        )
        self.upsamplers = (nn.ModuleList([_resnet(out_channels, out_channels, temb_channels, groups, eps, up=True)])
                           if add_upsample else None)

    def forward(self, x, skips, temb, context):
        for resnet, attn in zip(self.resnets, self.attentions):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C_running + C_skip, H, W)
            x = attn(resnet(x, temb), context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, temb)  # (B, C, 2H, 2W)
        return x
