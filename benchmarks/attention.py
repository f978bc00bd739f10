"""minidiff's Triton flash attention against PyTorch's SDPA, at the shapes Stable Diffusion runs.

    python benchmarks/attention.py                      # SD 1.5 + SD 2.x, 512^2 and 768^2, fp16 + bf16
    python benchmarks/attention.py --images 512 --dtypes float16 --modes fwd
    python benchmarks/attention.py --sweep              # try other block sizes for the kernel
    python benchmarks/attention.py --smoke              # CPU, Triton interpreter, tiny shapes:
                                                        # checks this script runs, measures nothing

Needs a CUDA GPU; without one it says so and exits (status 0).

Shapes: a UNet attention layer sees B = 2 (classifier-free guidance: conditional + unconditional
in one batch) and, for an image of side S, latents of side s = S / 8:
    level 0, 1, 2 (and the mid block at s/8):  Nq = s^2, (s/2)^2, (s/4)^2, (s/8)^2 image tokens
      = 4096 / 1024 / 256 / 64 at 512^2, 9216 / 2304 / 576 / 144 at 768^2
    channels 320 / 640 / 1280 / 1280
    SD 1.5: 8 heads of 40 / 80 / 160 / 160;  SD 2.x: 5 / 10 / 20 / 20 heads of 64
    self-attention (Nk = Nq) and cross-attention (Nk = 77 text tokens).

Providers, each timed in this same run on the same inputs:
    triton     minidiff.kernels.flash_attention (this repository)
    flash      SDPA restricted to FlashAttention-2 (torch.nn.attention.sdpa_kernel)
    efficient  SDPA restricted to the memory-efficient (xformers / cutlass) kernel
    math       SDPA restricted to the plain-PyTorch math path (scores materialised)
A provider that refuses a shape (e.g. a head dim it lacks) or runs out of memory shows "n/a".

Napkin math: a forward is two matmuls, 2 * (2 * B * H * Nq * Nk * d) FLOPs; a backward is
counted as 2.5 forwards (dV, dP, dS^T Q, dS K = 4 matmuls, + recomputing Q K^T), the convention of
the Triton tutorial and FlashAttention-2. minidiff's backward really does 7 matmuls (its dQ
kernel recomputes P and dP) but is credited with the same 5, so TFLOP/s compare like with like.
FLOPs always count the real head dim, so the padding of d = 40 / 80 / 160 to 64 / 128 / 256
shows up as lost TFLOP/s; the padding table compares each against the power-of-two head dim at
the same FLOPs (8 x 40 = 5 x 64 = 320 channels, 8 x 80 = 5 x 128, 8 x 160 = 5 x 256).

Each number is the median over repeated calls timed with CUDA events, after warm-up calls
(which also absorb Triton's compilation). Before timing, every shape is checked against SDPA
math on the same inputs (max |err| / max |ref| of the output and, with bwd, of dq, dk, dv).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

SD_MODELS = {  # name -> heads of each level (320, 640, 1280 channels, then the 1280-channel mid block)
    "SD 1.5": dict(heads=(8, 8, 8, 8), channels=(320, 640, 1280, 1280)),
    "SD 2.x": dict(heads=(5, 10, 20, 20), channels=(320, 640, 1280, 1280)),
}
TEXT_TOKENS = 77
PROVIDERS = ("triton", "flash", "efficient", "math")


def sd_shapes(model: str, image: int, batch: int):
    """(label, B, H, Nq, Nk, d) of every distinct attention call of one UNet step."""
    cfg = SD_MODELS[model]
    s = image // 8  # latent side
    sides = (s, s // 2, s // 4, s // 8)  # levels 0, 1, 2, mid block
    shapes = []
    for level, (side, heads, channels) in enumerate(zip(sides, cfg["heads"], cfg["channels"])):
        name = "mid" if level == 3 else f"level {level}"
        n = side * side
        d = channels // heads
        shapes.append((f"{model} {image}px {name} self", batch, heads, n, n, d))
        shapes.append((f"{model} {image}px {name} cross", batch, heads, n, TEXT_TOKENS, d))
    return shapes


def padding_shapes(image: int, batch: int):
    """Pairs at equal FLOPs: SD 1.5's 8 heads of d, against 5 heads of the power of two above."""
    s = image // 8
    pairs = []
    for side, d, d2 in ((s, 40, 64), (s // 2, 80, 128), (s // 4, 160, 256)):
        n = side * side
        assert 8 * d == 5 * d2  # same channels, same FLOPs
        pairs.append(((f"{image}px self, 8 x d={d}", batch, 8, n, n, d), (f"{image}px self, 5 x d={d2}", batch, 5, n, n, d2)))
    return pairs


# ----------------------------------------------------------------------------------------------
# Timing


def time_ms(fn, device: str, warmup: int, repeats: int) -> float:
    """Median time of fn() in milliseconds after `warmup` untimed calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def attention_fn(provider: str):
    """A function (q, k, v) -> out for one provider."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if provider == "triton":
        from minidiff.kernels.flash_attention import flash_attention
        return flash_attention
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[provider]

    def sdpa(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return sdpa


def make_inputs(B, H, n_q, n_k, d, dtype, device, seed=0):
    """q, k, v laid out as minidiff's projections produce them: (B, N, H, d) viewed as (B, H, N, d)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, n_q, H, d, device=device, dtype=dtype, generator=g).transpose(1, 2)
    k = torch.randn(B, n_k, H, d, device=device, dtype=dtype, generator=g).transpose(1, 2)
    v = torch.randn(B, n_k, H, d, device=device, dtype=dtype, generator=g).transpose(1, 2)
    return [t.requires_grad_() for t in (q, k, v)]


def measure(provider, shape, dtype, mode, device, warmup, repeats):
    """TFLOP/s of one provider on one shape, or None if it cannot run it."""
    _, B, H, n_q, n_k, d = shape
    fn = attention_fn(provider)
    try:
        q, k, v = make_inputs(B, H, n_q, n_k, d, dtype, device)
        if mode == "fwd":
            with torch.no_grad():
                ms = time_ms(lambda: fn(q, k, v), device, warmup, repeats)
        else:
            out = fn(q, k, v)
            do = torch.randn_like(out)

            def backward():
                for t in (q, k, v):
                    t.grad = None
                out.backward(do, retain_graph=True)

            ms = time_ms(backward, device, warmup, repeats)
    except Exception as e:  # no SDPA kernel for this shape, out of memory, Triton's OutOfResources, ...
        if device == "cuda":
            torch.cuda.empty_cache()
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    flops = 4 * B * H * n_q * n_k * d * (2.5 if mode == "bwd" else 1.0)
    return flops / (ms * 1e-3) / 1e12, None


def check(shape, dtype, device, with_grad: bool) -> str:
    """Max relative error of the kernel against SDPA math on the same inputs (fp32 math)."""
    from minidiff.kernels.flash_attention import flash_attention

    _, B, H, n_q, n_k, d = shape
    q, k, v = make_inputs(B, H, n_q, n_k, d, dtype, device, seed=1)
    # max |err| / max |ref|; a reference that is all 0 (dq, dk with a single key) gives |err| itself.
    rel = lambda a, b: ((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()  # noqa: E731
    out = flash_attention(q, k, v)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attention_fn("math")(q32, k32, v32)
    errs = [rel(out, ref)]
    if with_grad:
        do = torch.randn_like(out)
        errs += [rel(a, b) for a, b in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q32, k32, v32), do.float()))]
    del ref, q32, k32, v32
    return "/".join(f"{e:.0e}" for e in errs)


# ----------------------------------------------------------------------------------------------
# Block-size sweep


SWEEP = [(bm, bn, w, s) for bm in (32, 64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (1, 2, 3)]


def sweep(shapes, dtype, device, warmup, repeats):
    """For each shape, the fastest forward configuration (BLOCK_M, BLOCK_N, warps, stages) and the
    backward's (dK/dV kernel and dQ kernel swept together over the same grid, which is coarse)."""
    import minidiff.kernels.flash_attention as fa

    print("\n## Block-size sweep (TFLOP/s; copy the best into FWD_CONFIGS / BWD_*_CONFIGS)\n")
    print("| shape | padded d | mode | current config | TFLOP/s | best config | TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        block_d = fa.padded_head_dim(shape[-1])
        for mode, tables in (("fwd", (fa.FWD_CONFIGS,)), ("bwd", (fa.BWD_DKDV_CONFIGS, fa.BWD_DQ_CONFIGS))):
            current = tuple(t[block_d] for t in tables)
            base, _ = measure("triton", shape, dtype, mode, device, warmup, repeats)
            best, best_cfg = base or 0.0, current
            for cfg in SWEEP:
                for t in tables:
                    t[block_d] = cfg
                tflops, _ = measure("triton", shape, dtype, mode, device, warmup, repeats)  # OutOfResources -> None
                if tflops and tflops > best:
                    best, best_cfg = tflops, (cfg,) * len(tables)
            for t, c in zip(tables, current):
                t[block_d] = c
            print(f"| {shape[0]} ({shape[1]}x{shape[2]}x{shape[3]}x{shape[4]}x{shape[5]}) | {block_d} | {mode} | "
                  f"{current[0]} | {fmt(base)} | {best_cfg[0]} | {best:.1f} |")


def fmt(x):
    return "n/a" if x is None else f"{x:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SD_MODELS), choices=list(SD_MODELS))
    parser.add_argument("--images", type=int, nargs="+", default=[512, 768])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--modes", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check against SDPA math")
    parser.add_argument("--sweep", action="store_true", help="sweep the kernel's block sizes (slow)")
    parser.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter on tiny shapes: tests the script only")
    args = parser.parse_args()

    if args.smoke:
        # Must precede the first import of triton (see minidiff/kernels/flash_attention.py).
        os.environ["TRITON_INTERPRET"] = "1"
        device = "cpu"
        args.images, args.batch, args.warmup, args.repeats = [64], 1, 0, 1
        args.dtypes = [d for d in args.dtypes if d != "bfloat16"] or ["float16"]  # no bf16 in the interpreter
        args.providers = [p for p in args.providers if p in ("triton", "math")]
    else:
        if not torch.cuda.is_available():
            print("benchmarks/attention.py has NOT run: it times Triton GPU kernels and needs a CUDA GPU; "
                  "this machine has none. (`--smoke` runs it on tiny shapes through Triton's interpreter.)")
            return 0
        device = "cuda"
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/attention.py has NOT run: Triton is not installed.")
        return 0

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import describe_machine

    print(describe_machine(device))
    import triton as _triton
    print(f"triton {_triton.__version__}; batch {args.batch}; median of {args.repeats} calls after {args.warmup} warm-up calls")
    if args.smoke:
        print("SMOKE RUN on the CPU through Triton's interpreter: the numbers below measure nothing.")

    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for mode in args.modes:
            print(f"\n## {mode}, {dtype_name}: TFLOP/s (higher is better)\n")
            header = "| shape | B x H x Nq x Nk x d | " + " | ".join(args.providers) + " | triton / best SDPA |"
            if not args.no_check:
                header += " max rel err vs math (out/dq/dk/dv) |"
            print(header)
            print("|---" * (header.count("|") - 1) + "|")
            for model in args.models:
                for image in args.images:
                    for shape in sd_shapes(model, image, args.batch):
                        row = {p: measure(p, shape, dtype, mode, device, args.warmup, args.repeats)[0] for p in args.providers}
                        sdpa = [row[p] for p in args.providers if p != "triton" and row[p] is not None]
                        ratio = f"{row['triton'] / max(sdpa):.2f}" if row.get("triton") and sdpa else "n/a"
                        line = f"| {shape[0]} | {'x'.join(map(str, shape[1:]))} | " + " | ".join(fmt(row[p]) for p in args.providers) + f" | {ratio} |"
                        if not args.no_check:
                            try:
                                line += f" {check(shape, dtype, device, mode == 'bwd')} |"
                            except Exception as e:  # e.g. out of memory for the fp32 math reference
                                line += f" check failed: {type(e).__name__} |"
                        print(line, flush=True)

        # The cost of padding d to a power of two: equal FLOPs, so equal times would mean no cost.
        print(f"\n## Padding cost, {dtype_name}: time of 8 heads of d / time of 5 heads of 2^ceil(log2 d), equal FLOPs\n")
        print("| mode | shape | provider | ms (d) | ms (pow2) | ratio |")
        print("|---|---|---|---|---|---|")
        for mode in args.modes:
            for image in args.images:
                for odd, pow2 in padding_shapes(image, args.batch):
                    for provider in [p for p in args.providers if p in ("triton", "flash")]:
                        t_odd = measure(provider, odd, dtype, mode, device, args.warmup, args.repeats)[0]
                        t_pow2 = measure(provider, pow2, dtype, mode, device, args.warmup, args.repeats)[0]
                        flops = 4 * odd[1] * odd[2] * odd[3] * odd[4] * odd[5] * (2.5 if mode == "bwd" else 1.0)
                        ms = [None if t is None else flops / (t * 1e12) * 1e3 for t in (t_odd, t_pow2)]
                        ratio = f"{ms[0] / ms[1]:.2f}" if None not in ms else "n/a"
                        print(f"| {mode} | {odd[0]} vs {pow2[0]} | {provider} | "
                              + " | ".join("n/a" if m is None else f"{m:.3f}" for m in ms) + f" | {ratio} |")

        if args.sweep:
            shapes = [s for model in args.models for image in args.images for s in sd_shapes(model, image, args.batch)]
            sweep(shapes, dtype, device, args.warmup, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
