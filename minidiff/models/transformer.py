"""The spatial transformer of the SD UNet: the image as a sequence of tokens, attending to itself
and to the text.

    SpatialTransformer     (diffusers: Transformer2DModel; LDM: SpatialTransformer)
        x (B, C, H, W) -> GroupNorm -> proj_in -> tokens (B, H*W, C)
        -> transformer_blocks (one in every SD config) -> proj_out -> back to (B, C, H, W) + x
    BasicTransformerBlock  pre-LayerNorm block (Rombach et al. 2022, appendix / LDM code):
        x = x + attn1(norm1(x))               self-attention between image tokens
        x = x + attn2(norm2(x), context)      cross-attention: queries from the image, keys and
                                              values from the text encoder's hidden states
        x = x + ff(norm3(x))                  GEGLU feed-forward, 4x wide
    GEGLU                  proj(x) split into (value, gate) -> value * GELU(gate)
                           (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6)

proj_in / proj_out are 1x1 convolutions in SD 1.x and Linear layers in SD 2.x
(`use_linear_projection`); both are the same per-pixel linear map, only the weight shape in the
checkpoint differs ((C, C, 1, 1) vs (C, C)), and the order of projection and flattening with it.

Attribute names (norm, proj_in, transformer_blocks.i.{norm1,attn1,norm2,attn2,norm3,ff},
ff.net.0.proj, ff.net.2, proj_out) are the diffusers checkpoint keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minidiff.errors import InputError
from minidiff.models.attention import Attention


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # two (B, N, inner_dim)
        return value * F.gelu(gate)  # exact (erf) GELU, as SD was trained


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # "net.1" is a parameter-free Dropout (p = 0 in SD); kept so the Linear is "net.2".
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, context_dim: int, upcast: bool = False):
        super().__init__()
        # LayerNorm eps 1e-5 (PyTorch's default) in every SD checkpoint.
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, head_dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, num_heads, head_dim, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: (B, N, dim) image tokens, context: (B, M, context_dim) text tokens
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """(B, C, H, W) + context (B, M, context_dim) -> (B, C, H, W). C = num_heads * head_dim."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        context_dim: int,
        groups: int = 32,
        use_linear_projection: bool = False,
        upcast: bool = False,
    ):
        super().__init__()
        if channels % num_heads != 0:
            raise InputError(f"{channels} channels cannot be split into {num_heads} attention heads of equal size.")
        head_dim = channels // num_heads
        self.use_linear_projection = use_linear_projection
        # eps 1e-6 here, unlike the resnets' norm_eps: diffusers and LDM hard-code it.
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(channels, channels)
            self.proj_out = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1)
            self.proj_out = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, num_heads, head_dim, context_dim, upcast=upcast)]
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        hidden = self.norm(x)
        # Pixels become tokens, row by row: token i * W + j is pixel (i, j); channels are features.
        if self.use_linear_projection:
            hidden = self.proj_in(rearrange(hidden, "b c h w -> b (h w) c"))
        else:
            hidden = rearrange(self.proj_in(hidden), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            hidden = block(hidden, context)  # (B, H*W, C)
        # ... and back to an image, contiguous for the convolutions that follow.
        if self.use_linear_projection:
            hidden = rearrange(self.proj_out(hidden), "b (h w) c -> b c h w", h=height).contiguous()
        else:
            hidden = self.proj_out(rearrange(hidden, "b (h w) c -> b c h w", h=height).contiguous())
        return hidden + x
