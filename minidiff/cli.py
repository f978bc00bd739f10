"""The `minidiff` command.

    minidiff generate PROMPT      text-to-image
    minidiff mask IMAGE           DiffEdit step 1: where do the source and target prompts disagree?
    minidiff invert IMAGE         DiffEdit step 2: DDIM-invert the image (latents saved as safetensors)
    minidiff edit IMAGE           mask + inversion + masked denoising, writing the edited image, the
                                  mask and a panel original | mask overlay | edited
    minidiff check MODEL          compare every component of a checkpoint with diffusers/transformers
    minidiff tiny-random DIR      write a tiny random SD checkpoint (diffusers layout) to try things on
    minidiff train-shapes WHAT    train / export / evaluate the shapes-world models (WHAT: vae, clip,
                                  unet, export, eval, eval-edit; `minidiff train-shapes -h` for options)

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


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _load_pipeline(cls, args):
    pipe = cls.from_pretrained(args.model, torch_dtype=args.dtype, device=args.device)
    pipe.set_progress_bar_config(leave=False)
    return pipe


def _open_image(path: str):
    import PIL.Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"No image file at {path!r}.")
    try:
        return PIL.Image.open(path).convert("RGB")
    except PIL.UnidentifiedImageError as err:
        raise ValueError(f"{path!r} is not an image file PIL can read.") from err


def _output_folder(args) -> Path:
    out = Path(args.out)
    _refuse_to_overwrite(out, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    return out


def cmd_generate(args) -> int:
    from minidiff.pipelines.text_to_image import StableDiffusionPipeline

    out = _output_folder(args)
    pipe = _load_pipeline(StableDiffusionPipeline, args)
    images = pipe(args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                  num_inference_steps=args.steps, guidance_scale=args.guidance, num_images_per_prompt=args.num_images,
                  generator=_generator(args.seed)).images
    for i, image in enumerate(images):
        image.save(out / f"image_{i}.png")
    print(f"wrote {len(images)} image(s) to {out}")
    return 0


def _mask(pipe, image, args):
    return pipe.generate_mask(image=image, source_prompt=args.source, target_prompt=args.target,
                              num_maps_per_mask=args.num_maps, mask_encode_strength=args.mask_strength,
                              mask_thresholding_ratio=args.threshold, guidance_scale=args.guidance,
                              generator=_generator(args.seed), output_type="pil")[0]


def _invert(pipe, image, args):
    guidance = args.guidance if args.invert_guidance is None else args.invert_guidance
    return pipe.invert(prompt=args.source, image=image, num_inference_steps=args.steps,
                       inpaint_strength=args.strength, guidance_scale=guidance, generator=_generator(args.seed))


def cmd_mask(args) -> int:
    from minidiff.pipelines.diffedit import DiffEditPipeline

    image = _open_image(args.image)
    out = _output_folder(args)
    pipe = _load_pipeline(DiffEditPipeline, args)
    mask = _mask(pipe, image, args)
    mask.resize(image.size).save(out / "mask.png")
    print(f"wrote {out / 'mask.png'}")
    return 0


def cmd_invert(args) -> int:
    from safetensors.torch import save_file

    from minidiff.pipelines.diffedit import DiffEditPipeline

    image = _open_image(args.image)
    out = _output_folder(args)
    pipe = _load_pipeline(DiffEditPipeline, args)
    inv = _invert(pipe, image, args)
    meta = {"num_inference_steps": str(args.steps), "inpaint_strength": str(args.strength)}
    save_file({"latents": inv.latents.contiguous(), "clean_latents": inv.clean_latents.contiguous(),
               "timesteps": inv.timesteps.contiguous()}, str(out / "inverted_latents.safetensors"), metadata=meta)
    print(f"wrote {out / 'inverted_latents.safetensors'} ({inv.latents.shape[1]} latents, noisiest first)")
    return 0


def cmd_edit(args) -> int:
    from minidiff.pipelines.diffedit import DiffEditPipeline
    from minidiff.pipelines.images import mask_overlay, side_by_side

    image = _open_image(args.image)
    out = _output_folder(args)
    pipe = _load_pipeline(DiffEditPipeline, args)
    mask = _mask(pipe, image, args)
    inv = _invert(pipe, image, args)
    negative = args.source if args.negative_prompt is None else args.negative_prompt
    edited = pipe(prompt=args.target, negative_prompt=negative, mask_image=mask, image_latents=inv,
                  num_inference_steps=args.steps, inpaint_strength=args.strength, guidance_scale=args.guidance,
                  generator=_generator(args.seed), blend=args.blend).images[0]
    big_mask = mask.resize(image.size)
    edited.save(out / "edited.png")
    big_mask.save(out / "mask.png")
    side_by_side([image, mask_overlay(image, big_mask), edited]).save(out / "panel.png")
    print(f"wrote edited.png, mask.png and panel.png (original | mask overlay | edited) to {out}")
    return 0


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

    def common(p, needs_out=True):
        p.add_argument("--model", required=True, help="a local folder in the diffusers layout, or a hub repo id")
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", type=_dtype, default=torch.float32)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--steps", type=int, default=50, help="DDIM steps (num_inference_steps)")
        p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
        if needs_out:
            p.add_argument("--out", default="outputs", help="folder for the results")
            p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")

    def diffedit_args(p, mask=True, invert=True):
        p.add_argument("image", help="the input image file")
        p.add_argument("--source", required=True, help="text describing the image now (e.g. 'a red circle')")
        if mask:
            p.add_argument("--target", required=True, help="text describing the edit (e.g. 'a blue square')")
            p.add_argument("--num-maps", type=int, default=10, help="noise maps averaged for the mask")
            p.add_argument("--mask-strength", type=float, default=0.5, help="mask_encode_strength")
            p.add_argument("--threshold", type=float, default=3.0, help="mask_thresholding_ratio")
        if invert:
            p.add_argument("--strength", type=float, default=0.8, help="inpaint_strength: how far to invert")
            p.add_argument("--invert-guidance", type=float, default=None,
                           help="guidance scale of the inversion (default: --guidance, as diffusers; 1 = plain "
                                "DDIM inversion, the most faithful)")

    p = sub.add_parser("generate", help="text-to-image")
    p.add_argument("prompt")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
    common(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("mask", help="DiffEdit step 1: the edit mask")
    diffedit_args(p, invert=False)
    common(p)
    p.set_defaults(func=cmd_mask)

    p = sub.add_parser("invert", help="DiffEdit step 2: DDIM inversion")
    diffedit_args(p, mask=False)
    common(p)
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("edit", help="DiffEdit: mask + inversion + masked denoising")
    diffedit_args(p)
    p.add_argument("--blend", choices=["diffusers", "aligned"], default="diffusers")
    p.add_argument("--negative-prompt", default=None,
                   help="negative prompt of the masked denoising; default: the source prompt (diffusers' "
                        "DiffEdit example); \"\" (unconditional) suits the small shapes model better")
    common(p)
    p.set_defaults(func=cmd_edit)

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

    p = sub.add_parser("train-shapes", help="train, export and evaluate the shapes-world models",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of minidiff.training.shapes.train")
    p.set_defaults(func=cmd_train_shapes)
    return parser


def cmd_train_shapes(args) -> int:
    from minidiff.training.shapes.train import main as train_main

    train_main(args.rest, prog="minidiff train-shapes")
    return 0


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
