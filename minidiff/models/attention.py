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

One mask convention for every backend, the Triton kernel's included: a mask broadcasts to the
scores' (B, heads, Nq, Nk) as torch broadcasting reads it, aligned at the last dim. So a 2-D mask
is (Nq, Nk), shared by every sample and head; key padding is (B, 1, 1, Nk); CLIP's causal padding
mask is (B, 1, N, N). Boolean masks keep where True; floating masks are added to the scores.

Attention slicing (diffusers' `enable_attention_slicing` / `UNet2DConditionModel.set_attention_slice`):
`set_attention_slice(model, "auto" | "max" | n | None)` sets `Attention.slice_size`, and each layer
then runs its B*heads (sample, head) pairs through `attention()` n at a time, so the scores of the
"math" backend exist for n pairs at once instead of all B*heads. Same result, less peak memory.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minidiff.errors import InputError

BACKENDS = ("auto", "math", "sdpa", "triton")
_backend = "auto"


def set_attention_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise InputError(f"Unknown attention backend {name!r}; choose one of {BACKENDS}.")
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
    (B, H, Nq, Nk) (the convention above). `causal` lets query i see keys 0..i only. Scores,
    softmax and the weighted sum are computed in fp32 whatever the input dtype, then cast back.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    if causal:
        scores = scores.masked_fill(~_causal_keep(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = scores.softmax(dim=-1)
    return (probs @ v.float()).to(q.dtype)  # (B, H, Nq, d)


def _resolve(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> str:
    if backend != "auto":
        return backend
    if q.is_cuda:
        try:  # imported here, not at the top: Triton is optional (Linux only) and slow to import
            from minidiff.kernels.flash_attention import unsupported_reason
        except ImportError:  # no Triton
            return "sdpa"
        # The kernel takes head dims up to 256: its query tile and fp32 accumulator hold a whole
        # head row in registers. The VAE's mid-block attention has one 512-wide head (one token
        # per pixel, width = channels), so "auto" sends it, and anything else the kernel refuses,
        # to SDPA. An explicit "triton" request raises the kernel's ValueError instead: a
        # benchmark or test that asks for the kernel must not silently time another one.
        if unsupported_reason(q, k, v, mask) is None:
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
        # Imported here for the reason given in _resolve: Triton is optional and slow to import.
        from minidiff.kernels.flash_attention import flash_attention

        # `upcast` needs nothing here: the kernel never forms fp16 scores (fp32 accumulation).
        return flash_attention(q, k, v, mask=mask, causal=causal)
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

    `slice_size` (None: off) computes the attention `slice_size` (sample, head) pairs at a time;
    set it with `set_attention_slice` below. A plain attribute, not a parameter or buffer: the
    state_dict is the same either way.
    """

    slice_size: int | None = None

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
        # Split the heads, einops' "b n (h d) -> b h n d": channel h*d + i of the projection is
        # feature i of head h. A view, no copy. Written with view/transpose, not rearrange, on
        # this hottest path: rearrange costs ~6 us more per call (benchmarks/layouts.py).
        q = self.to_q(x).view(B, N, H, d).transpose(1, 2)  # (B, H, N, d)
        k = self.to_k(context).view(B, -1, H, d).transpose(1, 2)  # (B, H, M, d)
        v = self.to_v(context).view(B, -1, H, d).transpose(1, 2)  # (B, H, M, d)
        if self.slice_size is None or self.slice_size >= B * H:  # one slice would be everything
            out = attention(q, k, v, mask=mask, upcast=self.upcast)  # (B, H, N, d)
        else:
            # The same values, slice_size of the B*H (sample, head) pairs per call: the "math"
            # backend's peak score memory drops to slice_size / (B*H) of the call above.
            out = self._sliced_attention(q, k, v, mask)  # (B, H, N, d)
        out = out.transpose(1, 2).reshape(B, N, H * d)  # merge the heads: "b h n d -> b n (h d)"
        return self.to_out[0](out)

    def _sliced_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor | None) -> torch.Tensor:
        """The attention of forward(), `slice_size` rows of the flattened (B*H) axis at a time.

        Row r is head r % H of sample r // H (the order of diffusers' SlicedAttnProcessor), so a
        slice may hold heads of two samples. Each slice goes through `attention()` as one batch of
        `slice_size` heads, so the backend switch applies to it as to the unsliced call.

        Memory saved: the "math" backend holds the fp32 scores and probabilities, (B*H, N, M)
        each, for the whole call; sliced, only (slice_size, N, M) of them exist at a time, so the
        peak score memory is slice_size / (B*H) of the unsliced one (e.g. 1/16 for "max" with
        SD's 8 heads and a classifier-free-guidance batch of 2). The fused backends ("sdpa",
        "triton") keep no full score matrix to begin with; for them slicing mostly adds calls.
        """
        B, H, N, d = q.shape
        rows, step = B * H, self.slice_size
        if step < 1:
            raise InputError(f"Attention.slice_size must be a positive number of heads, got {step}.")
        q, k, v = (rearrange(t, "b h n d -> (b h) n d") for t in (q, k, v))  # row r = (r // H, r % H)
        # A mask with a batch or head axis is cut along the same rows as q, k and v; one without
        # (e.g. (Nq, Nk)) is shared by every row and passed on unchanged.
        per_row = mask is not None and any(size != 1 for size in mask.shape[:-2])
        if per_row:
            mask = mask.expand(B, H, *mask.shape[-2:])  # (B, H, Nq or 1, Nk), a view: nothing is copied
        out = q.new_empty(rows, N, d)  # attention() returns q's dtype
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            m = mask
            if per_row:
                r = torch.arange(start, stop, device=mask.device)
                m = mask[r // H, r % H].unsqueeze(0)  # (1, stop - start, Nq or 1, Nk): this slice only
            out[start:stop] = attention(q[start:stop].unsqueeze(0), k[start:stop].unsqueeze(0),
                                        v[start:stop].unsqueeze(0), mask=m, upcast=self.upcast)[0]
        return rearrange(out, "(b h) n d -> b h n d", b=B)


def set_attention_slice(model: nn.Module, slice_size: int | str | None = "auto") -> None:
    """Turn attention slicing on or off for every `Attention` module in `model`, as diffusers'
    `UNet2DConditionModel.set_attention_slice` (and `pipe.enable_attention_slicing`) does.

    slice_size: how many (sample, head) pairs each attention call computes at once, out of the
    B*heads pairs of a layer:
        "auto"  half of each layer's head count (two slices per sample; SD 1.5: 4 of 8 heads)
        "max"   1: one head of one sample at a time, the least memory and the most calls
        int n   n for every layer; must be between 1 and the smallest head count of the layers
        None    off: every layer computes all pairs in one call again
    diffusers validates the same way (it refuses a size above a layer's head count). Two
    differences: a one-head layer (the VAE's mid-block attention) gets 1 for "auto", where
    diffusers' half (0) would fail at the first forward; and diffusers' per-layer list of sizes
    is not taken here.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Attention)]
    named = isinstance(slice_size, str) and slice_size in ("auto", "max")
    is_int = isinstance(slice_size, int) and not isinstance(slice_size, bool)
    if not (slice_size is None or named or is_int):
        raise InputError(f"slice_size must be 'auto', 'max', a positive int or None, got {slice_size!r}.")
    if is_int and slice_size < 1:
        raise InputError(f"slice_size must be at least 1 (the number of heads computed at once), got {slice_size}.")
    for name, m in layers:  # every layer is checked before any is changed
        if is_int and slice_size > m.num_heads:
            raise InputError(f"slice_size {slice_size} is larger than the {m.num_heads} heads of attention "
                             f"layer {name!r}; use at most {m.num_heads}, or 'auto' or 'max'.")
    for _, m in layers:
        if slice_size == "auto":
            m.slice_size = max(1, m.num_heads // 2)
        elif slice_size == "max":
            m.slice_size = 1
        else:
            m.slice_size = slice_size  # an int, or None: off
