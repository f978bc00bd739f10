"""Scaled dot-product attention, one reference and a backend switch, and the `Attention` module.

    softmax(Q K^T / sqrt(d) + mask) V          (Vaswani et al. 2017, eq. 1)

Three ways to compute the same thing:
    "math"    attention_ref below: the scores matrix written out, softmax in fp32. The truth every
              other backend is tested against; O(N^2) memory.
    "sdpa"    torch.nn.functional.scaled_dot_product_attention, which picks a fused kernel
              (flash / memory-efficient on CUDA, a blocked C++ kernel on the CPU).
    "triton"  minidiff's own flash-attention kernel (minidiff/kernels/flash_attention.py).
    "auto"    "triton" on CUDA when Triton is importable and the kernel takes the shapes (head
              dim <= 256: not the VAE's 512-wide head), else "sdpa".

Choose globally with `set_attention_backend("math")` or for a block of code with
`with attention_backend("math"): ...`.

Every model calls `attention(q, k, v, ...)` with q, k, v shaped (B, heads, N, d); the module names
(`to_q`, `to_k`, `to_v`, `to_out.0`) equal the diffusers checkpoint keys.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("auto", "math", "sdpa", "triton")
_backend = "auto"


def set_attention_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; choose one of {BACKENDS}.")
    _backend = name


def get_attention_backend() -> str:
    return _backend


@contextlib.contextmanager
def attention_backend(name: str):
    """`with attention_backend("math"): ...` runs the block with that backend, then restores."""
    previous = _backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def _causal_keep(n_q: int, n_k: int, device) -> torch.Tensor:
    """(Nq, Nk) boolean: query i may see key j when j <= i (aligned at the last key)."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(diagonal=n_k - n_q)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain attention. q: (B, H, Nq, d), k and v: (B, H, Nk, d) -> (B, H, Nq, d).

    `mask` is additive (0 keeps, -inf drops) or boolean (True keeps) and broadcasts to
    (B, H, Nq, Nk). `causal` lets query i see keys 0..i only. Scores, softmax and the weighted sum
    are computed in fp32 whatever the input dtype, then cast back.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    if causal:
        scores = scores.masked_fill(~_causal_keep(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = scores.softmax(dim=-1)
    return (probs @ v.float()).to(q.dtype)  # (B, H, Nq, d)


def _mask_4d(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A mask of fewer dims, read as broadcasting reads it: (Nq, Nk) -> (1, 1, Nq, Nk). (The Triton
    kernel itself would take a 2-D mask as (B, Nk) key padding.)"""
    if mask is None or mask.dim() >= 4:
        return mask
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _resolve(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> str:
    if backend != "auto":
        return backend
    if q.is_cuda:
        try:
            from minidiff.kernels.flash_attention import unsupported_reason
        except ImportError:  # no Triton (a Linux-only dependency)
            return "sdpa"
        # The kernel takes head dims up to 256: its query tile and fp32 accumulator hold a whole
        # head row in registers. The VAE's mid-block attention has one 512-wide head (one token
        # per pixel, width = channels), so "auto" sends it, and anything else the kernel refuses,
        # to SDPA. An explicit "triton" request raises the kernel's ValueError instead: a
        # benchmark or test that asks for the kernel must not silently time another one.
        if unsupported_reason(q, k, v, _mask_4d(mask)) is None:
            return "triton"
    return "sdpa"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    upcast: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Dispatch to the selected backend. q, k, v: (B, H, N, d). `upcast` computes in fp32
    (SD 2.1-v sets `upcast_attention` because its fp16 scores overflow)."""
    name = _resolve(backend or _backend, q, k, v, mask)
    if name == "math":
        return attention_ref(q, k, v, mask=mask, causal=causal)
    if name == "triton":
        from minidiff.kernels.flash_attention import flash_attention
        # `upcast` needs nothing here: the kernel never forms fp16 scores (fp32 accumulation).
        return flash_attention(q, k, v, mask=_mask_4d(mask), causal=causal)
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
        mask = mask.float() if mask is not None and mask.is_floating_point() else mask
    if causal and mask is not None:
        # SDPA takes a mask or the causal flag, not both: fold the causal rule into the mask.
        keep = _causal_keep(q.shape[-2], k.shape[-2], q.device)
        mask = keep & mask if mask.dtype == torch.bool else torch.where(keep, mask.to(q.dtype), float("-inf"))
        causal = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return out.to(dtype)


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names.

    Self-attention when `context` is None, cross-attention otherwise (queries from the image
    tokens, keys and values from the text tokens). x: (B, N, query_dim), context: (B, M, context_dim).
    """

    def __init__(
        self,
        query_dim: int,
        num_heads: int,
        head_dim: int,
        context_dim: int | None = None,
        bias: bool = False,
        out_bias: bool = True,
        upcast: bool = False,
    ):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.upcast = num_heads, head_dim, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        # diffusers keeps a dropout after the output projection: "to_out.0" is the Linear,
        # "to_out.1" the (parameter-free) Dropout, so the checkpoint key is "to_out.0.weight".
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, N, _ = x.shape
        H, d = self.num_heads, self.head_dim
        q = self.to_q(x).view(B, N, H, d).transpose(1, 2)  # (B, H, N, d)
        k = self.to_k(context).view(B, -1, H, d).transpose(1, 2)  # (B, H, M, d)
        v = self.to_v(context).view(B, -1, H, d).transpose(1, 2)  # (B, H, M, d)
        out = attention(q, k, v, mask=mask, upcast=self.upcast)  # (B, H, N, d)
        out = out.transpose(1, 2).reshape(B, N, H * d)  # (B, N, H*d)
        return self.to_out[0](out)
