"""The Kandinsky 2.2 decoder, minidiff vs diffusers: a decoder-UNet forward, a MoVQ decode and the
decoder pipeline loop, the same random weights on both sides, timed interleaved.

    python benchmarks/kandinsky_decoder.py                  # CPU: reduced depth (below)
    python benchmarks/kandinsky_decoder.py --layers 3 --latent 64 --device cuda --dtypes float16   # official

The official kandinsky-2-2-decoder UNet has 1.25 B parameters (5 GB in fp32, 3 resnets per
level). By default this script keeps its widths (384 ... 1536 channels, heads of 64, image
embedding 1280 -> 32 context tokens of 768) and uses `--layers` resnets per level, on 32x32
latents (a 256x256 image), so one forward has the official per-block shapes and fits a small
CPU. MoVQ is the official config (67.8 M parameters), decoding a 32x32 latent to 256x256. The
pipeline part uses the tiny random decoder folder of minidiff.reference, where the loop's own
overhead, not the convolutions, dominates.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from common import describe_machine, interleaved_median_times

from minidiff.data import config_folder


def official(name: str) -> dict:
    path = config_folder("kandinsky-2-2-decoder") / name / "config.json"
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def pair(ref_cls, ours_cls, config: dict, dtype, device):
    torch.manual_seed(0)
    ref = ref_cls(**config)
    ours = ours_cls.from_config(config)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(device, dtype).eval(), ours.to(device, dtype).eval()


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def main() -> None:
    import diffusers

    from minidiff.models.unet import UNet2DConditionModel
    from minidiff.models.vq import VQModel

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--layers", type=int, default=1, help="resnets per UNet level (official: 3)")
    p.add_argument("--latent", type=int, default=32, help="latent side (official 512 px: 64)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (1 image x 2 guidance branches)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(describe_machine(args.device))
    print()
    print("| part | dtype | minidiff s | diffusers s | ratio | max rel. diff |")
    print("|---|---|---|---|---|---|")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        config = {**official("unet"), "layers_per_block": args.layers}
        ref, ours = pair(diffusers.UNet2DConditionModel, UNet2DConditionModel, config, dtype, args.device)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, 4, args.latent, args.latent, generator=g).to(args.device, dtype)
        e = torch.randn(args.batch, config["encoder_hid_dim"], generator=g).to(args.device, dtype)
        t = torch.tensor(500, device=args.device)
        kw = dict(added_cond_kwargs={"image_embeds": e})
        with torch.no_grad():
            err = rel(ours(x, t, None, **kw).sample, ref(x, t, None, **kw).sample)
            times = interleaved_median_times({"ours": lambda: ours(x, t, None, **kw), "ref": lambda: ref(x, t, None, **kw)},
                                             args.device, repeats=args.repeats)
        print(f"| decoder UNet forward (official widths, {args.layers} of 3 resnets per level, batch {args.batch}, "
              f"{args.latent}x{args.latent}) | {name} | {times['ours']:.4f} | {times['ref']:.4f} | "
              f"{times['ours'] / times['ref']:.3f} | {err:.1e} |")
        del ref, ours

        ref, ours = pair(diffusers.VQModel, VQModel, official("movq"), dtype, args.device)
        z = torch.randn(1, 4, args.latent, args.latent, generator=g).to(args.device, dtype)
        with torch.no_grad():
            err = rel(ours.decode(z, force_not_quantize=True).sample, ref.decode(z, force_not_quantize=True).sample)
            times = interleaved_median_times({"ours": lambda: ours.decode(z, force_not_quantize=True),
                                              "ref": lambda: ref.decode(z, force_not_quantize=True)},
                                             args.device, repeats=args.repeats)
        side = args.latent * 8
        print(f"| MoVQ decode (official, {args.latent}x{args.latent} -> {side}x{side}) | {name} | {times['ours']:.4f} | "
              f"{times['ref']:.4f} | {times['ours'] / times['ref']:.3f} | {err:.1e} |")
        del ref, ours

    from minidiff import KandinskyV22Pipeline
    from minidiff.reference import TEXT_HIDDEN, save_tiny_decoder_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_decoder_pipeline(tmp)
        ref, ours = diffusers.KandinskyV22Pipeline.from_pretrained(folder), KandinskyV22Pipeline.from_pretrained(folder)
        for pipe in (ref, ours):
            pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(2)
        e, neg = torch.randn(2, TEXT_HIDDEN, generator=g), torch.randn(2, TEXT_HIDDEN, generator=g)
        run = lambda pipe: pipe(e, neg, height=32, width=32, num_inference_steps=25, output_type="pt",  # noqa: E731
                                generator=torch.Generator().manual_seed(0)).images
        err = rel(run(ours), run(ref))
        times = interleaved_median_times({"ours": lambda: run(ours), "ref": lambda: run(ref)}, "cpu", repeats=args.repeats)
        print(f"| decoder pipeline, tiny random folder, 2 images, 25 DDPM steps, guidance 4 | float32 | "
              f"{times['ours']:.4f} | {times['ref']:.4f} | {times['ours'] / times['ref']:.3f} | {err:.1e} |")


if __name__ == "__main__":
    main()
