"""The `minidiff` command.

    minidiff check MODEL          compare every component of a checkpoint with diffusers/transformers
    minidiff tiny-random DIR      write a tiny random SD checkpoint (diffusers layout) to try things on

Errors a user can fix (a wrong path, a bad value) are printed as one sentence on stderr and the
command exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def _refuse_to_overwrite(path: Path, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{str(path)!r} already exists and is not empty; choose another folder or pass --overwrite.")


def cmd_check(args) -> int:
    from minidiff.check import format_table, run_check

    rows = run_check(args.model, device=args.device, dtype=args.dtype, seed=args.seed,
                     latent_size=args.latent_size, image_size=args.image_size)
    print(format_table(rows))
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} checks within tolerance.")
    return 1 if bad else 0


def cmd_tiny_random(args) -> int:
    from minidiff.reference import save_tiny_pipeline

    out = Path(args.folder)
    _refuse_to_overwrite(out, args.overwrite)
    save_tiny_pipeline(out, flavour=args.flavour, seed=args.seed)
    print(f"wrote a tiny random {args.flavour} pipeline (diffusers layout) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minidiff", description="A readable Stable Diffusion in pure PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="compare a checkpoint's components with diffusers/transformers")
    p.add_argument("model", help="a local folder in the diffusers layout, or a hub repo id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", type=_dtype, default=torch.float32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latent-size", type=int, default=32, help="UNet input side in latent pixels")
    p.add_argument("--image-size", type=int, default=64, help="VAE input side in pixels")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("tiny-random", help="write a tiny random SD checkpoint built by diffusers/transformers")
    p.add_argument("folder")
    p.add_argument("--flavour", choices=["sd1", "sd2"], default="sd1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_tiny_random)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"minidiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"minidiff {args.command}: error: {err}. The reference libraries come with "
              "`pip install -e \".[test]\"`.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
