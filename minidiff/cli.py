"""The `minidiff` command.

    minidiff generate PROMPT      text-to-image (a Stable Diffusion folder, or a Kandinsky 2.2 decoder
                                  folder: prompt -> prior -> decoder)
    minidiff mask IMAGE           DiffEdit step 1: where do the source and target prompts disagree?
    minidiff invert IMAGE         DiffEdit step 2: DDIM-invert the image (latents saved as safetensors)
    minidiff edit IMAGE           mask + inversion + masked denoising, writing the edited image, the
                                  mask and a panel original | mask overlay | edited
    minidiff check MODEL          compare every component of a checkpoint with diffusers/transformers
    minidiff tiny-random DIR      write a tiny random SD checkpoint (diffusers layout) to try things on
    minidiff train-shapes WHAT    train / export / evaluate the shapes-world models (WHAT: vae, clip,
                                  unet, movq, export, eval, eval-edit, ...; `minidiff train-shapes -h`)
    minidiff train-prior ...      train a Kandinsky 2.2 prior with the arguments of diffusers'
                                  train_text_to_image_prior.py (`minidiff train-prior -h`)
    minidiff train-decoder ...    train a Kandinsky 2.2 decoder UNet with the arguments of diffusers'
                                  train_text_to_image_decoder.py (`minidiff train-decoder -h`)

`generate`, `mask`, `invert` and `edit` take the defaults of their flags from the model folder's
recommended_settings.json (minidiff/pipelines/settings.py; weights/shapes has one: with no flags
they run the configuration its model card measured); a flag given overrides it, and a folder
without the file gets diffusers' defaults (the pipeline methods' own).

Every argument, the device, the input files and the output folder are checked before a model is
loaded or anything is written. Errors a user can fix (a wrong path, a bad value: minidiff's
InputError, FileNotFoundError, FileExistsError) are printed as one sentence on stderr and the
command exits with status 2, without a traceback; any other error is a bug and keeps its
traceback. `minidiff --debug ...` (or MINIDIFF_DEBUG=1) shows the traceback always.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from pathlib import Path

import PIL.Image
import torch

from minidiff.check import format_table, run_check
from minidiff.errors import InputError
from minidiff.loading import read_json, resolve_folder
from minidiff.pipelines.diffedit import DiffEditPipeline, InversionOutput
from minidiff.pipelines.images import check_image_size, mask_overlay, side_by_side
from minidiff.pipelines.settings import (
    DIFFUSERS_DEFAULTS,
    recommended_settings,
    with_diffusers_defaults,
)
from minidiff.pipelines.text_to_image import StableDiffusionPipeline
from minidiff.reference import save_tiny_pipeline
from minidiff.validation import (
    check_device,
    check_guidance,
    check_number,
    check_positive_int,
    steps_for_strength,
)

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


def check_args(args) -> None:
    """Every number and the device, before a model is loaded or a folder created."""
    if hasattr(args, "device"):
        check_device(args.device)
    if hasattr(args, "seed") and not 0 <= args.seed <= MAX_SEED:
        raise InputError(f"--seed must be a whole number from 0 to 2**64 - 1; got {args.seed}.")
    # A flag this command does not have, or an optional one not given, reads None and is skipped.
    given = {flag: getattr(args, flag[2:].replace("-", "_"), None) for flag in (
        "--steps", "--num-images", "--num-maps", "--height", "--width", "--resize", "--guidance",
        "--invert-guidance", "--threshold", "--mask-strength", "--strength", "--prior-steps", "--prior-guidance")}
    given = {flag: value for flag, value in given.items() if value is not None}
    for flag, value in given.items():
        if flag in ("--steps", "--num-images", "--num-maps", "--prior-steps"):
            check_positive_int(flag, value)
        elif flag in ("--height", "--width", "--resize"):
            check_positive_int(flag, value, " of pixels")
        elif flag in ("--guidance", "--invert-guidance", "--prior-guidance"):
            check_guidance(value, flag)
        elif flag == "--threshold":
            check_number(flag, value, low=0, low_open=True)
        else:  # a strength: then at least one step of noise on the --steps grid
            check_number(flag, value, low=0, high=1, low_open=True)
            steps_for_strength(args.steps, value, flag, "--steps")


KANDINSKY_DECODERS = ("KandinskyV22Pipeline", "KandinskyV22CombinedPipeline")


def _model_geometry(root: Path, kandinsky: bool) -> tuple[int, int, int]:
    """(size multiple, VAE or MoVQ factor, native image side) from the checkpoint's config files.
    A Kandinsky decoder's sides must also be multiples of f**2, the rounding its pipeline applies
    (kandinsky_decoder.latent_size), so that the image has the size asked for."""
    unet = read_json(resolve_folder(root, "unet"), "config.json")
    vae = read_json(resolve_folder(root, "movq" if kandinsky else "vae"), "config.json")
    f = 2 ** (len(vae["block_out_channels"]) - 1)
    halvings = 2 ** (len(unet["block_out_channels"]) - 1)
    multiple = f * max(f, halvings) if kandinsky else f * halvings
    return multiple, f, (unet.get("sample_size") or 64) * f


# Flag (argparse dest) -> the recommended_settings.json key that is its default. --guidance is
# not here: `mask` and `edit` use it for two stages with two keys (see _guidance).
FLAG_SETTINGS = {"steps": "num_inference_steps", "num_maps": "num_maps_per_mask", "mask_strength": "mask_encode_strength",
                 "threshold": "mask_thresholding_ratio", "strength": "inpaint_strength",
                 "invert_guidance": "invert_guidance_scale", "negative_prompt": "negative_prompt", "blend": "blend",
                 "prior_steps": "prior_num_inference_steps", "prior_guidance": "prior_guidance_scale"}


def read_model(args) -> None:
    """Read the model's JSON files once (one hub look-up for a repo id), before any weights and
    before the numbers are checked: `args.geometry` (see _model_geometry) and `args.settings`,
    the section of recommended_settings.json this command uses ("text_to_image" for generate,
    "diffedit" else) with diffusers' defaults for what it leaves out. Every flag not given
    (None) takes its value from `args.settings`."""
    root = resolve_folder(args.model, allow_patterns=["*.json", "*.md"])
    args.kandinsky = read_json(root, "model_index.json").get("_class_name") in KANDINSKY_DECODERS
    args.geometry = _model_geometry(root, args.kandinsky)
    if args.kandinsky and args.command != "generate":
        raise InputError(f"{args.model} is a Kandinsky decoder; `minidiff {args.command}` is DiffEdit's, which needs a "
                         "Stable Diffusion folder. `minidiff generate` runs this one.")
    if not args.kandinsky and any(getattr(args, d, None) is not None for d in ("prior_steps", "prior_guidance")):
        raise InputError("--prior-steps and --prior-guidance are for a Kandinsky decoder folder (prompt -> prior -> "
                         f"decoder); {args.model} is a Stable Diffusion folder.")
    section = "kandinsky" if args.kandinsky else "text_to_image" if args.command == "generate" else "diffedit"
    args.settings = with_diffusers_defaults(recommended_settings(root), section)
    for dest, key in FLAG_SETTINGS.items():
        if getattr(args, dest, False) is None and key in args.settings:  # a flag of this command, not given
            setattr(args, dest, args.settings[key])


def open_image(path: str, geometry: tuple[int, int, int], resize: int | None = None):
    """The input image as RGB, checked against the model's size rule (`geometry`: see
    _model_geometry) and resized on request."""
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
    multiple, f, native = geometry
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


def _guidance(args, setting: str) -> float:
    """--guidance, or the settings' scale for this stage ("guidance_scale": generate and the
    mask; "edit_guidance_scale": the masked denoising)."""
    return args.settings[setting] if args.guidance is None else args.guidance


def cmd_generate(args) -> int:
    multiple, f, native = args.geometry
    check_image_size(args.height or native, args.width or native, multiple, f, "--width/--height")
    out = make_output(plan_output(args, [f"image_{i}.png" for i in range(args.num_images)]))
    kw = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
              guidance_scale=_guidance(args, "guidance_scale"), num_images_per_prompt=args.num_images,
              generator=_generator(args.seed))
    if args.kandinsky:  # prompt -> prior -> decoder (a decoder folder brings its prior: AutoPipelineForText2Image)
        from minidiff.pipelines.kandinsky_decoder import KandinskyV22CombinedPipeline

        pipe = _load_pipeline(KandinskyV22CombinedPipeline, args)
        kw.update(height=args.height or native, width=args.width or native,
                  prior_num_inference_steps=args.prior_steps, prior_guidance_scale=args.prior_guidance)
    else:
        pipe = _load_pipeline(StableDiffusionPipeline, args)
        kw.update(height=args.height, width=args.width)
    images = pipe(args.prompt, **kw).images
    for i, image in enumerate(images):
        image.save(out / f"image_{i}.png")
    print(f"wrote {len(images)} image(s) to {out}")
    return 0


# DiffEdit: the defaults of mask / invert / edit are the model's recommended settings, and these
# three calls pass what evaluate_diffedit passes, so that a command without flags on
# weights/shapes is the configuration its model card measured.


def _mask(pipe, image, args):
    """generate_mask at latent size (one L-mode PIL image of 0/255), on the --steps grid. The
    settings' mask_clamp has no flag: with one image "per_image" and "batch" give the same mask."""
    return pipe.generate_mask(image=image, source_prompt=args.source, target_prompt=args.target,
                              num_maps_per_mask=args.num_maps, mask_encode_strength=args.mask_strength,
                              mask_thresholding_ratio=args.threshold, num_inference_steps=args.steps,
                              guidance_scale=_guidance(args, "guidance_scale"), generator=_generator(args.seed),
                              output_type="pil", mask_clamp=args.settings["mask_clamp"])[0]


def _full_size(mask, image):
    """The latent-size mask at the image's size, each latent pixel an f x f block (as evaluate
    upsamples it), so the saved mask stays 0/255."""
    return mask.resize(image.size, PIL.Image.Resampling.NEAREST)


def _warn_if_empty(mask) -> None:
    if mask.getextrema() == (0, 0):
        print("minidiff: warning: the mask is empty: nothing to edit (lower --threshold or raise --mask-strength).",
              file=sys.stderr)


def _invert(pipe, image, args):
    return pipe.invert(prompt=args.source, image=image, num_inference_steps=args.steps,
                       inpaint_strength=args.strength, guidance_scale=args.invert_guidance,
                       generator=_generator(args.seed))


def cmd_mask(args) -> int:
    image = open_image(args.image, args.geometry, args.resize)
    out = make_output(plan_output(args, ["mask.png"], [args.image]))
    pipe = _load_pipeline(DiffEditPipeline, args)
    mask = _mask(pipe, image, args)
    _warn_if_empty(mask)
    _full_size(mask, image).save(out / "mask.png")
    print(f"wrote {out / 'mask.png'}")
    return 0


def cmd_invert(args) -> int:
    image = open_image(args.image, args.geometry, args.resize)
    out = make_output(plan_output(args, ["inverted_latents.safetensors"], [args.image]))
    pipe = _load_pipeline(DiffEditPipeline, args)
    inv = _invert(pipe, image, args)
    inv.save(out / "inverted_latents.safetensors")
    print(f"wrote {out / 'inverted_latents.safetensors'} ({inv.latents.shape[1]} latents, noisiest first)")
    return 0


def cmd_edit(args) -> int:
    image = open_image(args.image, args.geometry, args.resize)
    inputs = [args.image] + ([args.latents] if args.latents else [])
    if args.latents and not Path(args.latents).is_file():
        raise FileNotFoundError(f"No inverted-latents file at {args.latents!r}.")
    saved = InversionOutput.load(args.latents) if args.latents else None  # its schedule is checked by the pipeline
    out = make_output(plan_output(args, ["edited.png", "mask.png", "panel.png"], inputs))
    pipe = _load_pipeline(DiffEditPipeline, args)
    mask = _mask(pipe, image, args)
    _warn_if_empty(mask)
    inv = saved if saved is not None else _invert(pipe, image, args)
    negative = args.source if args.negative_prompt == "source" else args.negative_prompt  # evaluate's convention
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The mask is empty")  # said once above
        edited = pipe(prompt=args.target, negative_prompt=negative, mask_image=mask, image_latents=inv,
                      num_inference_steps=args.steps, inpaint_strength=args.strength,
                      guidance_scale=_guidance(args, "edit_guidance_scale"), generator=_generator(args.seed),
                      blend=args.blend).images[0]
    big_mask = _full_size(mask, image)
    edited.save(out / "edited.png")
    big_mask.save(out / "mask.png")
    side_by_side([image, mask_overlay(image, big_mask), edited]).save(out / "panel.png")
    print(f"wrote edited.png, mask.png and panel.png (original | mask overlay | edited) to {out}")
    return 0


def cmd_check(args) -> int:
    rows = run_check(args.model, device=args.device, dtype=args.dtype, seed=args.seed,
                     latent_size=args.latent_size, image_size=args.image_size)
    print(format_table(rows))
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} checks within tolerance.")
    return 1 if bad else 0


def cmd_tiny_random(args) -> int:
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

    def default(key: str, section: str = "diffedit") -> str:
        """The help text's default: the model's file decides (read_model), else diffusers' value."""
        value = DIFFUSERS_DEFAULTS[section][key]
        shown = "none" if value is None else repr(value)
        return f"default: the model's recommended_settings.json, else diffusers' {shown}"

    def common(p, section: str, guidance_help: str | None):
        p.add_argument("--model", required=True, help="a local folder in the diffusers layout, or a hub repo id")
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", type=_dtype, default=torch.float32)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--steps", type=int, default=None,
                       help=f"DDIM steps (num_inference_steps; {default('num_inference_steps', section)})")
        if guidance_help:  # `invert` has only --invert-guidance
            p.add_argument("--guidance", type=float, default=None, help=guidance_help)
        p.add_argument("--out", default="outputs", help="folder for the results")
        p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")

    # Every default below is None: read_model fills it from the model folder's
    # recommended_settings.json (FLAG_SETTINGS), else with diffusers' default, once --model is known.

    def diffedit_args(p, mask=True, invert=True):
        p.add_argument("image", help="the input image file")
        p.add_argument("--resize", type=int, default=None,
                       help="resize the image first so that its longer side is this many pixels")
        p.add_argument("--source", required=True, help="text describing the image now (e.g. 'a red circle')")
        if mask:
            p.add_argument("--target", required=True, help="text describing the edit (e.g. 'a blue square')")
            p.add_argument("--num-maps", type=int, default=None,
                           help=f"noise draws averaged for the mask (num_maps_per_mask; {default('num_maps_per_mask')})")
            p.add_argument("--mask-strength", type=float, default=None,
                           help=f"mask_encode_strength ({default('mask_encode_strength')})")
            p.add_argument("--threshold", type=float, default=None,
                           help=f"mask_thresholding_ratio ({default('mask_thresholding_ratio')})")
        if invert:
            p.add_argument("--strength", type=float, default=None,
                           help=f"inpaint_strength: how far to invert ({default('inpaint_strength')})")
            p.add_argument("--invert-guidance", type=float, default=None,
                           help=f"guidance scale of the inversion (invert_guidance_scale, 1 = plain DDIM inversion, the "
                                f"most faithful; {default('invert_guidance_scale')})")
        stages = ("the mask and of the masked denoising (guidance_scale and edit_guidance_scale; "
                  f"{default('guidance_scale')})" if invert else f"the mask (guidance_scale; {default('guidance_scale')})")
        common(p, "diffedit", f"classifier-free guidance scale of {stages}" if mask else None)

    p = sub.add_parser("generate", help="text-to-image")
    p.add_argument("prompt")
    p.add_argument("--negative-prompt", default=None, help=default("negative_prompt", "text_to_image"))
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--prior-steps", type=int, default=None,
                   help="Kandinsky folders: the prior's steps (prior_num_inference_steps; default: the model's "
                        "recommended_settings.json, else diffusers' 25)")
    p.add_argument("--prior-guidance", type=float, default=None,
                   help="Kandinsky folders: the prior's guidance scale (default: the settings, else diffusers' 4.0)")
    common(p, "text_to_image", f"classifier-free guidance scale ({default('guidance_scale', 'text_to_image')})")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("mask", help="DiffEdit step 1: the edit mask")
    diffedit_args(p, invert=False)
    p.set_defaults(func=cmd_mask)

    p = sub.add_parser("invert", help="DiffEdit step 2: DDIM inversion")
    diffedit_args(p, mask=False)
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("edit", help="DiffEdit: mask + inversion + masked denoising")
    diffedit_args(p)
    p.add_argument("--blend", choices=["diffusers", "aligned"], default=None,
                   help=f"where the unmasked region comes from (see pipelines/diffedit.py; {default('blend')})")
    p.add_argument("--latents", default=None,
                   help="inverted_latents.safetensors from `minidiff invert` (its schedule is checked) instead of "
                        "inverting again")
    p.add_argument("--negative-prompt", default=None,
                   help=f"negative prompt of the masked denoising ({default('negative_prompt')}); \"source\" "
                        "uses the source prompt, as diffusers' DiffEdit example does")
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

    p = sub.add_parser("train-prior", help="train a Kandinsky 2.2 prior (the guide's script arguments)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of minidiff.training.prior")
    p.set_defaults(func=cmd_train_prior)

    p = sub.add_parser("train-decoder", help="train a Kandinsky 2.2 decoder UNet (the guide's decoder-script arguments)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of minidiff.training.decoder")
    p.set_defaults(func=cmd_train_decoder)
    return parser


def cmd_train_shapes(args) -> int:
    from minidiff.training.shapes.train import main as train_main

    train_main(args.rest, prog="minidiff train-shapes")
    return 0


def cmd_train_prior(args) -> int:
    from minidiff.training.prior import main as train_main

    train_main(args.rest, prog="minidiff train-prior")
    return 0


def cmd_train_decoder(args) -> int:
    from minidiff.training.decoder import main as train_main

    train_main(args.rest, prog="minidiff train-decoder")
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
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # The train-* commands hand their arguments on (`rest`, a REMAINDER); argparse leaves a
    # REMAINDER empty when it starts with a flag (train-prior's all do) and returns them as extra.
    if extra and not hasattr(args, "rest"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.rest = extra + args.rest
    _created.clear()
    debug = args.debug or os.environ.get("MINIDIFF_DEBUG", "") not in ("", "0")
    try:
        if args.func in (cmd_generate, cmd_mask, cmd_invert, cmd_edit):
            read_model(args)  # fills the flags not given from the model's recommended settings
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
