"""DiffEdit end to end (mask + invert + edit), minidiff vs diffusers, with the same random weights
of the full SD 1.5 configuration and the same arguments.

    python benchmarks/diffedit.py                      # CPU: 128x128 images, 10 steps, 10 maps, fp32
    python benchmarks/diffedit.py --device cuda        # GPU: 512x512, 50 steps, fp16

The components (UNet, VAE, CLIP text encoder; minidiff/data/configs/stable-diffusion-v1-5, tokenizer from
minidiff/data/clip-tokenizer) are built once by diffusers/transformers with random weights and saved in
the diffusers layout to a temporary folder; diffusers' StableDiffusionDiffEditPipeline and
minidiff's DiffEditPipeline both load that folder, in this one process. For each stage
(generate_mask, invert, the edit) it reports the median wall time of the two libraries, timed in
turns after a short untimed warm-up, the ratio minidiff / diffusers (< 1: minidiff is faster), and
the peak memory of the stage.

What to expect: minidiff's generate_mask skips the negative branch that the source and target
prompts share (2 UNet groups instead of diffusers' 4, the same mask: see minidiff/pipelines/
diffedit.py) and runs the VAE encoder once per image instead of once per noise map, so the mask
stage should take about half the time or less; invert and the edit do the same work in both
(the table counts the images through the UNet and the VAE encoder), so the total ratio depends on
how large a share of the run the mask stage is. diffusers' generate_mask swaps prompt and
negative prompt in its guidance; that changes nothing in its cost (and, with the shared empty
negative used here, not the mask either).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from common import describe_machine, interleaved_median_times, measure_peak

from minidiff.data import CLIP_TOKENIZER, CONFIGS

SD15 = CONFIGS / "stable-diffusion-v1-5"
SOURCE = "a red circle and a blue square on a white background"
TARGET = "a green circle and a blue square on a white background"


def write_random_sd15(folder: Path) -> Path:
    """Random weights with SD 1.5's configs, written by diffusers/transformers in their layout."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):  # no "Writing model shards" bars
        library.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel.from_config(json.loads((SD15 / "unet/config.json").read_text())).save_pretrained(
        folder / "unet")
    diffusers.AutoencoderKL.from_config(json.loads((SD15 / "vae/config.json").read_text())).save_pretrained(folder / "vae")
    text_config = transformers.CLIPTextConfig.from_pretrained(SD15 / "text_encoder")
    transformers.CLIPTextModel(text_config).save_pretrained(folder / "text_encoder")
    (folder / "tokenizer").mkdir()
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(CLIP_TOKENIZER / name, folder / "tokenizer" / name)
    (folder / "scheduler").mkdir()
    shutil.copy(SD15 / "scheduler/scheduler_config.json", folder / "scheduler")  # SD 1.5's (PNDM) betas, read by DDIM
    shutil.copy(SD15 / "model_index.json", folder)
    return folder


def load_pipelines(folder: Path, device: str, dtype: torch.dtype):
    import diffusers
    import transformers

    warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated")  # diffusers 0.42's new name is `dtype`

    for library in (diffusers, transformers):  # no progress bars; no deprecation notice for the pipeline
        library.utils.logging.disable_progress_bar()
        library.utils.logging.set_verbosity_error()

    from minidiff.pipelines.diffedit import DiffEditPipeline

    ours = DiffEditPipeline.from_pretrained(folder, torch_dtype=dtype, device=device)
    ref = diffusers.StableDiffusionDiffEditPipeline.from_pretrained(
        folder, torch_dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        scheduler=diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
        inverse_scheduler=diffusers.DDIMInverseScheduler.from_pretrained(folder, subfolder="scheduler"),
    ).to(device)
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    return ours, ref


def test_image(size: int) -> np.ndarray:
    """A red disc and a blue square on white, (size, size, 3) floats in [0, 1]."""
    yy, xx = np.mgrid[:size, :size] / size
    image = np.ones((size, size, 3), dtype=np.float32)
    image[(xx - 0.28) ** 2 + (yy - 0.40) ** 2 < 0.19**2] = (1, 0, 0)
    image[(xx > 0.56) & (xx < 0.9) & (yy > 0.48) & (yy < 0.82)] = (0, 0, 1)
    return image


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or float16 (CUDA default)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (CPU 128, CUDA 512)")
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (CPU 10, CUDA 50)")
    parser.add_argument("--maps", type=int, default=10, help="num_maps_per_mask")
    parser.add_argument("--strength", type=float, default=0.8, help="inpaint_strength")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per stage and library, after a warm-up")
    args = parser.parse_args()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # diffusers imports it; it warns about an optional CPU kernel
    device = args.device
    cuda = device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    size = args.size or (512 if cuda else 128)
    steps = args.steps or (50 if cuda else 10)
    print(describe_machine(device))
    print(f"SD 1.5 config, random weights, {dtype}; image {size}x{size} (latents {size // 8}x{size // 8}), "
          f"{steps} steps, inpaint_strength {args.strength} ({int(steps * args.strength)} steps), "
          f"num_maps_per_mask {args.maps}, mask_encode_strength 0.5, guidance {args.guidance}; "
          f"median of {args.repeats} after a short warm-up", flush=True)

    workdir = tempfile.TemporaryDirectory()
    t0 = time.perf_counter()
    folder = write_random_sd15(Path(workdir.name) / "sd15-random")
    ours, ref = load_pipelines(folder, device, dtype)
    print(f"(components built, saved and loaded by both in {time.perf_counter() - t0:.0f} s)", flush=True)

    image = test_image(size)
    gen = lambda seed: torch.Generator().manual_seed(seed)
    pipes = {"minidiff": ours, "diffusers": ref}
    results = {lib: {} for lib in pipes}  # each stage leaves its output here for the next one

    def stage(lib: str, name: str, steps: int, maps: int) -> None:
        pipe, out = pipes[lib], results[lib]
        if name == "mask":
            out["mask"] = pipe.generate_mask(image=image, source_prompt=SOURCE, target_prompt=TARGET,
                                             num_maps_per_mask=maps, mask_encode_strength=0.5,
                                             num_inference_steps=steps, guidance_scale=args.guidance, generator=gen(1))
        elif name == "invert":
            out["inv"] = pipe.invert(image=image, prompt=SOURCE, num_inference_steps=steps,
                                     inpaint_strength=args.strength, guidance_scale=args.guidance, generator=gen(2))
        else:  # the edit; minidiff takes invert's output object (it checks steps and strength), diffusers the tensor
            latents = out["inv"] if lib == "minidiff" else out["inv"].latents
            out["image"] = pipe(prompt=TARGET, negative_prompt=SOURCE, mask_image=out["mask"], image_latents=latents,
                                num_inference_steps=steps, inpaint_strength=args.strength,
                                guidance_scale=args.guidance, output_type="np").images

    # The work each call does, for the napkin math: images through the UNet (a batch of n counts
    # n) and through the VAE encoder. Forward hooks cost nothing measurable.
    work = {lib: [0, 0] for lib in pipes}

    def counter(lib, index):
        def hook(module, args, kwargs, output):
            sample = args[0] if args else kwargs["sample"]
            work[lib][index] += sample.shape[0]
        return hook

    for lib, pipe in pipes.items():
        pipe.unet.register_forward_hook(counter(lib, 0), with_kwargs=True)
        pipe.vae.encoder.register_forward_hook(counter(lib, 1), with_kwargs=True)

    names = ("mask", "invert", "edit")
    with torch.inference_mode():
        # Warm-up, untimed: every stage once, short (about 2 steps, 2 maps): it pages the weights in and
        # initialises the kernels at a fraction of the cost of a full run.
        warm_steps = next((n for n in range(2, steps) if int(n * args.strength) >= 1 and int(n * 0.5) >= 1), steps)
        for name in names:
            for lib in pipes:
                stage(lib, name, steps=warm_steps, maps=2)
        # Timed: the full settings, one callable per (library, stage) in the order mask, invert,
        # edit and, within a stage, minidiff then diffusers, so the timing loop alternates the
        # libraries. measure_peak wraps every call, so the timed calls give the peak memory too
        # (the last one's is reported): resetting and reading the counters costs microseconds.
        peaks = {}

        def measured(lib, name):
            work[lib] = work[(lib, name)] = [0, 0]  # the hooks below count into this call's list
            peaks[(lib, name)] = measure_peak(lambda: stage(lib, name, steps, args.maps), device)

        timed = {(lib, name): (lambda lib=lib, name=name: measured(lib, name)) for name in names for lib in pipes}
        times = interleaved_median_times(timed, device, warmup=0, repeats=args.repeats)

    same_mask = np.array_equal(results["minidiff"]["mask"], results["diffusers"]["mask"])
    image_diff = np.abs(results["minidiff"]["image"] - results["diffusers"]["image"]).max()
    print(f"check: masks identical: {same_mask} ({results['minidiff']['mask'].mean():.1%} of the latent pixels); "
          f"edited images max abs diff {image_diff:.1e}\n")

    print("| stage | minidiff s | diffusers s | ratio | UNet images m / d | VAE-encoder images m / d "
          "| minidiff peak MB* | diffusers peak MB* |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        t_o, t_r = times[("minidiff", name)], times[("diffusers", name)]
        (unet_o, enc_o), (unet_r, enc_r) = work[("minidiff", name)], work[("diffusers", name)]
        print(f"| {name} | {t_o:.2f} | {t_r:.2f} | {t_o / t_r:.2f} | {unet_o} / {unet_r} | {enc_o} / {enc_r} | "
              f"{peaks[('minidiff', name)]:.0f} | {peaks[('diffusers', name)]:.0f} |")
    total = {lib: sum(times[(lib, name)] for name in names) for lib in pipes}
    peak = {lib: max(peaks[(lib, name)] for name in names) for lib in pipes}
    unet = {lib: sum(work[(lib, name)][0] for name in names) for lib in pipes}
    enc = {lib: sum(work[(lib, name)][1] for name in names) for lib in pipes}
    print(f"| **total** | {total['minidiff']:.2f} | {total['diffusers']:.2f} | "
          f"**{total['minidiff'] / total['diffusers']:.2f}** | {unet['minidiff']} / {unet['diffusers']} | "
          f"{enc['minidiff']} / {enc['diffusers']} | {peak['minidiff']:.0f} | {peak['diffusers']:.0f} |")
    print("\n* peak MB: memory a stage adds above what was in use before it (the resident weights), measured on "
          "its last timed call; total row: the largest stage. CUDA: max_memory_allocated. CPU: peak resident set "
          "(VmHWM), a lower bound: memory that malloc kept from earlier calls is reused without raising it.")


if __name__ == "__main__":
    main()
