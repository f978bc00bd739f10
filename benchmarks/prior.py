"""The Kandinsky 2.2 prior, minidiff vs diffusers: one PriorTransformer forward and the whole
prior pipeline (25 UnCLIP steps with guidance), the same random weights on both sides.

    python benchmarks/prior.py                        # CPU: a reduced prior (below), batch 2 (x2 for CFG)
    python benchmarks/prior.py --layers 20 --device cuda --dtypes float16   # the official size

The official kandinsky-2-2-prior has 20 blocks of width 2048 (about 1.0 B parameters, 4 GB in
fp32); by default this script keeps its widths (embedding 1280, 32 heads of 64) and uses
`--layers` blocks, so one forward has the official per-block shapes and fits a small CPU. The
pipeline part uses the tiny random prior folder of minidiff.reference (both libraries load the
same folder), where the loop's own overhead, not the matmuls, dominates.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from common import describe_machine, interleaved_median_times

from minidiff.data import config_folder


def build_priors(layers: int, dtype: torch.dtype, device: str):
    import diffusers

    from minidiff.models.prior import PriorTransformer

    config = {k: v for k, v in json.loads((config_folder("kandinsky-2-2-prior") / "prior" / "config.json").read_text()).items()
              if not k.startswith("_")}
    config["num_layers"] = layers
    torch.manual_seed(0)
    ref = diffusers.PriorTransformer(**config)
    with torch.no_grad():
        ref.clip_std.uniform_(0.5, 1.5)
    ours = PriorTransformer.from_config(config)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(device, dtype).eval(), ours.to(device, dtype).eval(), config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="prior batch (2 prompts x 2 guidance branches)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(describe_machine(args.device))
    print()
    print("| part | dtype | minidiff s | diffusers s | ratio | max rel. diff |")
    print("|---|---|---|---|---|---|")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        ref, ours, config = build_priors(args.layers, dtype, args.device)
        E, B = config["embedding_dim"], args.batch
        g = torch.Generator().manual_seed(1)
        x = torch.randn(B, E, generator=g).to(args.device, dtype)
        y = torch.randn(B, E, generator=g).to(args.device, dtype)
        states = torch.randn(B, 77, E, generator=g).to(args.device, dtype)
        mask = torch.zeros(B, 77, dtype=torch.bool, device=args.device)
        mask[:, :12] = True
        kw = dict(timestep=torch.tensor(500, device=args.device), proj_embedding=y, encoder_hidden_states=states,
                  attention_mask=mask)
        with torch.no_grad():
            a = ours(x, **kw).predicted_image_embedding.float()
            b = ref(x, **kw).predicted_image_embedding.float()
            err = ((a - b).abs().max() / b.abs().max()).item()
            times = interleaved_median_times({"ours": lambda: ours(x, **kw), "ref": lambda: ref(x, **kw)},
                                             args.device, repeats=args.repeats)
        print(f"| prior forward ({args.layers} of 20 official blocks, batch {B}) | {name} | {times['ours']:.4f} | "
              f"{times['ref']:.4f} | {times['ours'] / times['ref']:.3f} | {err:.1e} |")
        del ref, ours

    from diffusers import KandinskyV22PriorPipeline as RefPipeline

    from minidiff import DiffusionPipeline
    from minidiff.reference import save_tiny_prior_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_prior_pipeline(tmp)
        ref, ours = RefPipeline.from_pretrained(folder), DiffusionPipeline.from_pretrained(folder)
        for pipe in (ref, ours):
            pipe.set_progress_bar_config(disable=True)
        run = lambda pipe: pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0))  # noqa: E731
        a, b = run(ours).image_embeds, run(ref).image_embeds
        err = ((a - b).abs().max() / b.abs().max()).item()
        times = interleaved_median_times({"ours": lambda: run(ours), "ref": lambda: run(ref)}, "cpu", repeats=args.repeats)
        print(f"| prior pipeline, tiny random folder, 2 prompts, 25 steps, guidance 4 | float32 | {times['ours']:.4f} | "
              f"{times['ref']:.4f} | {times['ours'] / times['ref']:.3f} | {err:.1e} |")


if __name__ == "__main__":
    main()
