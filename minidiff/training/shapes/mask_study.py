"""What limits DiffEdit's mask on a shapes model: the grid, the threshold, or the map itself?

DiffEdit's step 1 (Couairon et al. 2022, sec. 3.2) cuts a noise-difference map at a threshold.
A mask can be wrong for three separate reasons, and each has its own measurement here:

    the grid        the map lives on the latent grid (16x16 for 128 px at f=8): even a perfect
                    map, cut cell by cell, misses the true region's outline.
                    `grid_oracle_iou`: IoU of the true changed region with its own best g x g
                    cut (a cell is in when at least half its pixels are).
    the threshold   the map is right but the rule `map > ratio/2 * mean(map)` cuts it at the
                    wrong level. `study_masks` reports, beside the rule's IoU, the IoU of the best
                    threshold chosen per image with the truth in hand (an upper bound).
    the map         the caption change moves the noise prediction outside the edited object.
                    `study_masks` reports the map's mean inside the changed region, on the other
                    object and on the background, and the share of the other object under the
                    mask, split by the edited object's place in the caption (first or second):
                    CLIP's text encoder is causal, so only a phrase *after* the edited one sees
                    the change in its token states; leakage onto a first-named other object
                    therefore comes from the UNet's cross-attention, not from the text encoder.
    settings        `sweep_mask_settings` scores mask_encode_strength x threshold ratio on a
                    validation split (edit_pairs seed 1; the scored set is seed 0).

    python -m minidiff.training.shapes.mask_study weights/shapes [--n 60]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from minidiff.pipelines.diffedit import DiffEditPipeline
from minidiff.training.shapes.data import EditPair, edit_pairs, scenes_to_tensor
from minidiff.training.shapes.evaluate import edit_settings


def cells(mask: np.ndarray, grid: int) -> np.ndarray:
    """(H, W) bool -> (grid, grid) bool: a cell is in when at least half its pixels are."""
    f = mask.shape[0] // grid
    return mask.reshape(grid, f, grid, f).mean(axis=(1, 3)) >= 0.5


def upsample(grid_mask: np.ndarray, size: int) -> np.ndarray:
    """(g, g) -> (size, size) by nearest neighbour (each cell becomes a block of pixels)."""
    f = size // grid_mask.shape[0]
    return np.kron(grid_mask, np.ones((f, f), dtype=bool))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def grid_oracle_iou(pairs: list[EditPair], grids=(16, 32, 64)) -> dict:
    """The best IoU a g x g mask can reach on each case, mean and min over the cases."""
    out = {}
    for g in grids:
        scores = [iou(upsample(cells(p.changed_mask, g), p.changed_mask.shape[0]), p.changed_mask) for p in pairs]
        out[f"{g}x{g}"] = {"mean": float(np.mean(scores)), "min": float(np.min(scores))}
    return out


@torch.no_grad()
def guidance_maps(pipe: DiffEditPipeline, pairs: list[EditPair], settings: dict, batch_size: int = 20) -> np.ndarray:
    """DiffEdit's noise-difference map (before any threshold) for every case: (N, h, w)."""
    maps = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        out = pipe.generate_mask(
            image=scenes_to_tensor([p.scene for p in chunk]), source_prompt=[p.source_prompt for p in chunk],
            target_prompt=[p.target_prompt for p in chunk], num_maps_per_mask=settings["num_maps_per_mask"],
            mask_encode_strength=settings["mask_encode_strength"],
            mask_thresholding_ratio=settings["mask_thresholding_ratio"],
            num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
            generator=torch.Generator().manual_seed(start), output_type="pt", mask_clamp="per_image",
            return_maps=True)
        maps.append(out.guidance_map.numpy())
    return np.concatenate(maps)


def score_map(pair: EditPair, guidance_map: np.ndarray, ratio: float) -> dict:
    """One case: the rule's mask (map > ratio/2 * mean, as generate_mask's clamp-and-halve does),
    its IoU, the best per-image threshold's IoU, the map's means by region, the other object's
    share under the mask."""
    size = pair.changed_mask.shape[0]
    grid = guidance_map.shape[0]
    truth = pair.changed_mask
    mask = upsample(guidance_map > ratio / 2 * guidance_map.mean(), size)
    levels = np.quantile(guidance_map, np.linspace(0.5, 0.99, 50))
    others = [o.mask for j, o in enumerate(pair.scene.objects) if j != pair.index]
    truth_cells = cells(truth, grid)
    row = {"iou": iou(mask, truth), "best_iou": max(iou(upsample(guidance_map > q, size), truth) for q in levels),
           "map_changed": float(guidance_map[truth_cells].mean()) if truth_cells.any() else float("nan"),
           "two_objects": bool(others), "edited_first": pair.index == 0}
    background = ~truth_cells
    if others:
        other_cells = cells(others[0], grid) & ~truth_cells
        background &= ~cells(others[0], grid)
        row["other_covered"] = float((mask & others[0]).sum() / others[0].sum())
        row["map_other"] = float(guidance_map[other_cells].mean()) if other_cells.any() else float("nan")
    row["map_background"] = float(guidance_map[background].mean())
    return row


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r and not np.isnan(r[key])]
    return float(np.mean(values)) if values else float("nan")


def study_masks(folder, n: int = 60, seed: int = 1, settings: dict | None = None) -> dict:
    """The grid / threshold / map measurements above on edit_pairs(n, seed), with the folder's
    recommended DiffEdit settings (updated by `settings`)."""
    s = dict(edit_settings(folder), **(settings or {}))
    pipe = DiffEditPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pairs = edit_pairs(n, seed=seed)
    rows = [score_map(p, m, s["mask_thresholding_ratio"]) for p, m in zip(pairs, guidance_maps(pipe, pairs, s))]
    keys = ("iou", "best_iou", "other_covered", "map_changed", "map_other", "map_background")
    result = {"n": n, "seed": seed, "grid_oracle_iou": grid_oracle_iou(pairs), "all": {k: _mean(rows, k) for k in keys}}
    for name, chosen in (("edited_first", True), ("edited_second", False)):
        part = [r for r in rows if r["two_objects"] and r["edited_first"] == chosen]
        result[name] = {"cases": len(part), **{k: _mean(part, k) for k in keys}}
    return result


def sweep_mask_settings(folder, n: int = 60, seed: int = 1, strengths=(0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                        ratios=(2.0, 3.0, 4.0, 5.0, 6.0)) -> list[dict]:
    """Mask IoU and other-object coverage for every (mask_encode_strength, ratio) on a validation
    split. The ratio only moves the threshold, so one set of maps per strength serves all ratios."""
    s = edit_settings(folder)
    pipe = DiffEditPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pairs = edit_pairs(n, seed=seed)
    table = []
    for strength in strengths:
        maps = guidance_maps(pipe, pairs, dict(s, mask_encode_strength=strength))
        for ratio in ratios:
            rows = [score_map(p, m, ratio) for p, m in zip(pairs, maps)]
            table.append({"mask_encode_strength": strength, "mask_thresholding_ratio": ratio,
                          "iou": _mean(rows, "iou"), "other_covered": _mean(rows, "other_covered")})
    return table


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m minidiff.training.shapes.mask_study", description=__doc__.split("\n")[0])
    p.add_argument("model", help="a shapes model folder, e.g. weights/shapes")
    p.add_argument("--n", type=int, default=60, help="validation edit pairs (edit_pairs seed 1)")
    p.add_argument("--sweep", action="store_true", help="also sweep mask_encode_strength x threshold ratio")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(json.dumps(study_masks(args.model, args.n), indent=1))
    if args.sweep:
        print(json.dumps(sweep_mask_settings(args.model, args.n), indent=1))


if __name__ == "__main__":
    main()
