"""The convolutional blocks shared by the VAE and the UNet.

    ResnetBlock2D  GroupNorm -> SiLU -> conv3x3 (+ time embedding) -> GroupNorm -> SiLU -> conv3x3,
                   plus a 1x1-conv shortcut when the channel count changes (He et al. 2016;
                   the DDPM UNet of Ho et al. 2020, appendix B, adds the time embedding here).
    Downsample2D   stride-2 conv3x3. The VAE encoder pads (left 0, right 1, top 0, bottom 1) and
                   convolves without padding; the UNet pads 1 on every side. Both halve H and W.
    Upsample2D     nearest-neighbour x2, then conv3x3.

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
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        # The time embedding (B, temb_channels) becomes a per-channel bias (B, C_out, 1, 1).
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))  # (dropout is 0 in every SD config)
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
