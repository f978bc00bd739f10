"""Held-out quality of the shapes world: each trained component, then the pipelines, judge-scored.

Every function takes the model folder or the model it scores; the judge comes from
`<model folder>/judge` (judge.py) or is passed in.

    evaluate_vae            a VAE just trained (in memory): PSNR of held-out reconstructions and
                            the judge's accuracy on them and on the originals
    evaluate_vae_psnr       the same PSNR for the VAE of a model folder
    evaluate_clip           a CLIP just trained: held-out image <-> caption retrieval top-1
    evaluate_text_to_image  held-out single-object prompts -> images; the judge names the colour
                            and shape of the one object it finds; accuracy of each and of both.
    evaluate_two_object_text_to_image
                            held-out two-object prompts -> images -> the objects found in each
                            (find_objects.py) -> the judge: both named objects right, exactly
                            two objects found, each named object found
    evaluate_diffedit       held-out edit cases (`edit_pairs`): DiffEdit mask, inversion and
                            masked denoising with both blend modes, scored against the ground
                            truth the generator knows exactly:
        mask IoU            generated mask (16x16, upsampled to 128x128 by nearest neighbour) vs
                            the pixels an ideal edit changes (source object | target object)
        edit success        the judge, looking at the target object's box in the edited image,
                            sees the target colour and shape
        PSNR outside        10 log10(1 / MSE) on the [0, 1] scale over the pixels outside the
                            generated mask, edited vs input (how untouched the rest stays)
        other kept          two-object scenes: the judge still sees the other object's colour
                            and shape in its box
                            `pairs=outside.outside_edit_pairs(n)` scores the same on scenes
                            drawn with plain PIL instead of the generator (outside.py)
    evaluate_readme_example the README's edit, run as `minidiff edit` runs it, once per seed:
                            does the red circle become a blue square with the green triangle kept?

Everything is seeded; tests/test_shapes_quality.py runs these on a small fixed sample, and the
command line (train.py) runs them after training (`vae`, `clip`) or on a folder (`eval`, `eval-edit`,
`eval-two-objects`, `eval-edit-outside`, `eval-readme`).
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minidiff.errors import InputError
from minidiff.models.vae import AutoencoderKL
from minidiff.pipelines.diffedit import BLENDS, DiffEditPipeline
from minidiff.pipelines.settings import recommended_settings, with_diffusers_defaults
from minidiff.pipelines.text_to_image import StableDiffusionPipeline
from minidiff.training.shapes.data import edit_pairs, held_out_scenes, scenes_to_tensor, swappable_scenes
from minidiff.training.shapes.find_objects import MIN_AREA, find_objects
from minidiff.training.shapes.judge import ShapesJudge, evaluate_judge, load_judge
from minidiff.training.shapes.train_clip import ShapesCLIP, binding_accuracy, load_tokenizer, scene_key
from minidiff.validation import check_choice, check_positive_int


def edit_settings(folder) -> dict:
    """The DiffEdit settings a model folder recommends (its recommended_settings.json, the one
    file the `minidiff` command reads too), completed with diffusers' defaults: what every edit
    evaluation here runs unless `settings=` overrides some of them."""
    return with_diffusers_defaults(recommended_settings(folder), "diffedit")


def _psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """PSNR in dB of images in [0, 1] (H, W, 3) over the pixels where `where` (H, W) is True."""
    if not where.any():
        return float("nan")
    mse = float(((a - b) ** 2)[where].mean())
    return 10 * math.log10(1.0 / max(mse, 1e-10))


def generated_scenes(folder, scenes, steps: int, guidance_scale: float, seed: int, batch_size: int, desc: str,
                     progress: bool, device: str = "cpu"):
    """Yield (scene, image) for each held-out scene: the pipeline in `folder` draws its canonical
    caption (DDIM `steps`, guidance `guidance_scale`, generator seed + i for the batch that starts
    at scene i), images (3, 128, 128) in [0, 1] on the CPU (the pipeline runs on `device`)."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, device=device)
    pipe.set_progress_bar_config(disable=True)
    for i in tqdm(range(0, len(scenes), batch_size), desc=desc, disable=not progress):
        chunk = scenes[i:i + batch_size]
        images = pipe([s.caption for s in chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=torch.Generator().manual_seed(seed + i), output_type="pt").images.cpu()
        yield from zip(chunk, images)


@torch.no_grad()
def evaluate_text_to_image(folder, n: int = 200, steps: int = 25, guidance_scale: float = 6.0,
                           seed: int = 0, batch_size: int = 25, progress: bool = True, device: str = "cpu") -> dict:
    """Single-object held-out prompts ("a red circle on a white background") -> images -> judge."""
    judge = load_judge(Path(folder) / "judge")
    scenes = held_out_scenes("test", n, num_objects=1)
    pairs = generated_scenes(folder, scenes, steps, guidance_scale, seed, batch_size, "text-to-image eval", progress,
                             device)
    return {**judge_single_objects(judge, pairs), "n": n, "steps": steps, "guidance_scale": guidance_scale}


def judge_single_objects(judge: ShapesJudge, pairs) -> dict:
    """Fractions of (single-object scene, image (3, H, W)) pairs whose image the judge reads with the
    scene's colour, its shape, and both."""
    ok_c = ok_s = ok_both = n = 0
    for scene, image in pairs:
        r = judge.classify_single(image)
        c, s = r.colour == scene.objects[0].colour, r.shape == scene.objects[0].shape
        ok_c, ok_s, ok_both, n = ok_c + c, ok_s + s, ok_both + (c and s), n + 1
    return {"colour": ok_c / n, "shape": ok_s / n, "both": ok_both / n}


@torch.no_grad()
def evaluate_two_object_text_to_image(folder, n: int = 200, steps: int = 25, guidance_scale: float = 6.0,
                                      seed: int = 0, batch_size: int = 25, min_area: int = MIN_AREA,
                                      progress: bool = True, device: str = "cpu") -> dict:
    """Two-object held-out prompts ("a red circle and a blue square on a white background") ->
    images -> find_objects -> the judge on each object found.

        both            the two largest objects found read as the two named (colour, shape)
                        pairs, in either order
        exactly_two     exactly two objects found (no merged blob, no missing object, no stain
                        of min_area pixels or more)
        each_found      share of the 2n named objects that some object found reads as
        first_found     the same for the object named first in the prompt, and second_found
                        for the second (CLIP's causal text encoder sees the second in the
                        light of the first)
    Prompts are held_out_scenes("test", n, num_objects=2)'s canonical captions; DDIM `steps`,
    guidance `guidance_scale`, generator seed + i for the batch that starts at prompt i, as
    evaluate_text_to_image."""
    check_positive_int("n", n)
    judge = load_judge(Path(folder) / "judge")
    scenes = held_out_scenes("test", n, num_objects=2)
    both = exactly_two = first = second = 0
    counts = []
    for scene, image in generated_scenes(folder, scenes, steps, guidance_scale, seed, batch_size,
                                         "two-object text-to-image eval", progress, device):
        masks = find_objects(image, min_area=min_area)
        seen = [(v.colour, v.shape) for v in (judge.classify(image, m) for m in masks)]
        named = scene.object_pairs()  # [(colour, shape), (colour, shape)] in prompt order
        both += sorted(seen[:2]) == sorted(named)
        exactly_two += len(masks) == 2
        first, second = first + (named[0] in seen), second + (named[1] in seen)
        counts.append(len(masks))
    return {"both": both / n, "exactly_two": exactly_two / n, "each_found": (first + second) / (2 * n),
            "first_found": first / n, "second_found": second / n,
            "objects_found_histogram": {str(k): counts.count(k) for k in sorted(set(counts))},
            "n": n, "steps": steps, "guidance_scale": guidance_scale, "min_area": min_area}


@torch.no_grad()
def evaluate_diffedit(folder, n: int = 200, seed: int = 0, batch_size: int = 20,
                      blends: tuple[str, ...] = ("diffusers", "aligned"), settings: dict | None = None,
                      progress: bool = True, return_images: bool = False, pairs: list | None = None,
                      device: str = "cpu") -> dict:
    """DiffEdit on `edit_pairs(n, seed)`; returns the mean of each score per blend mode.

    `pairs`, if given, are the cases instead (data.EditPair objects, e.g. outside.outside_edit_pairs
    for scenes drawn outside the generator); then n is len(pairs) and `seed` only seeds the masks.
    The mask and the inversion are computed once per case and shared by both blend modes (they
    only differ in the masked denoising loop). The shapes model's file says mask_clamp="per_image",
    so a case's mask does not depend on which other cases share its batch."""
    s = dict(edit_settings(folder), **(settings or {}))
    if pairs is not None:
        pairs = list(pairs)
        if not pairs:
            raise InputError("`pairs` is empty: give at least one edit case, or None for edit_pairs(n, seed).")
        n = len(pairs)
    pipe = DiffEditPipeline.from_pretrained(folder, torch_dtype=torch.float32, device=device)
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge(Path(folder) / "judge")
    if pairs is None:
        pairs = edit_pairs(n, seed=seed)
    rows = {blend: [] for blend in blends}
    mask_iou, images_out = [], []
    for start in tqdm(range(0, n, batch_size), desc="DiffEdit eval", disable=not progress):
        chunk = pairs[start:start + batch_size]
        images = scenes_to_tensor([p.scene for p in chunk])  # (B, 3, 128, 128) in [-1, 1]
        source, target = [p.source_prompt for p in chunk], [p.target_prompt for p in chunk]
        mask = pipe.generate_mask(
            image=images, source_prompt=source, target_prompt=target, num_maps_per_mask=s["num_maps_per_mask"],
            mask_encode_strength=s["mask_encode_strength"], mask_thresholding_ratio=s["mask_thresholding_ratio"],
            num_inference_steps=s["num_inference_steps"], guidance_scale=s["guidance_scale"],
            generator=torch.Generator().manual_seed(seed + start), output_type="pt", mask_clamp=s["mask_clamp"])
        inv = pipe.invert(prompt=source, image=images, num_inference_steps=s["num_inference_steps"],
                          inpaint_strength=s["inpaint_strength"], guidance_scale=s["invert_guidance_scale"])
        big = F.interpolate(mask[:, None].float(), size=images.shape[-2:], mode="nearest")[:, 0].bool().cpu().numpy()
        for p, m in zip(chunk, big):
            truth = p.changed_mask
            mask_iou.append(float((m & truth).sum() / max((m | truth).sum(), 1)))
        originals = ((images + 1) / 2).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3) in [0, 1]
        for blend in blends:
            negative = source if s["negative_prompt"] == "source" else [s["negative_prompt"]] * len(chunk)
            edited = pipe(prompt=target, negative_prompt=negative, mask_image=mask, image_latents=inv,
                          num_inference_steps=s["num_inference_steps"], inpaint_strength=s["inpaint_strength"],
                          guidance_scale=s["edit_guidance_scale"], output_type="pt", blend=blend).images.cpu()  # [0, 1]
            edited_np = edited.permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
            for p, e, e_np, o_np, m in zip(chunk, edited, edited_np, originals, big):
                goal = p.target_scene.objects[p.index]
                verdict = judge.classify(e, goal.mask)
                others = [obj for j, obj in enumerate(p.scene.objects) if j != p.index]
                kept = [judge.classify(e, obj.mask) for obj in others]
                rows[blend].append({
                    "success": verdict.colour == p.target_colour and verdict.shape == p.target_shape,
                    "colour_ok": verdict.colour == p.target_colour,
                    "shape_ok": verdict.shape == p.target_shape,
                    "other_kept": (all(k.colour == obj.colour and k.shape == obj.shape for k, obj in zip(kept, others))
                                   if others else None),
                    "psnr_outside_mask": _psnr(e_np, o_np, ~m),
                    "psnr_outside_true": _psnr(e_np, o_np, ~p.changed_mask),
                })
            if return_images and blend == blends[0]:
                images_out.append(edited)
    result = {"n": n, "settings": s, "mask_iou": float(np.mean(mask_iou))}
    for blend, rs in rows.items():
        two = [r["other_kept"] for r in rs if r["other_kept"] is not None]
        result[blend] = {
            "edit_success": float(np.mean([r["success"] for r in rs])),
            "colour_ok": float(np.mean([r["colour_ok"] for r in rs])),
            "shape_ok": float(np.mean([r["shape_ok"] for r in rs])),
            "psnr_outside_mask": float(np.nanmean([r["psnr_outside_mask"] for r in rs])),
            "psnr_outside_true_region": float(np.nanmean([r["psnr_outside_true"] for r in rs])),
            "other_object_kept": float(np.mean(two)) if two else float("nan"),
            "two_object_cases": len(two),
        }
    if return_images:
        result["images"] = torch.cat(images_out)
    return result


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    """decode(posterior mean) of images (B, 3, H, W) in [-1, 1], clamped to [-1, 1], in chunks."""
    return torch.cat([vae(images[i:i + batch_size]).sample.clamp(-1, 1) for i in range(0, len(images), batch_size)])


def mean_psnr(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """Mean over images of the PSNR (dB) on the [0, 1] scale; both (B, 3, H, W) in [-1, 1]."""
    mse = ((x_hat - x) / 2).pow(2).mean(dim=(1, 2, 3))  # per image, on the [0, 1] scale
    return float((10 * torch.log10(1.0 / mse)).mean())


@torch.no_grad()
def evaluate_vae_psnr(folder, n: int = 200) -> float:
    """Mean PSNR (dB, [0, 1] scale) of VAE reconstructions (posterior mean) of held-out scenes."""
    vae = AutoencoderKL.from_pretrained(Path(folder) / "vae", torch_dtype=torch.float32)
    x = scenes_to_tensor(held_out_scenes("val", n))
    return mean_psnr(reconstruct(vae, x), x)


@torch.no_grad()
def evaluate_vae(vae: AutoencoderKL, judge: ShapesJudge, n: int = 200) -> dict:
    """PSNR of held-out reconstructions (posterior mean; images in [0, 1]) and the judge's accuracy on them."""
    scenes = held_out_scenes("val", n)
    x = scenes_to_tensor(scenes)
    return {"psnr": mean_psnr(reconstruct(vae, x), x),
            "judge_on_reconstructions": evaluate_judge(judge, scenes, degrade=lambda images: reconstruct(vae, images)),
            "judge_on_originals": evaluate_judge(judge, scenes)}


@torch.no_grad()
def evaluate_clip(clip: ShapesCLIP, n: int = 200) -> dict:
    """Held-out retrieval: for each image, is the best-scoring caption (among the n canonical
    captions) one with the image's content? And the same from captions to images. Binding: on
    two-object scenes of different colours and shapes, how often the image scores its caption
    above the one with the colours swapped (train_clip.binding_accuracy; 0.5 = a bag of words)."""
    scenes = held_out_scenes("val", n)
    tok = load_tokenizer()
    t = clip.embed_text(tok([s.caption for s in scenes]).input_ids)
    v = clip.embed_images(scenes_to_tensor(scenes))
    sim = v @ t.T  # (images, captions)
    keys = [scene_key(s) for s in scenes]
    i2t = sum(keys[int(j)] == keys[i] for i, j in enumerate(sim.argmax(dim=1))) / n
    t2i = sum(keys[int(i)] == keys[j] for j, i in enumerate(sim.argmax(dim=0))) / n
    two = swappable_scenes("val", n)
    return {"image_to_text_top1": i2t, "text_to_image_top1": t2i, "n": n,
            "binding_vs_colour_swap": binding_accuracy(clip, two), "n_binding": len(two)}


# The README's first command (relative image path: seen from the repository root, like
# train.DEFAULT_MODEL) and what a successful edit of it looks like to the judge.
README_EXAMPLE = {
    "image": "weights/examples/red_circle_green_triangle.png",
    "source": "a red circle and a green triangle on a white background",
    "target": "a blue square and a green triangle on a white background",
    "edited": ("red", "circle"),  # (colour, shape) in the input ...
    "becomes": ("blue", "square"),  # ... and what the judge must see in its place afterwards
    "kept": ("green", "triangle"),  # the object that must stay as it is
}


@torch.no_grad()
def evaluate_readme_example(folder, seeds=range(10), settings: dict | None = None, blend: str = "aligned",
                            image: str | Path | None = None, progress: bool = True, device: str = "cpu") -> dict:
    """The README's edit (README_EXAMPLE) once per seed, with the calls `minidiff edit` makes.

    For each seed: generate_mask (edit_settings(folder) updated by `settings`,
    output a PIL mask), invert, and the masked denoising with `blend`, each with a fresh
    torch.Generator seeded with the seed: what cli._mask, cli._invert and cli.cmd_edit do with
    `--seed SEED --blend BLEND` and no other flag. The edited PIL image (what edited.png holds) is judged:

        success         the red circle's region (found in the input by find_objects, named by
                        the judge) reads "blue square" and the green triangle's region still
                        reads "green triangle"
        objects_found   objects find_objects sees in the edited image (2 for a clean edit)
        psnr_outside    PSNR (dB, [0, 1] scale) of edited vs input outside the circle's mask,
                        which holds the ideal blue square (it is inscribed in the circle)
        mask_iou        the mask (latent cells upsampled by nearest neighbour) vs the circle's mask
        mask_on_kept    the share of the triangle's pixels under the mask
    """
    s = dict(edit_settings(folder), **(settings or {}))
    check_choice("blend", blend, BLENDS)
    seeds = list(seeds)
    if not seeds or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in seeds):
        raise InputError(f"`seeds` must be a non-empty list of whole numbers >= 0; got {seeds!r}.")
    ex = README_EXAMPLE
    path = Path(ex["image"] if image is None else image)
    if not path.is_file():
        raise FileNotFoundError(f"No image file at {str(path)!r} (the README example; run from the repository root "
                                f"or pass image=).")
    picture = PIL.Image.open(path).convert("RGB")
    original = np.asarray(picture, dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]
    pipe = DiffEditPipeline.from_pretrained(folder, torch_dtype=torch.float32, device=device)
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge(Path(folder) / "judge")
    regions = {(v.colour, v.shape): m for m in find_objects(picture) for v in [judge.classify(picture, m)]}
    if ex["edited"] not in regions or ex["kept"] not in regions:
        raise InputError(f"The judge does not see {' '.join(ex['edited'])} and {' '.join(ex['kept'])} in "
                         f"{str(path)!r} (it sees {sorted(regions)}); is this the README example?")
    edited_region, kept_region = regions[ex["edited"]], regions[ex["kept"]]
    negative = ex["source"] if s["negative_prompt"] == "source" else s["negative_prompt"]
    rows = []
    for seed in tqdm(seeds, desc="README example", disable=not progress):
        mask = pipe.generate_mask(
            image=picture, source_prompt=ex["source"], target_prompt=ex["target"],
            num_maps_per_mask=s["num_maps_per_mask"], mask_encode_strength=s["mask_encode_strength"],
            mask_thresholding_ratio=s["mask_thresholding_ratio"], num_inference_steps=s["num_inference_steps"],
            guidance_scale=s["guidance_scale"], generator=torch.Generator().manual_seed(seed), output_type="pil",
            mask_clamp=s["mask_clamp"])[0]
        inv = pipe.invert(prompt=ex["source"], image=picture, num_inference_steps=s["num_inference_steps"],
                          inpaint_strength=s["inpaint_strength"], guidance_scale=s["invert_guidance_scale"],
                          generator=torch.Generator().manual_seed(seed))
        edited = pipe(prompt=ex["target"], negative_prompt=negative, mask_image=mask, image_latents=inv,
                      num_inference_steps=s["num_inference_steps"], inpaint_strength=s["inpaint_strength"],
                      guidance_scale=s["edit_guidance_scale"], generator=torch.Generator().manual_seed(seed),
                      blend=blend).images[0]  # PIL, as edited.png
        now, kept = judge.classify(edited, edited_region), judge.classify(edited, kept_region)
        big = np.asarray(mask.resize(picture.size, PIL.Image.Resampling.NEAREST)) > 127  # (H, W)
        rows.append({
            "seed": seed,
            "success": (now.colour, now.shape) == ex["becomes"] and (kept.colour, kept.shape) == ex["kept"],
            "edited_reads": f"{now.colour} {now.shape}",
            "kept_reads": f"{kept.colour} {kept.shape}",
            "objects_found": len(find_objects(edited)),
            "psnr_outside": _psnr(np.asarray(edited, dtype=np.float32) / 255.0, original, ~edited_region),
            "mask_iou": float((big & edited_region).sum() / max((big | edited_region).sum(), 1)),
            "mask_on_kept": float((big & kept_region).sum() / kept_region.sum()),
        })
    return {"successes": sum(r["success"] for r in rows), "seeds": len(rows), "blend": blend, "settings": s,
            "image": str(path), "per_seed": rows}
