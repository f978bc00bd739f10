"""Held-out quality of the shapes world: each trained component, then the pipelines, judge-scored.

Every function takes the model folder or the model it scores; the judge comes from
`<model folder>/judge` (judge.py) or is passed in.

    evaluate_vae            a VAE just trained (in memory): PSNR of held-out reconstructions and
                            the judge's accuracy on them and on the originals
    evaluate_vae_psnr       the same PSNR for the VAE of a model folder
    evaluate_clip           a CLIP just trained: held-out image <-> caption retrieval top-1
    evaluate_text_to_image  held-out single-object prompts -> images; the judge names the colour
                            and shape of the one object it finds; accuracy of each and of both.
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

Everything is seeded; tests/test_shapes_quality.py runs these on a small fixed sample, and the
command line (train.py) runs them after training (`vae`, `clip`) or on a folder (`eval`, `eval-edit`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minidiff.models.vae import AutoencoderKL
from minidiff.pipelines.diffedit import DiffEditPipeline
from minidiff.pipelines.text_to_image import StableDiffusionPipeline
from minidiff.training.shapes.data import edit_pairs, held_out_scenes, scenes_to_tensor
from minidiff.training.shapes.judge import ShapesJudge, evaluate_judge, load_judge
from minidiff.training.shapes.train_clip import ShapesCLIP, load_tokenizer, scene_key

# DiffEdit settings for the shapes world. From diffusers' defaults: 25 instead of 50 DDIM steps
# (plenty on 16x16 latents); mask_encode_strength 0.7 and mask_thresholding_ratio 4.0 instead of
# 0.5 / 3.0 (on 40 edit cases the mask IoU went 0.42 -> 0.49 and the share of the other object
# covered by the mask 0.52 -> 0.37); and an empty negative prompt in the masked denoising instead
# of the source prompt: guiding away from the source caption at scale 7.5 overshoots this small
# model's colours (a "blue" target came out green; edit success on 30 cases 0.21 -> 0.70).
# negative_prompt="source" restores diffusers' behaviour.
EDIT_SETTINGS = dict(num_inference_steps=25, inpaint_strength=0.8, guidance_scale=7.5, num_maps_per_mask=10,
                     mask_encode_strength=0.7, mask_thresholding_ratio=4.0, invert_guidance_scale=1.0,
                     edit_guidance_scale=7.5, negative_prompt="")


def _psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """PSNR in dB of images in [0, 1] (H, W, 3) over the pixels where `where` (H, W) is True."""
    if not where.any():
        return float("nan")
    mse = float(((a - b) ** 2)[where].mean())
    return 10 * math.log10(1.0 / max(mse, 1e-10))


@torch.no_grad()
def evaluate_text_to_image(folder, n: int = 200, steps: int = 25, guidance_scale: float = 6.0,
                           seed: int = 0, batch_size: int = 25, progress: bool = True) -> dict:
    """Single-object held-out prompts ("a red circle on a white background") -> images -> judge."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge(Path(folder) / "judge")
    scenes = held_out_scenes("test", n, num_objects=1)
    ok_c = ok_s = ok_both = 0
    for i in tqdm(range(0, n, batch_size), desc="text-to-image eval", disable=not progress):
        chunk = scenes[i:i + batch_size]
        g = torch.Generator().manual_seed(seed + i)
        images = pipe([s.caption for s in chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=g, output_type="pt").images  # (B, 3, 128, 128) in [0, 1]
        for scene, image in zip(chunk, images):
            r = judge.classify_single(image)
            c, s = r.colour == scene.objects[0].colour, r.shape == scene.objects[0].shape
            ok_c, ok_s, ok_both = ok_c + c, ok_s + s, ok_both + (c and s)
    return {"colour": ok_c / n, "shape": ok_s / n, "both": ok_both / n, "n": n, "steps": steps,
            "guidance_scale": guidance_scale}


@torch.no_grad()
def evaluate_diffedit(folder, n: int = 200, seed: int = 0, batch_size: int = 20,
                      blends: tuple[str, ...] = ("diffusers", "aligned"), settings: dict | None = None,
                      progress: bool = True, return_images: bool = False) -> dict:
    """DiffEdit on `edit_pairs(n, seed)`; returns the mean of each score per blend mode.

    The mask and the inversion are computed once per case and shared by both blend modes (they
    only differ in the masked denoising loop). Masks use mask_clamp="per_image", so a case's
    mask does not depend on which other cases share its batch."""
    s = dict(EDIT_SETTINGS, **(settings or {}))
    pipe = DiffEditPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge(Path(folder) / "judge")
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
            generator=torch.Generator().manual_seed(seed + start), output_type="pt", mask_clamp="per_image")
        inv = pipe.invert(prompt=source, image=images, num_inference_steps=s["num_inference_steps"],
                          inpaint_strength=s["inpaint_strength"], guidance_scale=s["invert_guidance_scale"])
        big = F.interpolate(mask[:, None].float(), size=images.shape[-2:], mode="nearest")[:, 0].bool().numpy()
        for p, m in zip(chunk, big):
            truth = p.changed_mask
            mask_iou.append(float((m & truth).sum() / max((m | truth).sum(), 1)))
        originals = ((images + 1) / 2).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3) in [0, 1]
        for blend in blends:
            negative = source if s["negative_prompt"] == "source" else [s["negative_prompt"]] * len(chunk)
            edited = pipe(prompt=target, negative_prompt=negative, mask_image=mask, image_latents=inv,
                          num_inference_steps=s["num_inference_steps"], inpaint_strength=s["inpaint_strength"],
                          guidance_scale=s["edit_guidance_scale"], output_type="pt", blend=blend).images  # [0, 1]
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
    captions) one with the image's content? And the same from captions to images."""
    scenes = held_out_scenes("val", n)
    tok = load_tokenizer()
    t = clip.embed_text(tok([s.caption for s in scenes]).input_ids)
    v = clip.embed_images(scenes_to_tensor(scenes))
    sim = v @ t.T  # (images, captions)
    keys = [scene_key(s) for s in scenes]
    i2t = sum(keys[int(j)] == keys[i] for i, j in enumerate(sim.argmax(dim=1))) / n
    t2i = sum(keys[int(i)] == keys[j] for j, i in enumerate(sim.argmax(dim=0))) / n
    return {"image_to_text_top1": i2t, "text_to_image_top1": t2i, "n": n}
