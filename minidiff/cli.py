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

Every argument, the device, the input files and the output folder are checked before a model is
loaded or anything is written. Errors a user can fix (a wrong path, a bad value: minidiff's
InputError, FileNotFoundError, FileExistsError) are printed as one sentence on stderr and the
command exits with status 2, without a traceback; any other error is a bug and keeps its
traceback. `minidiff --debug ...` (or MINIDIFF_DEBUG=1) shows the traceback always.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from minidiff.errors import InputError
from minidiff.pipelines.images import check_image_size

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 ... 2**64 - 1
# An image side more than this many times the model's native size is refused unless --resize is
# given: the mask stage runs the UNet on 2 x num_maps copies of the latent at once.
MAX_SIDE_FACTOR = 4


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Checks that run before anything is loaded or written


def check_device(name: str) -> str:
    """'cpu', 'cuda', 'cuda:1', 'mps' that exist in this torch build and on this machine."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {name!r}; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("CUDA is not available in this torch build (or on this machine); use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0.")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("MPS is not available on this machine; use --device cpu.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {name}: minidiff runs on cpu, cuda or mps.")
    return name


def _positive_int(args, name: str, unit: str = "") -> None:
    value = getattr(args, name.replace("-", "_"), None)
    if value is not None and value < 1:
        raise InputError(f"--{name} must be a positive whole number{unit}; got {value}.")


def _finite(args, name: str, low: float | None = None, high: float | None = None, low_open: bool = False) -> None:
    value = getattr(args, name.replace("-", "_"), None)
    if value is None:
        return
    bad = not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and value > high)
    if bad:
        lo = "" if low is None else (f" > {low:g}" if low_open else f" >= {low:g}")
        hi = "" if high is None else f" and <= {high:g}"
        raise InputError(f"--{name} must be a finite number{lo}{hi}; got {value}.")


def check_args(args) -> None:
    """Every number and the device, before a model is loaded or a folder created."""
    if hasattr(args, "device"):
        check_device(args.device)
    for name in ("steps", "num-images", "num-maps"):
        _positive_int(args, name)
    for name in ("height", "width", "resize"):
        _positive_int(args, name, " of pixels")
    if hasattr(args, "seed") and not 0 <= args.seed <= MAX_SEED:
        raise InputError(f"--seed must be a whole number from 0 to 2**64 - 1; got {args.seed}.")
    _finite(args, "guidance", low=0)
    _finite(args, "invert-guidance", low=0)
    _finite(args, "threshold", low=0, low_open=True)
    _finite(args, "mask-strength", low=0, high=1, low_open=True)
    _finite(args, "strength", low=0, high=1, low_open=True)


def _model_geometry(model: str) -> tuple[int, int, int]:
    """(size multiple, VAE factor, native image side) from the checkpoint's config files, read
    before any weights."""
    from minidiff.loading import read_json, resolve_folder

    root = resolve_folder(model, allow_patterns=["*.json"])
    read_json(root, "model_index.json")
    unet = read_json(resolve_folder(root, "unet"), "config.json")
    vae = read_json(resolve_folder(root, "vae"), "config.json")
    f = 2 ** (len(vae["block_out_channels"]) - 1)
    return f * 2 ** (len(unet["block_out_channels"]) - 1), f, unet.get("sample_size", 64) * f


def open_image(path: str, model: str, resize: int | None = None):
    """The input image as RGB, checked against the model's size rule (and resized on request)."""
    import PIL.Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"No image file at {path!r}.")
    try:
        image = PIL.Image.open(path)
        image.load()
    except PIL.UnidentifiedImageError:
        raise InputError(f"{path!r} is not an image file PIL can read.") from None
    except (OSError, SyntaxError) as err:
        raise InputError(f"{path!r} is truncated or corrupt ({err}).") from None
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema() == (0, 0):
            warnings.warn(f"{path!r} is fully transparent (alpha 0 everywhere); its RGB values are used as they are.",
                          stacklevel=2)
        elif alpha.getextrema()[0] < 255:
            # What a viewer shows: the image over white. (convert("RGB") would drop the alpha silently.)
            white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = PIL.Image.alpha_composite(white, image.convert("RGBA"))
    image = image.convert("RGB")
    multiple, f, native = _model_geometry(model)
    if resize is not None:
        scale = resize / max(image.size)
        size = tuple(max(multiple, round(v * scale / multiple) * multiple) for v in image.size)
        image = image.resize(size, PIL.Image.Resampling.LANCZOS)
    w, h = image.size
    if max(w, h) > MAX_SIDE_FACTOR * native:
        raise InputError(f"{path!r} is {w}x{h}, more than {MAX_SIDE_FACTOR}x the {native}x{native} this model was "
                         f"trained at, and DiffEdit's mask stage runs the UNet on 2 x --num-maps copies of it at once; "
                         f"pass --resize {native} to work on a resized copy.")
    if min(w, h) < multiple:
        raise InputError(f"{path!r} is {w}x{h}, smaller than the {multiple}x{multiple} minimum of this model; "
                         f"pass --resize {native}.")
    check_image_size(h, w, multiple, f, f"{path!r}")
    return image


def plan_output(args, names: list[str], inputs: list[str] = ()) -> Path:
    """Check --out without creating it: not a file, inside a folder that can be created, empty
    unless --overwrite, and none of the files to write is one of the inputs."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file, not a folder.")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"cannot create folder {str(out)!r}: {str(parent)!r} is a file.")
            break
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{str(out)!r} already exists and is not empty; choose another folder or pass --overwrite.")
    targets = {(out / n).resolve() for n in names}
    for path in inputs:
        if Path(path).resolve() in targets:
            raise InputError(f"--out {str(out)!r} would overwrite the input {path!r}; choose another folder.")
    return out


# Folders this run created: removed again (while still empty) when the run then fails on the
# user's input, e.g. a broken checkpoint found while loading, so a failed run leaves nothing behind.
_created: list[Path] = []


def make_output(out: Path) -> Path:
    top = next((p for p in [out, *out.parents][::-1] if not p.exists()), None)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if top is not None:
            _created.append(top)
        probe = out / ".minidiff-write-test"
        probe.touch()
        probe.unlink()
    except OSError as err:
        reason = err.strerror or str(err)
        raise InputError(f"cannot create folder {str(out)!r}: {reason.lower()}.") from None
    return out


def _load_pipeline(cls, args):
    pipe = cls.from_pretrained(args.model, torch_dtype=args.dtype, device=args.device)
    pipe.set_progress_bar_config(leave=False)
    return pipe


# ----------------------------------------------------------------------------------------------
# Commands: check everything, then create --out, then load the model, then work


def cmd_generate(args) -> int:
    from minidiff.pipelines.text_to_image import StableDiffusionPipeline

    multiple, f, native = _model_geometry(args.model)
    check_image_size(args.height or native, args.width or native, multiple, f, "--width/--height")
    out = make_output(plan_output(args, [f"image_{i}.png" for i in range(args.num_images)]))
    pipe = _load_pipeline(StableDiffusionPipeline, args)
    images = pipe(args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                  num_inference_steps=args.steps, guidance_scale=args.guidance, num_images_per_prompt=args.num_images,
                  generator=_generator(args.seed)).images
    for i, image in enumerate(images):
        image.save(out / f"image_{i}.png")
    print(f"wrote {len(images)} image(s) to {out}")
    return 0


def _check_steps(args) -> None:
    """The inversion and the edit run int(steps * strength) steps: at least one (checked before
    the mask stage). The mask stage takes its timestep on generate_mask's own 50-step grid."""
    strength = getattr(args, "strength", None)
    if strength is not None and int(args.steps * strength) < 1:
        raise InputError(f"--strength {strength} with --steps {args.steps} gives int({args.steps} * {strength}) = 0 "
                         f"steps; raise --strength or --steps.")


def _mask(pipe, image, args):
    return pipe.generate_mask(image=image, source_prompt=args.source, target_prompt=args.target,
                              num_maps_per_mask=args.num_maps, mask_encode_strength=args.mask_strength,
                              mask_thresholding_ratio=args.threshold, guidance_scale=args.guidance,
                              generator=_generator(args.seed), output_type="pil")[0]


def _warn_if_empty(mask) -> None:
    if mask.getextrema() == (0, 0):
        print("minidiff: warning: the mask is empty: nothing to edit (lower --threshold or raise --mask-strength).",
              file=sys.stderr)


def _invert(pipe, image, args):
    guidance = args.guidance if args.invert_guidance is None else args.invert_guidance
    return pipe.invert(prompt=args.source, image=image, num_inference_steps=args.steps,
                       inpaint_strength=args.strength, guidance_scale=guidance, generator=_generator(args.seed))


def cmd_mask(args) -> int:
    from minidiff.pipelines.diffedit import DiffEditPipeline

    _check_steps(args)
    image = open_image(args.image, args.model, args.resize)
    out = make_output(plan_output(args, ["mask.png"], [args.image]))
    pipe = _load_pipeline(DiffEditPipeline, args)
    mask = _mask(pipe, image, args)
    _warn_if_empty(mask)
    mask.resize(image.size).save(out / "mask.png")
    print(f"wrote {out / 'mask.png'}")
    return 0


def cmd_invert(args) -> int:
    from minidiff.pipelines.diffedit import DiffEditPipeline

    _check_steps(args)
    image = open_image(args.image, args.model, args.resize)
    out = make_output(plan_output(args, ["inverted_latents.safetensors"], [args.image]))
    pipe = _load_pipeline(DiffEditPipeline, args)
    inv = _invert(pipe, image, args)
    inv.save(out / "inverted_latents.safetensors")
    print(f"wrote {out / 'inverted_latents.safetensors'} ({inv.latents.shape[1]} latents, noisiest first)")
    return 0


def cmd_edit(args) -> int:
    from minidiff.pipelines.diffedit import DiffEditPipeline, InversionOutput
    from minidiff.pipelines.images import mask_overlay, side_by_side

    _check_steps(args)
    image = open_image(args.image, args.model, args.resize)
    inputs = [args.image] + ([args.latents] if args.latents else [])
    if args.latents and not Path(args.latents).is_file():
        raise FileNotFoundError(f"No inverted-latents file at {args.latents!r}.")
    saved = InversionOutput.load(args.latents) if args.latents else None  # its schedule is checked by the pipeline
    out = make_output(plan_output(args, ["edited.png", "mask.png", "panel.png"], inputs))
    pipe = _load_pipeline(DiffEditPipeline, args)
    mask = _mask(pipe, image, args)
    _warn_if_empty(mask)
    inv = saved if saved is not None else _invert(pipe, image, args)
    negative = args.source if args.negative_prompt is None else args.negative_prompt
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The mask is empty")  # said once above
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

    args.out = args.folder
    out = make_output(plan_output(args, []))
    save_tiny_pipeline(out, flavour=args.flavour, seed=args.seed)
    print(f"wrote a tiny random {args.flavour} pipeline (diffusers layout) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minidiff", description="A readable Stable Diffusion in pure PyTorch.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of every error (also: MINIDIFF_DEBUG=1)")
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
        p.add_argument("--resize", type=int, default=None,
                       help="resize the image first so that its longer side is this many pixels")
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
    p.add_argument("--latents", default=None,
                   help="inverted_latents.safetensors from `minidiff invert` (its schedule is checked) instead of "
                        "inverting again")
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


# The user's mistakes: one sentence and exit status 2. Everything else is a bug in minidiff (or in
# a library under it) and keeps its traceback.
USER_ERRORS = (InputError, FileNotFoundError, FileExistsError)


def _remove_empty_created() -> None:
    while _created:
        top = _created.pop()
        if top.is_dir() and not any(p.is_file() for p in top.rglob("*")):
            shutil.rmtree(top, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _created.clear()
    debug = args.debug or os.environ.get("MINIDIFF_DEBUG", "") not in ("", "0")
    try:
        check_args(args)
        return args.func(args)
    except USER_ERRORS as err:
        _remove_empty_created()
        if debug:
            raise
        print(f"minidiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        if debug:
            raise
        print(f"minidiff {args.command}: error: {err}. The reference libraries come with "
              "`pip install -e \".[test]\"`.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
