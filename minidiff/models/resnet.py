"""The convolutional blocks shared by the VAE and the UNet.

    ResnetBlock2D  GroupNorm -> SiLU -> conv3x3 (+ time embedding) -> GroupNorm -> SiLU -> conv3x3,
                   plus a 1x1-conv shortcut when the channel count changes (He et al. 2016;
                   the DDPM UNet of Ho et al. 2020, appendix B, adds the time embedding here).
    Downsample2D   stride-2 conv3x3. The VAE encoder pads (left 0, right 1, top 0, bottom 1) and
                   convolves without padding; the UNet pads 1 on every side. Both halve H and W.
    Upsample2D     nearest-neighbour x2, then conv3x3.
    up_resnets     the resnets of one UNet up level, sized for the skip connections they take.

Two ResnetBlock2D options serve the Kandinsky 2.2 decoder UNet (minidiff/models/unet_kandinsky.py).
Both come from ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis",
section 3), the UNet that GLIDE and unCLIP's decoder build on:
    time_scale_shift  the time embedding gives a per-channel (scale, shift) applied after norm2,
                      h = norm2(h) * (1 + scale) + shift, instead of a bias added before it
                      ("adaptive group normalization").
    up / down         the resnet resamples itself (BigGAN's residual blocks, Brock et al. 2019):
                      the residual branch (after norm1 + SiLU, before conv1) and the shortcut are
                      both resized by nearest x2 or 2x2 average pooling, so there is no separate
                      up/downsampling conv and no extra parameter.

Attribute names (norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut, conv) are the diffusers
checkpoint keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResnetBlock2D(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None = None,
        groups: int = 32,
        eps: float = 1e-6,
        time_scale_shift: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.time_scale_shift, self.up, self.down = time_scale_shift, up, down
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        # The time embedding (B, temb_channels) becomes a per-channel bias (B, C_out, 1, 1), or with
        # time_scale_shift a per-channel scale and shift (twice as many outputs).
        temb_out = 2 * out_channels if time_scale_shift else out_channels
        self.time_emb_proj = nn.Linear(temb_channels, temb_out) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        # Resample both paths, so that the shortcut still matches the residual branch.
        if self.up:
            x, h = (F.interpolate(v, scale_factor=2.0, mode="nearest") for v in (x, h))  # (B, C, 2H, 2W)
        elif self.down:
            x, h = (F.avg_pool2d(v, kernel_size=2) for v in (x, h))  # (B, C, H/2, W/2)
        h = self.conv1(h)
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C_out or 2*C_out, 1, 1)
            if self.time_scale_shift:
                scale, shift = t.chunk(2, dim=1)  # two (B, C_out, 1, 1)
                h = self.norm2(h) * (1 + scale) + shift
            else:
                h = self.norm2(h + t)
        else:
            h = self.norm2(h)
        h = self.conv2(F.silu(h))  # (dropout is 0 in every SD and Kandinsky config)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample2D(nn.Module):
    def __init__(self, channels: int, asymmetric_padding: bool = False):
        super().__init__()
        self.asymmetric_padding = asymmetric_padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_padding else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_padding:
            # The LDM VAE pads only right and bottom: (W_left, W_right, H_top, H_bottom).
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        # The UNet passes the skip connection's size so odd sizes round-trip; else exactly x2.
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x)


def up_resnets(prev_channels, out_channels, skip_channels_last, temb_channels, num_layers, groups, eps,
               time_scale_shift=False) -> nn.ModuleList:
    """The resnets of one UNet up level. Resnet j sees the running features (prev_channels from the
    level below for j = 0, then out_channels) concatenated with one skip connection: the first
    num_layers - 1 skips come from this level's down-path resnets (out_channels); the last one is
    what entered the matching down block (skip_channels_last: the downsampler output of the
    level above, or conv_in's output at the top)."""
    resnets = []
    for j in range(num_layers):
        running = prev_channels if j == 0 else out_channels
        skip = skip_channels_last if j == num_layers - 1 else out_channels
        resnets.append(ResnetBlock2D(running + skip, out_channels, temb_channels, groups, eps,
                                     time_scale_shift=time_scale_shift))
    return nn.ModuleList(resnets)
