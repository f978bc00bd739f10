"""Flash attention in Triton, forward and backward, for the shapes Stable Diffusion really has.

    O = softmax(scale * Q K^T + mask) V          q: (B, H, Nq, d), k and v: (B, H, Nk, d)

computed one (BLOCK_M x BLOCK_N) tile of the scores at a time, so the Nq x Nk matrix never exists
in memory: O(N) memory instead of O(N^2); Q is read once, K and V once per tile of queries.

What SD needs and Triton's tutorial (06-fused-attention.py) does not take:
    head dims 40 / 80 / 160 (SD 1.5), 64 (SD 2.x), 8..256 in general: padded to a power of two;
    77 text tokens as keys (cross-attention), 4096 / 1024 / 256 / 64 pixels as queries: Nq != Nk,
        neither a multiple of the block size: masked loads and a masked last tile;
    q, k, v straight from the projections (B, N, H, d).transpose(1, 2): arbitrary strides, no copy;
    CLIP's causal text encoder with padding masks: causal flag + boolean or additive masks;
    gradients for non-causal attention too (the tutorial's backward is causal-only).

Layout of this file
    _tile_scores    one tile of base-2 scores with every mask applied (shared by all 3 kernels,
                    so forward and backward can never disagree about what is masked)
    _fwd_kernel     online softmax over key tiles; writes O and the log-sum-exp of each row
    _bwd_dkdv_kernel / _bwd_dq_kernel   FlashAttention-2's backward: P recomputed from the lse
    check_inputs / unsupported_reason   every ValueError, raised before any launch
    flash_attention  the autograd.Function wrapper: what minidiff's "triton" backend calls
The plain-PyTorch truth it is tested against is `attention_ref` in minidiff/models/attention.py,
which takes the same arguments with the same meaning (masks included); this file imports no model
code (the models import it, through the dispatcher).

Design choices
    base 2      GPUs have a one-instruction exp2 (PTX ex2.approx); exp(x) compiles to
                exp2(x * log2(e)) anyway. Folding log2(e) into the softmax scale once
                (qk_scale = scale * log2(e)) saves that multiply on every score; the running max,
                the running sum and the stored log-sum-exp simply live in base 2.
    fp32 sums   q.k, the softmax statistics and P V accumulate in fp32 whatever the input dtype;
                P and dS are rounded to the input dtype only as inputs of the tensor-core
                matmuls (P is in [0, 1]). So SD 2.1-v's `upcast_attention` is honoured as is.
                fp32 inputs use tl.dot's "ieee" precision (not tf32): fp32 in, fp32 accuracy out.
    padding d   tl.arange needs powers of two: d is padded to D = 16, 32, 64, 128 or 256 with
                masked (zero) loads; see padded_head_dim. Above 256 the q tile and the fp32
                accumulator no longer fit the registers: the dispatcher sends those (the VAE's
                512-wide head) to SDPA.
    masks       broadcast to (B, H, Nq, Nk) as torch reads them (the dispatcher's convention: a
                2-D mask is (Nq, Nk)), then read through their strides, so a (B, 1, 1, Nk)
                padding mask costs no copy (stride 0 on the broadcast dims); boolean masks keep,
                float masks are added.
                A query that sees no key outputs 0 and its lse is +inf (P = 0 in the backward).
    backward    two kernels (dK/dV over key tiles, dQ over query tiles) instead of atomic adds
                into dQ: deterministic, no fp32 dQ buffer, at the price of recomputing P and dP.
    no autotune fixed block sizes per padded head dim (the tables below): SD calls ~16 distinct
                shapes, and autotuning each on first use costs seconds per shape; the benchmark
                script sweeps the alternatives instead.

On a machine without a GPU the kernels run in Triton's interpreter (numpy): set the environment
variable TRITON_INTERPRET=1 *before* this module is imported (`@triton.jit` reads it when it
decorates the kernels). The interpreter has no bfloat16 arithmetic, so bf16 needs a GPU.

References:
    Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness"
        (tiling, online softmax, recomputation in the backward; algorithm 1 and 2).
    Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"
        (algorithm 1: rescale the output once at the end, store only lse; algorithm 2: D = rowsum(dO*O)).
    Milakov & Gimelshein 2018, "Online normalizer calculation for softmax" (the running max).
    Triton tutorial 06-fused-attention.py (OpenAI): exp2 with log2(e) folded into the scale.
"""

from __future__ import annotations

import math

import torch

# Triton is a Linux-only dependency: without it this import fails, and minidiff's dispatcher
# (minidiff/models/attention.py) catches the ImportError and uses SDPA.
import triton
import triton.language as tl

from minidiff.errors import InputError

# `@triton.jit` chooses between the interpreter and the compiler when it decorates a kernel, from
# this knob (the TRITON_INTERPRET environment variable): the choice is fixed at import time.
INTERPRETED = bool(triton.knobs.runtime.interpret)

MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))


# ----------------------------------------------------------------------------------------------
# Block sizes
#
# A program owns BLOCK_M queries and walks over the keys BLOCK_N at a time. Each tile costs one
# (BLOCK_M x D) @ (D x BLOCK_N) and one (BLOCK_M x BLOCK_N) @ (BLOCK_N x D) matmul; the fp32
# accumulator (BLOCK_M x D) and the q tile live in registers for the whole loop, so the wider the
# head, the smaller the tiles must be to fit the register file (65536 x 32-bit per SM on
# A100/H100). The tables are keyed by the padded head dim D. They are starting points taken from
# the ranges the Triton tutorial autotunes over (BLOCK_M 64/128, BLOCK_N 32/64) and FlashAttention-2's
# per-head-dim choices, NOT tuned on a GPU: `python benchmarks/attention.py --sweep` measures the
# alternatives on the machine at hand. Every entry must keep BLOCK_M, BLOCK_N >= 16 (tl.dot's
# minimum) and powers of two (tl.arange's rule).
#   (BLOCK_M, BLOCK_N, num_warps, num_stages)
FWD_CONFIGS = {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 32, 8, 2), 256: (64, 32, 8, 2)}
# The dK/dV kernel keeps k, v, dk, dv (4 x BLOCK_N x D) resident and streams queries: few queries
# per step, many keys per program. The dQ kernel is the mirror image. (The tutorial's split too.)
BWD_DKDV_CONFIGS = {16: (32, 128, 4, 3), 32: (32, 128, 4, 3), 64: (32, 128, 4, 3), 128: (32, 64, 4, 2), 256: (32, 32, 8, 1)}
BWD_DQ_CONFIGS = {16: (128, 32, 4, 3), 32: (128, 32, 4, 3), 64: (128, 32, 4, 3), 128: (64, 32, 4, 2), 256: (32, 32, 8, 1)}
# The interpreter runs every program one after the other in Python: fewer, larger tiles are
# faster there; 32 still gives several tiles (and ragged last tiles) at the tests' 63..100 tokens.
INTERPRETER_CONFIG = (32, 32, 1, 1)


def _config(table: dict, block_d: int, q: torch.Tensor) -> tuple[int, int, int, int]:
    if q.device.type != "cuda":
        return INTERPRETER_CONFIG
    block_m, block_n, num_warps, num_stages = table[block_d]
    if q.dtype == torch.float32 and block_d >= 128:
        # fp32 tiles take twice the shared memory of fp16 ones (a 32 x 256 fp32 tile is 32 KiB
        # per pipeline stage): halve the query tile and drop the pipelining to stay well under
        # the 164 KiB (A100) / 228 KiB (H100) per SM.
        block_m, num_stages = max(16, block_m // 2), 1
    return block_m, block_n, num_warps, num_stages


def padded_head_dim(d: int) -> int:
    """tl.arange needs a power of two and tl.dot at least 16: 40 -> 64, 80 -> 128, 160 -> 256.
    The extra columns are loaded as zeros (masked loads) and never stored, so they add 0 to every
    q.k and produce output columns that are thrown away; the price is wasted matmul work (60%
    more for d = 40, 80 and 160; the benchmark measures it) and registers."""
    return max(16, triton.next_power_of_2(d))


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _tile_scores(
    q, k, offs_m, offs_n, n_q, n_k, qk_scale, causal_offset,
    mask_base, stride_mask_m, stride_mask_n,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Scores of one tile in base 2: s2 = (q . k) * scale * log2(e) (+ mask * log2(e)),
    -inf where query offs_m may not see key offs_n. q: (BLOCK_M, D), k: (BLOCK_N, D) -> (BLOCK_M, BLOCK_N)."""
    # fp32 accumulation whatever the input dtype (tensor cores take fp16/bf16, add in fp32).
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if not EVEN_N:  # keys past the end of the sequence (the ragged last tile)
        s = tl.where(offs_n[None, :] < n_k, s, float("-inf"))
    if CAUSAL:  # bottom-right aligned, as attention_ref: query i sees keys j <= i + (Nk - Nq)
        s = tl.where(offs_n[None, :] <= offs_m[:, None] + causal_offset, s, float("-inf"))
    if MASK_KIND != 0:
        # The mask is read through its strides: a (B, 1, 1, Nk) padding mask has stride 0 along
        # the queries, so all rows of the tile read the same (cached) bytes.
        inside = (offs_m[:, None] < n_q) & (offs_n[None, :] < n_k)
        m = tl.load(mask_base + offs_m[:, None] * stride_mask_m + offs_n[None, :] * stride_mask_n, mask=inside, other=0)
        if MASK_KIND == 1:  # boolean (stored as uint8): nonzero keeps
            s = tl.where(m != 0, s, float("-inf"))
        else:  # additive, in natural-log units like the scores: convert to base 2 as well
            s = s + m.to(tl.float32) * 1.4426950408889634
    return s


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, MASK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    H, n_q, n_k, head_dim, qk_scale,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(Nq, BLOCK_M), B*H): one program per tile of queries of one (batch, head)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64: batch * stride can pass 2^31 elements on large inputs
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim  # the padded columns: loaded as 0, never stored

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < n_q) & d_ok[None, :], other=0.0)  # (BLOCK_M, D), stays in registers
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    mask_base = MASK + b * stride_mask_b + h * stride_mask_h

    # Online softmax state per query row (FlashAttention-2, algorithm 1), all in base 2:
    #   m_i = running max of the scores, l_i = running sum of exp2(s - m_i),
    #   acc = running sum of exp2(s - m_i) * v, divided by l_i only once at the end.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    causal_offset = n_k - n_q
    hi = n_k
    if CAUSAL:  # key tiles entirely right of this query tile's diagonal are skipped, not masked
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_offset, 0), n_k)
    for start_n in range(0, hi, BLOCK_N):
        kv_rows = start_n + offs_n
        kv_mask = (kv_rows[:, None] < n_k) & d_ok[None, :]
        k = tl.load(k_base + kv_rows[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        s = _tile_scores(q, k, offs_m, kv_rows, n_q, n_k, qk_scale, causal_offset,
                         mask_base, stride_mask_m, stride_mask_n, CAUSAL, MASK_KIND, EVEN_N, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys so far has m_new = -inf; subtracting it would give
        # -inf - (-inf) = NaN. Shift such rows by 0 instead: exp2(-inf - 0) = 0, as it should be.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])  # (BLOCK_M, BLOCK_N), each <= 1
        alpha = tl.math.exp2(m_i - m_shift)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kv_rows[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        # p in [0, 1] is rounded to v's dtype for the tensor cores (fp32 inputs keep fp32).
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # A row with no visible key at all (l_i = 0) outputs 0 (attention_ref would give NaN) and gets
    # lse = +inf, so that the backward's exp2(s - lse) is 0 for it as well.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))  # log2(sum_j exp2(s2_ij))
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < n_q) & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * n_q + offs_m, lse, mask=offs_m < n_q)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, MASK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    H, n_q, n_k, head_dim, qk_scale, scale,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(Nk, BLOCK_N), B*H): one program per tile of keys; it loops over the queries.

        P  = exp2(s2 - lse)              recomputed, no Nq x Nk matrix was stored
        dV = P^T dO                      dP = dO V^T
        dS = P * (dP - D),  D = rowsum(dO * O)   (FlashAttention-2, algorithm 2, line 11/13)
        dK = scale * dS^T Q
    """
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    kv_mask = (offs_n[:, None] < n_k) & d_ok[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    mask_base = MASK + b * stride_mask_b + h * stride_mask_h
    row_base = bh.to(tl.int64) * n_q  # LSE and DELTA are (B*H, Nq), contiguous

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    causal_offset = n_k - n_q
    lo = 0
    if CAUSAL:  # queries i < start_n - (Nk - Nq) see none of these keys: start at that tile
        lo = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
    for start_m in range(lo, n_q, BLOCK_M):
        offs_m = start_m + offs_m0
        row_ok = offs_m < n_q
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        # Rows past the end get lse = +inf, so their P is exactly 0.
        lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
        s = _tile_scores(q, k, offs_m, offs_n, n_q, n_k, qk_scale, causal_offset,
                         mask_base, stride_mask_m, stride_mask_n, CAUSAL, MASK_KIND, EVEN_N, DOT_PRECISION)
        p = tl.math.exp2(s - lse[:, None])  # (BLOCK_M, BLOCK_N): the forward's softmax, exactly
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])  # gradient of the natural-log scores
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)

    dk = dk * scale  # d(scale * q.k)/dk = scale * q
    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, MASK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    H, n_q, n_k, head_dim, qk_scale, scale,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(Nq, BLOCK_M), B*H): one program per tile of queries; dQ = scale * dS K.
    A separate kernel (recomputing P and dP) instead of atomic adds into dQ from the dK/dV
    kernel: deterministic, and no fp32 dQ buffer; it costs 2 of the backward's 7 matmuls."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = offs_m < n_q
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    row_base = bh.to(tl.int64) * n_q
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    mask_base = MASK + b * stride_mask_b + h * stride_mask_h

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    causal_offset = n_k - n_q
    hi = n_k
    if CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_offset, 0), n_k)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_mask = (offs_n[:, None] < n_k) & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        s = _tile_scores(q, k, offs_m, offs_n, n_q, n_k, qk_scale, causal_offset,
                         mask_base, stride_mask_m, stride_mask_n, CAUSAL, MASK_KIND, EVEN_N, DOT_PRECISION)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq = dq * scale
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Input checks (all before any launch)


def _normalize_mask(mask: torch.Tensor | None, B: int, H: int, n_q: int, n_k: int) -> torch.Tensor | None:
    """Return the mask as a (B, H, Nq, Nk) *view* (stride 0 on broadcast dims, no copy), or raise.

    The convention of minidiff's `attention()` and of torch broadcasting: the mask's dims align
    with (B, H, Nq, Nk) from the right, each 1 or the full size. So (Nq, Nk) is shared by every
    sample and head, (B, 1, 1, Nk) is key padding, (B, 1, Nq, Nk) is CLIP's causal padding mask.
    Boolean masks keep where True; floating masks are added to the scores (0 keeps, -inf drops).
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"mask should be a torch.Tensor or None, got {type(mask).__name__}.")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise InputError(f"mask should be boolean (True keeps a key) or floating (added to the scores), got {mask.dtype}.")
    full = (B, H, n_q, n_k)
    if mask.dim() > 4 or any(m not in (1, f) for m, f in zip(reversed(mask.shape), reversed(full))):
        raise InputError(
            f"mask of shape {tuple(mask.shape)} does not fit attention of (batch, heads, queries, keys) = "
            f"{full}: its dims align with those from the right, each 1 or that size (a 2-D mask is "
            f"(queries, keys)); e.g. ({B}, 1, 1, {n_k}) for key padding."
        )
    return mask.expand(full)  # a view: stride 0 where the mask broadcasts


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> str | None:
    """Why the kernel cannot take these inputs (a sentence), or None when it can. Cheap (shapes and
    dtypes only); the dispatcher's "auto" rule asks it to route such calls to SDPA instead."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name} should be a torch.Tensor, got {type(t).__name__}."
        if t.dim() != 4:
            return f"{name} should be 4-D (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}."
        if t.dtype not in DTYPES:
            return f"{name} has dtype {t.dtype}; the kernel takes float16, bfloat16 or float32."
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v should share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}."
    if not (q.device == k.device == v.device):
        return f"q, k, v should be on one device, got {q.device}, {k.device}, {v.device}."
    (B, H, n_q, d), (Bk, Hk, n_k, dk), (Bv, Hv, n_v, dv) = q.shape, k.shape, v.shape
    if not (B == Bk == Bv and H == Hk == Hv):
        return f"q, k, v should have the same batch and heads, got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
    if n_k != n_v:
        return f"k and v should have the same number of tokens, got {n_k} and {n_v}."
    if not (d == dk == dv):
        return f"q, k, v should have the same head dim, got {d}, {dk}, {dv}."
    if d > MAX_HEAD_DIM:
        return (f"head dim {d} is above the kernel's limit of {MAX_HEAD_DIM} (a query tile and its fp32 "
                f"accumulator of {MAX_HEAD_DIM} columns already fill the registers); use the 'sdpa' backend.")
    if min(B, H, n_q, n_k, d) == 0:
        return f"empty inputs: q {tuple(q.shape)}, k {tuple(k.shape)}."
    if B * H > 65535:
        return f"batch x heads = {B * H} is above 65535, the limit of the launch grid's second axis."
    try:
        mask = _normalize_mask(mask, B, H, n_q, n_k)
    except ValueError as e:
        return str(e)
    if mask is not None:
        if mask.device != q.device:
            return f"mask is on {mask.device} but q is on {q.device}."
        if mask.requires_grad and torch.is_grad_enabled():
            return "The kernel gives no gradient for the mask; detach it (mask.detach()) or use the 'math' backend."
    return None


def check_inputs(q, k, v, mask=None, scale=None) -> torch.Tensor | None:
    """Raise a ValueError for anything the kernel cannot take; return the normalized mask."""
    reason = unsupported_reason(q, k, v, mask)
    if reason is not None:
        raise InputError(reason)
    if q.device.type != "cuda" and not INTERPRETED:
        raise InputError(
            f"The Triton kernel runs on CUDA tensors; these are on {q.device}. To run it on the CPU "
            "through Triton's interpreter, set TRITON_INTERPRET=1 before importing "
            "minidiff.kernels.flash_attention; or use the 'sdpa' / 'math' backend."
        )
    if INTERPRETED and q.dtype == torch.bfloat16:
        raise InputError("Triton's interpreter (numpy) has no bfloat16 arithmetic: use float16/float32 on the CPU, bf16 on a GPU.")
    if scale is not None and not isinstance(scale, (int, float)):
        raise InputError(f"scale should be a number or None (meaning 1/sqrt(head_dim)), got {type(scale).__name__}.")
    B, H, n_q, _ = q.shape
    return _normalize_mask(mask, B, H, n_q, k.shape[2])


# ----------------------------------------------------------------------------------------------
# Launchers


def _strides(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _mask_args(mask: torch.Tensor | None, q: torch.Tensor):
    """(pointer tensor, MASK_KIND, strides). bool masks are reinterpreted as uint8 (same bytes, same
    strides, no copy): loading through an int1 pointer is less well trodden in Triton."""
    if mask is None:
        return q, 0, (0, 0, 0, 0)  # a valid pointer that MASK_KIND=0 never reads
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), 1, _strides(mask)
    return mask, 2, _strides(mask)


def _dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs: "ieee", full fp32 products, since whoever passes fp32 asks for fp32 accuracy;
    # tl.dot's default would round them to tf32 (10-bit mantissa) on Ampere and later. fp16/bf16
    # go to the tensor cores as they are: None keeps tl.dot's default.
    return "ieee" if dtype == torch.float32 else None


def _forward(q, k, v, mask, causal: bool, scale: float):
    B, H, n_q, d = q.shape
    n_k = k.shape[2]
    block_d = padded_head_dim(d)
    block_m, block_n, num_warps, num_stages = _config(FWD_CONFIGS, block_d, q)
    o = torch.empty((B, H, n_q, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, n_q), device=q.device, dtype=torch.float32)
    mask_ptr, mask_kind, mask_strides = _mask_args(mask, q)
    grid = (triton.cdiv(n_q, block_m), B * H)
    _fwd_kernel[grid](
        q, k, v, o, lse, mask_ptr,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *mask_strides,
        H, n_q, n_k, d, scale * LOG2E,
        CAUSAL=causal, MASK_KIND=mask_kind, EVEN_N=n_k % block_n == 0, DOT_PRECISION=_dot_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages,
    )
    return o, lse


def _backward(do, q, k, v, o, lse, mask, causal: bool, scale: float):
    B, H, n_q, d = q.shape
    n_k = k.shape[2]
    block_d = padded_head_dim(d)
    # D_i = rowsum(dO_i * O_i) (FlashAttention-2, algorithm 2, line 4): a memory-bound row
    # reduction that PyTorch does as well as a kernel would. (B, H, Nq) fp32, contiguous.
    delta = (do.float() * o.float()).sum(-1).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask_ptr, mask_kind, mask_strides = _mask_args(mask, q)
    common = dict(CAUSAL=causal, MASK_KIND=mask_kind, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=block_d)

    block_m, block_n, num_warps, num_stages = _config(BWD_DKDV_CONFIGS, block_d, q)
    _bwd_dkdv_kernel[(triton.cdiv(n_k, block_n), B * H)](
        q, k, v, do, lse, delta, dk, dv, mask_ptr,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *mask_strides,
        H, n_q, n_k, d, scale * LOG2E, scale, EVEN_N=n_k % block_n == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **common,
    )
    block_m, block_n, num_warps, num_stages = _config(BWD_DQ_CONFIGS, block_d, q)
    _bwd_dq_kernel[(triton.cdiv(n_q, block_m), B * H)](
        q, k, v, do, lse, delta, dq, mask_ptr,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *mask_strides,
        H, n_q, n_k, d, scale * LOG2E, scale, EVEN_N=n_k % block_n == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **common,
    )
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale):
        o, lse = _forward(q, k, v, mask, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse, mask)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, mask = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, mask, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None


def flash_attention(q, k, v, mask=None, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """softmax(scale * q k^T + mask) v with the Triton kernels, differentiable in q, k, v.

    q: (B, H, Nq, d); k, v: (B, H, Nk, d); any strides; float16, bfloat16 or float32; d <= 256.
    mask: None, or a mask that broadcasts to (B, H, Nq, Nk) as in `attention()` ((Nq, Nk),
    (B, 1, 1, Nk) key padding, (B, 1, Nq, Nk), ...); boolean (True keeps) or additive.
    causal: query i sees keys j <= i + (Nk - Nq) (bottom-right aligned, as `attention_ref`).
    scale defaults to 1/sqrt(d). Returns (B, H, Nq, d) in q's dtype, contiguous. A query that
    sees no key at all gets 0 (attention_ref gives NaN there).
    """
    mask = check_inputs(q, k, v, mask, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return FlashAttentionFunction.apply(q, k, v, mask, bool(causal), scale)
