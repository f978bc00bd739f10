"""Memory techniques on the full SD 1.5 configuration (random weights): latency and peak memory,
minidiff beside diffusers' equivalent in the same process.

    python benchmarks/memory.py                               # CPU default (see the sizes below)
    python benchmarks/memory.py --only unet --latent 64       # one section, 512x512 latents
    python benchmarks/memory.py --device cuda --latent 64 --vae-sizes 1024 2048 --vae-untiled 1024 2048

Sections (--only, repeatable; default all):
    unet     one UNet forward, batch 1: fp32, bf16 (--dtype sets the base), channels-last,
             regional compilation (minidiff compile_blocks vs diffusers compile_repeated_blocks,
             inductor; --no-compile skips it; compile time is reported apart, not in the median)
    nf4      the same forward with NF4 attention / feed-forward Linear layers: minidiff
             quantize_model vs bitsandbytes Linear4bit swapped into the same layers (bitsandbytes
             runs on the CPU since 0.48); weight bytes of the whole UNet before and after; then
             minidiff alone with every conv and Linear in NF4 (quantize_model(convs=True))
    offload  the same forward under model / sequential / group offload: minidiff's hooks vs
             accelerate's cpu_offload_with_hook / cpu_offload (what diffusers'
             enable_model_cpu_offload / enable_sequential_cpu_offload install) and diffusers'
             apply_group_offloading; OffloadTracer's bytes moved and peak weights on the device
    combos   (--only combos) NF4 + torch.compile + model CPU offload, the combinations of the
             quantization-compile-offload guide: minidiff vs diffusers' UNet with bitsandbytes
    vae      VAE decode of one latent to a large image, tiled (minidiff and diffusers
             enable_tiling) vs untiled (--vae-untiled sizes only: the untiled decoder's activations
             grow with the image; at 2048x2048 they need many GB)
    slicing  the same forward with attention slicing off / "auto" / "max": minidiff
             set_attention_slice on the "math" backend (the one whose score matrices slicing
             shrinks) vs diffusers' set_attention_slice (default processor; SlicedAttnProcessor
             when on); last row: slicing off with minidiff on "sdpa". Pass --latent 48 or more
             on a CPU: at 32 (scores+probs 64 MB) the forward's peak lies elsewhere and all
             rows show about the same peak

Unit of work for the UNet rows: ONE UNet forward (timestep 500, 77 text tokens), batch 1, at
`--latent` x `--latent` latents (64 = a 512x512 image). The CPU default is 32 (256x256) and the
VAE sizes are small because one 64x64 forward takes ~20 s on a 2-core CPU; pass the sizes of the
issue on a GPU.

Offloading on a CPU-only machine: the offload "device" is the CPU itself (a rehearsal: every
onload still copies each weight into a fresh tensor), so the times only show the hooks' overhead
and copy cost, and nothing is saved; offload timing is only meaningful on a GPU. What carries over
is the schedule: bytes moved per forward and the peak of weights resident on the device
(OffloadTracer), which are the same on a GPU.

Conventions (benchmarks/common.py): same process, warm-up excluded, median of repeats, the two
libraries timed in turns; peak memory = what one call adds above the memory in use before it
(CPU: peak resident set, VmHWM; CUDA: max_memory_allocated), so resident weights are excluded and
shown in their own column. On a CPU, memory freed by an earlier measurement is reused without
raising the resident set, so a small peak (even 0) means "fits in memory the process already
holds", not "needs nothing".
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import warnings

import torch
from common import describe_machine, interleaved_median_times, measure_peak, median_time
from torch import nn

from minidiff.data import config_folder

CONFIGS = config_folder("stable-diffusion-v1-5")


def state_mb(model: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20


def build_unets(dtype: torch.dtype, device: str):
    """diffusers' SD 1.5 UNet with random weights, and minidiff's with the very same weights."""
    import diffusers

    from minidiff.loading import load_strict
    from minidiff.models.unet import UNet2DConditionModel

    config = json.loads((CONFIGS / "unet/config.json").read_text())
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel.from_config(config).to(device, dtype).eval()
    with torch.device("meta"):
        ours = UNet2DConditionModel.from_config(config)
    load_strict(ours, {k: v.clone() for k, v in ref.state_dict().items()}, "diffusers' random SD 1.5 UNet")
    return ours.to(device).eval(), ref


def unet_inputs(args, dtype, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, args.latent, args.latent, generator=g).to(device, dtype)
    ctx = torch.randn(1, 77, 768, generator=g).to(device, dtype)
    t = torch.tensor([500], device=device)
    return x, t, ctx


def compare(name, ours_fn, ref_fn, device, repeats, ours_mb, ref_mb, rows, note=""):
    """Time and measure both callables; append one markdown row."""
    with torch.inference_mode():
        times = interleaved_median_times({"m": ours_fn, "d": ref_fn}, device, warmup=1, repeats=repeats)
        peak_o, peak_r = measure_peak(ours_fn, device), measure_peak(ref_fn, device)
    t_o, t_r = times["m"], times["d"]
    row = (f"| {name} | {t_o:.2f} | {t_r:.2f} | {t_o / t_r:.2f} | {peak_o:.0f} | {peak_r:.0f} | "
           f"{peak_o / max(peak_r, 1):.2f} | {ours_mb:.0f} | {ref_mb:.0f} | {note} |")
    print(row, flush=True)
    rows.append(row)
    return t_o, t_r


UNET_HEADER = ("| technique | minidiff s | diffusers s | time ratio m/d | minidiff peak MB | diffusers peak MB "
               "| peak ratio m/d | minidiff weights MB | diffusers weights MB | note |\n"
               "|---|---|---|---|---|---|---|---|---|---|")


def section_unet(args, device):
    from minidiff.memory.compile import to_channels_last

    print(f"\n### UNet: one forward, batch 1, latents {args.latent}x{args.latent} (image {8 * args.latent}px)\n")
    print(UNET_HEADER)
    rows = []
    dtypes = [args.dtype] + [d for d in ("float32", "bfloat16") if d != args.dtype]
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        ours, ref = build_unets(dtype, device)
        x, t, ctx = unet_inputs(args, dtype, device)
        run_o, run_r = (lambda: ours(x, t, ctx).sample), (lambda: ref(x, t, ctx).sample)
        mb_o, mb_r = state_mb(ours), state_mb(ref)
        compare(dtype_name, run_o, run_r, device, args.repeats, mb_o, mb_r, rows)
        if dtype_name != args.dtype:  # channels-last and compile on the base dtype only
            del ours, ref
            gc.collect()
            continue
        to_channels_last(ours)
        ref.to(memory_format=torch.channels_last)
        xc = x.to(memory_format=torch.channels_last)
        compare(f"{dtype_name} + channels-last", lambda: ours(xc, t, ctx).sample, lambda: ref(xc, t, ctx).sample,
                device, args.repeats, mb_o, mb_r, rows)
        ours.to(memory_format=torch.contiguous_format)
        ref.to(memory_format=torch.contiguous_format)
        if not args.no_compile:
            compiled_row(args, ours, ref, run_o, run_r, dtype_name, device, mb_o, mb_r, rows)
        del ours, ref
        gc.collect()
    return rows


def compiled_row(args, ours, ref, run_o, run_r, dtype_name, device, mb_o, mb_r, rows):
    """Regional compilation (inductor) of both UNets; the first call, which compiles, is timed apart."""
    from minidiff.memory.compile import compile_blocks, uncompile_blocks

    compile_blocks(ours, backend="inductor")
    ref.compile_repeated_blocks(backend="inductor")
    with torch.inference_mode():
        t0 = time.perf_counter()
        run_o()
        c_o = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_r()
        c_r = time.perf_counter() - t0
    compare(f"{dtype_name} + compiled blocks (inductor)", run_o, run_r, device, args.repeats, mb_o, mb_r, rows,
            note=f"first call (compile) {c_o:.0f} s / {c_r:.0f} s")
    uncompile_blocks(ours)
    uncompile_blocks(ref)


def section_compile(args, device):
    """The compiled row alone (section "unet" includes it unless --no-compile)."""
    print(f"\n### UNet compiled: one forward, batch 1, latents {args.latent}x{args.latent}\n")
    print(UNET_HEADER)
    rows = []
    dtype = getattr(torch, args.dtype)
    ours, ref = build_unets(dtype, device)
    x, t, ctx = unet_inputs(args, dtype, device)
    compiled_row(args, ours, ref, lambda: ours(x, t, ctx).sample, lambda: ref(x, t, ctx).sample, args.dtype, device,
                 state_mb(ours), state_mb(ref), rows)
    return rows


def swap_bnb(model: nn.Module, names: list[str], compute_dtype: torch.dtype) -> int:
    """Replace the named nn.Linear layers of a diffusers model by bitsandbytes Linear4bit (NF4,
    block size 64, no double quantisation: the same settings as minidiff's default); returns
    the bytes of the quantised weights (packed codes + absmax)."""
    import bitsandbytes as bnb

    nbytes = 0
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, child)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", quant_storage=torch.uint8)
        q.weight = bnb.nn.Params4bit(lin.weight.data.float(), requires_grad=False, quant_type="nf4", blocksize=64)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        q = q.to(lin.weight.device)  # quantises here
        nbytes += q.weight.numel() + q.weight.quant_state.absmax.numel() * 4
        setattr(parent, child, q)
    return nbytes


def section_nf4(args, device):
    from minidiff.memory.nf4 import quantize_model

    print(f"\n### NF4 (attention + feed-forward Linear layers), one UNet forward, latents {args.latent}x{args.latent}, "
          f"compute dtype {args.dtype}\n")
    print(UNET_HEADER)
    rows = []
    dtype = getattr(torch, args.dtype)
    ours, ref = build_unets(dtype, device)
    x, t, ctx = unet_inputs(args, dtype, device)
    fp_mb = state_mb(ours)
    _, summary = quantize_model(ours, compute_dtype=dtype)
    bnb_bytes = swap_bnb(ref, summary.layers, dtype)
    compare("NF4 (Linear layers)", lambda: ours(x, t, ctx).sample, lambda: ref(x, t, ctx).sample, device, args.repeats,
            state_mb(ours), state_mb(ref), rows,
            note=f"{len(summary.layers)} layers; fp weights {fp_mb:.0f} MB")
    print(f"\nminidiff: swapped-layer bytes {summary.weight_bytes_before / 2**20:.1f} -> {summary.weight_bytes_after / 2**20:.1f} MB "
          f"({summary.weight_ratio:.3f}x; bitsandbytes {bnb_bytes / 2**20:.1f} MB); whole UNet "
          f"{summary.model_bytes_before / 2**20:.0f} -> {summary.model_bytes_after / 2**20:.0f} MB ({summary.model_ratio:.3f}x)")
    with torch.inference_mode():
        out_o, out_r = ours(x, t, ctx).sample.float(), ref(x, t, ctx).sample.float()
    print(f"max |minidiff NF4 - bitsandbytes NF4| / max |bitsandbytes| = "
          f"{((out_o - out_r).abs().max() / out_r.abs().max()).item():.2e}")
    # minidiff only (bitsandbytes has no 4-bit convolution): every conv and every Linear in NF4.
    del ref
    gc.collect()
    _, more = quantize_model(ours, include="*", convs=True, compute_dtype=dtype)
    with torch.inference_mode():
        t_c = median_time(lambda: ours(x, t, ctx).sample, device, warmup=1, repeats=args.repeats)
        p_c = measure_peak(lambda: ours(x, t, ctx).sample, device)
    row = (f"| NF4 (+ convs, every Linear; minidiff only) | {t_c:.2f} | - | - | {p_c:.0f} | - | - | {state_mb(ours):.0f} | - | "
           f"{len(summary.layers) + len(more.layers)} layers; whole UNet {state_mb(ours) / fp_mb:.3f}x |")
    print("\n" + row, flush=True)
    rows.append(row)
    del ours
    gc.collect()
    return rows


def section_offload(args, device):
    import accelerate
    from diffusers.hooks import apply_group_offloading as d_group

    from minidiff.memory.offload import (
        OffloadTracer,
        apply_group_offloading,
        enable_model_cpu_offload,
        enable_sequential_cpu_offload,
        remove_offload,
    )

    dtype = getattr(torch, args.dtype)
    target = device if device != "cpu" else "cpu"
    print(f"\n### Offload, one UNet forward, latents {args.latent}x{args.latent}, {args.dtype}, offload device {target}"
          + (" (CPU rehearsal: times show hook and copy overhead only)" if target == "cpu" else "") + "\n")
    print("| mode | minidiff s | diffusers/accelerate s | time ratio m/d | minidiff / no-offload | minidiff peak MB "
          "| diffusers peak MB | MiB moved per forward | peak weights on device MiB | units resident at most |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    ours, ref = build_unets(dtype, device)
    ours.to("cpu")
    ref.to("cpu")
    x, t, ctx = unet_inputs(args, dtype, target)
    with torch.inference_mode():
        base = median_time(lambda: ours.to(target)(x, t, ctx).sample, target, warmup=1, repeats=args.repeats)
    ours.to("cpu")
    ref_state = ref.state_dict()  # the same tensors: no hook below writes to them
    del ref
    modes = {
        "model": (lambda m: enable_model_cpu_offload(m, target),
                  lambda r: accelerate.cpu_offload_with_hook(r, execution_device=target)),
        "sequential": (lambda m: enable_sequential_cpu_offload(m, target),
                       lambda r: accelerate.cpu_offload(r, execution_device=target)),
        "group (1 block)": (lambda m: apply_group_offloading(m, target, num_blocks_per_group=1),
                            lambda r: d_group(r, onload_device=torch.device(target), offload_device=torch.device("cpu"),
                                              offload_type="block_level", num_blocks_per_group=1)),
    }
    import diffusers

    config = json.loads((CONFIGS / "unet/config.json").read_text())
    for mode, (install_o, install_r) in modes.items():
        # a fresh diffusers model for each mode (its hooks are not all removable the same way)
        with torch.device("meta"):
            r = diffusers.UNet2DConditionModel.from_config(config)
        r.load_state_dict(ref_state, assign=True)
        r = r.to(dtype).eval()
        handle = install_o(ours)
        install_r(r)
        with OffloadTracer() as tracer, torch.inference_mode():
            ours(x, t, ctx)
        t_o, t_r = compare_times(ours, r, x, t, ctx, target, args.repeats)
        with torch.inference_mode():
            p_o = measure_peak(lambda: ours(x, t, ctx).sample, target)
            p_r = measure_peak(lambda: r(x, t, ctx).sample, target)
        row = (f"| {mode} | {t_o:.2f} | {t_r:.2f} | {t_o / t_r:.2f} | {t_o / base:.2f} | {p_o:.0f} | {p_r:.0f} | "
               f"{tracer.bytes_moved() / 2**20:.0f} | {tracer.peak_bytes() / 2**20:.0f} | {tracer.max_resident()} |")
        print(row, flush=True)
        rows.append(row)
        remove_offload(handle)
        del r
        gc.collect()
    print(f"\nno offload: {base:.2f} s; UNet weights {state_mb(ours):.0f} MB")
    del ours, ref_state
    gc.collect()
    return rows


def compare_times(ours, ref, x, t, ctx, device, repeats):
    with torch.inference_mode():
        times = interleaved_median_times({"m": lambda: ours(x, t, ctx).sample, "d": lambda: ref(x, t, ctx).sample},
                                         device, warmup=1, repeats=repeats)
    return times["m"], times["d"]


def section_vae(args, device):
    import diffusers

    from minidiff.loading import load_strict
    from minidiff.models.vae import AutoencoderKL

    dtype = getattr(torch, args.dtype)
    config = json.loads((CONFIGS / "vae/config.json").read_text())
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL.from_config(config).to(device, dtype).eval()
    with torch.device("meta"):
        ours = AutoencoderKL.from_config(config)
    load_strict(ours, {k: v.clone() for k, v in ref.state_dict().items()}, "diffusers' random SD 1.5 VAE")
    ours = ours.to(device).eval()
    print(f"\n### VAE decode, one latent, {args.dtype}, tile {ours.tile_sample_min_size}px "
          f"(overlap {ours.tile_overlap_factor}); repeats {args.vae_repeats}\n")
    print("| image | mode | minidiff s | diffusers s | time ratio m/d | minidiff peak MB | diffusers peak MB | peak ratio m/d |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for size in sorted(set(args.vae_sizes) | set(args.vae_untiled)):
        z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(2)).to(device, dtype)
        for tiled in (True, False):
            if not tiled and size not in args.vae_untiled:
                continue
            if tiled and size not in args.vae_sizes:
                continue
            (ours.enable_tiling if tiled else ours.disable_tiling)()
            (ref.enable_tiling if tiled else ref.disable_tiling)()
            run_o, run_r = (lambda: ours.decode(z).sample), (lambda: ref.decode(z).sample)
            with torch.inference_mode():
                p_o, p_r = measure_peak(run_o, device), measure_peak(run_r, device)  # also the warm-up
                if args.vae_repeats > 0:
                    times = interleaved_median_times({"m": run_o, "d": run_r}, device, warmup=0, repeats=args.vae_repeats)
                    t_o, t_r = times["m"], times["d"]
            ts = f"{t_o:.1f} | {t_r:.1f} | {t_o / t_r:.2f}" if args.vae_repeats > 0 else "- | - | -"
            row = f"| {size}x{size} | {'tiled' if tiled else 'untiled'} | {ts} | {p_o:.0f} | {p_r:.0f} | {p_o / max(p_r, 1):.2f} |"
            print(row, flush=True)
            rows.append(row)
            gc.collect()
    return rows


def section_slicing(args, device):
    """Attention slicing: minidiff's set_attention_slice (backend "math") beside diffusers'."""
    from minidiff.models.attention import attention_backend, set_attention_slice

    dtype = getattr(torch, args.dtype)
    print(f"\n### Attention slicing, one UNet forward, batch 1, latents {args.latent}x{args.latent}, {args.dtype}; "
          'minidiff on the "math" attention backend (except the last row), diffusers on its default processor\n')
    print(UNET_HEADER)
    rows = []
    ours, ref = build_unets(dtype, device)
    x, t, ctx = unet_inputs(args, dtype, device)
    mb_o, mb_r = state_mb(ours), state_mb(ref)
    heads = json.loads((CONFIGS / "unet/config.json").read_text())["attention_head_dim"]  # SD 1.5: 8 heads
    tokens = args.latent**2  # the first level's self-attention, the largest scores of the UNet

    def run_o():
        out = ours(x, t, ctx)
        return out.sample if hasattr(out, "sample") else out

    def run_r():
        return ref(x, t, ctx).sample

    for size in (None, "auto", "max"):
        set_attention_slice(ours, size)
        ref.set_attention_slice(size)
        per_call = {None: heads, "auto": heads // 2, "max": 1}[size]  # batch 1: B*heads = heads rows
        processors = ", ".join(sorted({type(p).__name__ for p in ref.attn_processors.values()}))
        # the "math" backend holds fp32 scores and probabilities, (rows, N, N) each, per call
        score_mb = 2 * per_call * tokens**2 * 4 / 2**20
        note = (f"{per_call} of {heads} heads per call; minidiff math scores+probs at the {tokens}-token "
                f"level {score_mb:.0f} MB; diffusers {processors}")
        with attention_backend("math"):
            compare(f"slicing {size or 'off'}", run_o, run_r, device, args.repeats, mb_o, mb_r, rows, note=note)
    set_attention_slice(ours, None)
    ref.set_attention_slice(None)
    with attention_backend("sdpa"):
        compare("slicing off, minidiff sdpa", run_o, run_r, device, args.repeats, mb_o, mb_r, rows,
                note="both fused SDPA, no score matrix kept: the reference point for the rows above")
    del ours, ref
    gc.collect()
    return rows


def section_combos(args, device):
    """quantization-compile-offload.md's table on the SD 1.5 UNet: NF4 (every Linear, compute in
    --dtype: what PipelineQuantizationConfig does), then + torch.compile, then + model CPU offload.
    The reference is diffusers' UNet with bitsandbytes Linear4bit in the same layers (what its
    bitsandbytes quantizer builds; diffusers 0.42 itself refuses to quantize without a GPU),
    compiled the same way and offloaded with accelerate's cpu_offload_with_hook."""
    import accelerate

    from minidiff.memory.nf4 import quantize_model
    from minidiff.memory.offload import enable_model_cpu_offload, remove_offload

    compute = getattr(torch, args.dtype)  # the guide uses bfloat16 (--dtype bfloat16); on a CPU without
    # bf16 matrix units that is many times slower than float32
    print(f"\n### Quantization + compile + offload, one UNet forward, batch 1, latents {args.latent}x{args.latent}, "
          f"NF4 weights, {args.dtype} compute, torch.compile(backend=\"inductor\") of the whole UNet\n")
    print(UNET_HEADER)
    rows = []
    ours, ref = build_unets(compute, device)
    x, t, ctx = unet_inputs(args, compute, device)
    _, summary = quantize_model(ours, include="*", compute_dtype=compute)
    swap_bnb(ref, summary.layers, compute)
    run_o, run_r = (lambda: ours(x, t, ctx).sample), (lambda: ref(x, t, ctx).sample)
    compare("quantized", run_o, run_r, device, args.repeats, state_mb(ours), state_mb(ref), rows,
            note=f"{len(summary.layers)} Linear layers in NF4")
    ours.compile(backend="inductor")
    ref.compile(backend="inductor")
    first = {}
    with torch.inference_mode():
        for name, fn in (("m", run_o), ("d", run_r)):
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as err:  # a library whose layers do not compile: say so, keep going
                first[name] = f"failed: {type(err).__name__}"
                continue
            first[name] = f"{time.perf_counter() - t0:.0f} s"
    if all(v.endswith(" s") for v in first.values()):
        compare("quantized + compile", run_o, run_r, device, args.repeats, state_mb(ours), state_mb(ref), rows,
                note=f"first call (compile) {first['m']} / {first['d']}")
        target = device
        handle = enable_model_cpu_offload(ours, target)
        _, ref_hook = accelerate.cpu_offload_with_hook(ref, execution_device=target)
        compare("quantized + compile + model CPU offload", run_o, run_r, device, args.repeats, state_mb(ours),
                state_mb(ref), rows, note="offload device = the CPU on a CPU machine (a rehearsal)" if target == "cpu" else "")
        remove_offload(handle)
        ref_hook.remove()
    else:
        print(f"\ncompile: minidiff {first['m']}, diffusers + bitsandbytes {first['d']}")
    torch._dynamo.reset()
    del ours, ref
    gc.collect()
    return rows


SECTIONS = {"unet": section_unet, "nf4": section_nf4, "offload": section_offload, "vae": section_vae,
            "slicing": section_slicing}
# Only when asked for (minutes of compiling on a CPU): --only compile, --only combos
EXTRA_SECTIONS = {"compile": section_compile, "combos": section_combos}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(SECTIONS) + list(EXTRA_SECTIONS), action="append", help="run only these sections (repeatable)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--latent", type=int, default=None, help="UNet latent side (default 64 on CUDA, 32 on CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled-blocks row (minutes of compile on a CPU)")
    parser.add_argument("--vae-sizes", type=int, nargs="*", default=None, help="tiled decode sizes (default 1024 2048 on CUDA, 768 on CPU)")
    parser.add_argument("--vae-untiled", type=int, nargs="*", default=None, help="untiled decode sizes (default 1024 2048 on CUDA, 768 on CPU)")
    parser.add_argument("--vae-repeats", type=int, default=None, help="timed repeats per decode (default 3 on CUDA, 0 = peak only, on CPU)")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.latent = args.latent or (64 if cuda else 32)
    args.vae_sizes = args.vae_sizes if args.vae_sizes is not None else ([1024, 2048] if cuda else [768])
    args.vae_untiled = args.vae_untiled if args.vae_untiled is not None else ([1024, 2048] if cuda else [768])
    args.vae_repeats = args.vae_repeats if args.vae_repeats is not None else (3 if cuda else 0)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # silence "modules ... kept in float32" on .to(dtype)
    warnings.filterwarnings("ignore", message="Offloading to device='cpu'")  # explained in the section title
    print(describe_machine(args.device))
    for name in args.only or list(SECTIONS):
        {**SECTIONS, **EXTRA_SECTIONS}[name](args, args.device)
    print("\npeak MB: memory one call adds above what was in use before it (CPU: peak RSS, VmHWM; CUDA: "
          "max_memory_allocated); weights MB: the model's parameters and buffers.")


if __name__ == "__main__":
    main()
