"""One UNet forward, minidiff vs diffusers, with the same random weights of the full SD 1.5 config.

    python benchmarks/unet_step.py                       # CPU: latents 32x32 and 64x64, batch 2
    python benchmarks/unet_step.py --device cuda --sizes 64 96

For each (latent size, dtype, channels-last) it times both libraries in this one process
(warm-up excluded, median of repeats, the two timed in turns), reports the time ratio
minidiff / diffusers (< 1 means minidiff is faster), the peak memory of the forward, and the
achieved GFLOP/s against an n x n matrix multiply measured in the same run.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import (
    count_flops,
    describe_machine,
    interleaved_median_times,
    matmul_peak_gflops,
    measure_peak,
)

from minidiff.data import config_folder

SD15_UNET = config_folder("stable-diffusion-v1-5") / "unet" / "config.json"


def build_models(dtype: torch.dtype, device: str):
    import diffusers

    from minidiff.loading import load_strict
    from minidiff.models.unet import UNet2DConditionModel

    config = json.loads(SD15_UNET.read_text())
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel.from_config(config).to(device, dtype).eval()
    with torch.device("meta"):
        ours = UNet2DConditionModel.from_config(config)
    # The same weights: our strict loader takes diffusers' state dict as it is (a copy, so that
    # changing the memory format of one model cannot touch the other).
    load_strict(ours, {k: v.clone() for k, v in ref.state_dict().items()}, "diffusers' random SD 1.5 UNet")
    return ours.eval(), ref


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = args.device
    print(describe_machine(device))
    print("| latent | dtype | channels-last | minidiff s | diffusers s | ratio | minidiff peak MB* | diffusers peak MB* "
          "| minidiff GFLOP/s | diffusers GFLOP/s | matmul peak GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        peak = matmul_peak_gflops(device, dtype)
        ours, ref = build_models(dtype, device)
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            ours.to(memory_format=fmt)
            ref.to(memory_format=fmt)
            for size in args.sizes:
                x = torch.randn(args.batch, 4, size, size, device=device, dtype=dtype).to(memory_format=fmt)
                ctx = torch.randn(args.batch, 77, 768, device=device, dtype=dtype)
                t = torch.tensor([500] * args.batch, device=device)
                run_ours = lambda: ours(x, t, ctx).sample
                run_ref = lambda: ref(x, t, ctx).sample
                with torch.inference_mode():
                    flops = count_flops(run_ours)
                    times = interleaved_median_times({"minidiff": run_ours, "diffusers": run_ref}, device,
                                                     warmup=1, repeats=args.repeats)
                    row = {"minidiff": (times["minidiff"], measure_peak(run_ours, device)),
                           "diffusers": (times["diffusers"], measure_peak(run_ref, device))}
                (t_o, m_o), (t_r, m_r) = row["minidiff"], row["diffusers"]
                print(f"| {size}x{size} | {dtype_name} | {'on' if channels_last else 'off'} | {t_o:.3f} | {t_r:.3f} | "
                      f"{t_o / t_r:.3f} | {m_o:.0f} | {m_r:.0f} | {flops / t_o / 1e9:.0f} | {flops / t_r / 1e9:.0f} | {peak:.0f} |",
                      flush=True)

    print("\n* peak MB: memory the forward adds above the resident weights (CPU: peak RSS, VmHWM; "
          "CUDA: max_memory_allocated).")


if __name__ == "__main__":
    main()
