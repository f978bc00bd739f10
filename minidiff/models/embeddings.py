"""Timestep embeddings: a fixed sinusoidal code for the diffusion step t, then a small MLP.

    timestep_embedding  t (B,) -> (B, dim): sin/cos at geometrically spaced frequencies, the
                        Transformer position code (Vaswani et al. 2017, section 3.5) applied to the
                        noise level, as in the DDPM UNet (Ho et al. 2020, appendix B).
    Timesteps           the same as a parameter-free module (diffusers' `time_proj`).
    TimestepEmbedding   Linear -> activation -> Linear (`linear_1`, `linear_2`: the checkpoint keys).
    batch_timesteps     a forward's `timestep` argument (number, 0-d or (B,) tensor) -> (B,)

Shared by the UNet (SD 1.x/2.x) and the Kandinsky / unCLIP prior, so it keeps the two knobs they
differ in: `flip_sin_to_cos` (order of the halves) and `downscale_freq_shift` (spacing of the
frequencies), plus the activation and an optional output width.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minidiff.errors import InputError

# The activations diffusers' configs name ("swish" is another name for SiLU).
ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish, "relu": nn.ReLU}


def batch_timesteps(timestep, batch: int, device, number_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The timestep argument of a model's forward -> (B,) on `device`: a Python number, a 0-d
    tensor or a (B,) / (1,) tensor. A tensor passes as it is (so torch.jit.trace records it as an
    input, not a constant); a number becomes a tensor of `number_dtype` (None: torch's choice, so
    a float stays a float; the prior passes torch.long, truncating as diffusers' prior does)."""
    if isinstance(timestep, torch.Tensor):
        t = timestep.to(device)
    elif number_dtype is not None:
        t = torch.tensor([timestep], dtype=number_dtype, device=device)
    else:
        t = torch.as_tensor(timestep, device=device)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1 or t.shape[0] not in (1, batch):
        raise InputError(f"timestep must be a number, a 0-d tensor or a tensor of shape ({batch},), "
                         f"got shape {tuple(t.shape)}.")
    return t.expand(batch)  # (B,)


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t: (B,) int or float -> (B, dim) float32.

    With half = dim // 2 and i = 0 .. half-1:
        freq_i = exp(-ln(max_period) * i / (half - downscale_freq_shift))
        emb    = [sin(t * freq_i) for all i] ++ [cos(t * freq_i) for all i]
    `flip_sin_to_cos` puts the cosines first (SD and the prior do). An odd `dim` gets one zero
    column at the end. Always computed in fp32: t reaches 999, where fp16 has no fractional digits.
    """
    if t.ndim != 1:
        raise InputError(f"timestep_embedding expects a 1-D tensor of timesteps (B,), got shape {tuple(t.shape)}.")
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * i / (half - downscale_freq_shift))  # (half,)
    angles = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (B, 2*half)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)  # cos first
    if dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))  # (B, dim)
    return emb


class Timesteps(nn.Module):
    """`timestep_embedding` as a module without parameters (diffusers' `time_proj`)."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, downscale_freq_shift: float):
        super().__init__()
        self.dim, self.flip_sin_to_cos, self.downscale_freq_shift = dim, flip_sin_to_cos, downscale_freq_shift

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim, self.flip_sin_to_cos, self.downscale_freq_shift)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on the sinusoidal code: (B, in_dim) -> (B, out_dim or hidden_dim).

    SD's UNet: in_dim = block_out_channels[0] (320), hidden = 4 * 320 = 1280, SiLU.
    The prior sets `out_dim` to bring the result back to its transformer width.
    """

    def __init__(self, in_dim: int, hidden_dim: int, act: str = "silu", out_dim: int | None = None):
        super().__init__()
        if act not in ACTIVATIONS:
            raise InputError(
                f"Unknown activation {act!r} for the timestep embedding; choose one of {sorted(ACTIVATIONS)}."
            )
        self.linear_1 = nn.Linear(in_dim, hidden_dim)
        self.act = ACTIVATIONS[act]()
        self.linear_2 = nn.Linear(hidden_dim, out_dim or hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
