"""The measuring tools of issue #18: scenes drawn outside the generator (outside.py), objects found
in an image without masks (find_objects.py), and the evaluations built on them (evaluate.py).

The first tests need no model; the last ones run each new evaluation end to end on the bundled
weights/shapes with the smallest sample (they check that the pieces fit, not the scores).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from minidiff.errors import InputError
from minidiff.training.shapes import data, outside
from minidiff.training.shapes.find_objects import connected_components, find_objects

ROOT = Path(__file__).resolve().parent.parent
SHAPES_MODEL = ROOT / "weights" / "shapes"
needs_model = pytest.mark.skipif(not (SHAPES_MODEL / "model_index.json").is_file(),
                                 reason="weights/shapes is not in this checkout")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# ----------------------------------------------------------------------------------------------
# outside.py


def test_outside_pairs_are_deterministic():
    a, b = outside.outside_edit_pairs(6, seed=0), outside.outside_edit_pairs(6, seed=0)
    for p, q in zip(a, b):
        assert np.array_equal(p.scene.image, q.scene.image)
        assert np.array_equal(p.target_scene.image, q.target_scene.image)
        assert np.array_equal(p.changed_mask, q.changed_mask)
        assert (p.source_prompt, p.target_prompt, p.kind, p.index) == (q.source_prompt, q.target_prompt, q.kind, q.index)
    other = outside.outside_edit_pairs(6, seed=1)
    assert not all(np.array_equal(p.scene.image, q.scene.image) for p, q in zip(a, other))
    assert [p.kind for p in a] == ["colour", "shape", "both"] * 2


def _check_drawn(scene: data.Scene) -> None:
    """Every mask pixel has its object's one shade (near the named colour), every other pixel the
    background's one shade (near the named background); objects do not touch."""
    union = np.zeros(scene.image.shape[:2], bool)
    for obj in scene.objects:
        shades = np.unique(scene.image[obj.mask], axis=0)
        assert len(shades) == 1, obj
        assert np.abs(shades[0].astype(int) - data.COLOURS[obj.colour]).max() <= outside.COLOUR_JITTER
        assert obj.bbox == outside._bbox(obj.mask)
        grown = obj.mask.copy()  # the mask dilated by one pixel (4-neighbours)
        grown[1:] |= obj.mask[:-1]
        grown[:-1] |= obj.mask[1:]
        grown[:, 1:] |= obj.mask[:, :-1]
        grown[:, :-1] |= obj.mask[:, 1:]
        assert not (grown & union).any(), "objects touch"
        union |= obj.mask
    background = np.unique(scene.image[~union], axis=0)
    assert len(background) == 1
    assert np.abs(background[0].astype(int) - data.BACKGROUNDS[scene.background]).max() <= outside.BACKGROUND_JITTER
    assert scene.caption == data.describe(scene.object_pairs(), scene.background)


def test_outside_masks_match_the_drawn_pixels():
    pairs = outside.outside_edit_pairs(30, seed=0)
    for p in pairs:
        _check_drawn(p.scene)
        _check_drawn(p.target_scene)
        goal = p.target_scene.objects[p.index]
        assert (goal.colour, goal.shape) == (p.target_colour, p.target_shape)
        assert np.array_equal(p.changed_mask, p.source_object.mask | goal.mask)
        assert p.target_prompt == p.target_scene.caption
        for j, obj in enumerate(p.scene.objects):  # everything but the edited object stays
            if j != p.index:
                assert np.array_equal(obj.mask, p.target_scene.objects[j].mask)
    sizes = [o.size for p in pairs for o in p.scene.objects]
    assert min(sizes) >= 24 and max(sizes) <= 70
    assert min(sizes) < 32 and max(sizes) > 60, "sizes should reach outside the generator's 32-60 px"


def test_outside_scenes_are_deterministic_and_drawn_as_documented():
    scenes = outside.outside_scenes(8, seed=3, num_objects=2)
    assert all(len(s.objects) == 2 for s in scenes)
    assert all(np.array_equal(s.image, t.image) for s, t in zip(scenes, outside.outside_scenes(8, seed=3, num_objects=2)))
    for s in scenes:
        _check_drawn(s)
    with pytest.raises(InputError):
        outside.outside_scenes(2, num_objects=3)


# ----------------------------------------------------------------------------------------------
# find_objects.py


def test_connected_components_counts_and_separates():
    mask = np.zeros((6, 7), bool)
    mask[0:2, 0:2] = True  # a block
    mask[4, 1:6] = True  # a line
    mask[2, 5] = True  # diagonal to nothing: its own component under 4-connectivity
    labels, k = connected_components(mask)
    assert k == 3
    assert (labels > 0).sum() == mask.sum() and (labels[~mask] == 0).all()
    assert len(np.unique(labels[0:2, 0:2])) == 1 and len(np.unique(labels[4, 1:6])) == 1
    spiral = np.zeros((9, 9), bool)  # one long snake: propagation must still join it
    spiral[0, :], spiral[:, 8], spiral[8, :], spiral[2:, 0], spiral[2, :7], spiral[2:7, 6], spiral[6, 2:7] = (True,) * 7
    assert connected_components(spiral)[1] == 1
    assert connected_components(np.zeros((4, 4), bool))[1] == 0


@pytest.mark.parametrize("source", ["generator", "outside"])
def test_find_objects_recovers_the_true_masks(source):
    scenes = (data.held_out_scenes("val", 10, num_objects=2) if source == "generator"
              else outside.outside_scenes(10, seed=0, num_objects=2))
    for scene in scenes:
        found = find_objects(scene.image)
        assert len(found) == 2, scene.caption
        for obj in scene.objects:
            # generator: the anti-aliased rim (coverage below 1/2 but above the threshold) is
            # found too; measured min 0.916 on 200 scenes. outside: exact up to star tips that
            # touch the rest only diagonally (4-connectivity); measured min 0.99.
            assert max(_iou(m, obj.mask) for m in found) > 0.9, scene.caption


def test_find_objects_on_an_empty_image_and_bad_input():
    assert find_objects(np.full((64, 64, 3), 200, np.uint8)) == []
    with pytest.raises(InputError):
        find_objects(np.zeros((64, 64, 3), np.uint8), min_area=0)
    with pytest.raises(InputError):
        find_objects(np.zeros((64, 64, 3), np.uint8), threshold=-1.0)


# ----------------------------------------------------------------------------------------------
# The evaluations, end to end on the bundled model (smallest samples)


@needs_model
def test_two_object_text_to_image_runs():
    from minidiff.training.shapes.evaluate import evaluate_two_object_text_to_image

    r = evaluate_two_object_text_to_image(SHAPES_MODEL, n=2, steps=10, batch_size=2, progress=False)
    assert r["n"] == 2 and 0 <= r["both"] <= r["each_found"] * 2
    assert sum(r["objects_found_histogram"].values()) == 2
    json.dumps(r)  # what the command line prints


@needs_model
def test_readme_example_runs(monkeypatch):
    from minidiff.training.shapes.evaluate import evaluate_readme_example

    monkeypatch.chdir(ROOT)  # the example's path is relative to the repository root
    r = evaluate_readme_example(SHAPES_MODEL, seeds=[0], settings={"num_inference_steps": 10}, progress=False)
    assert r["seeds"] == 1 and r["successes"] in (0, 1)
    row = r["per_seed"][0]
    assert row["success"] == (row["edited_reads"] == "blue square" and row["kept_reads"] == "green triangle")
    assert row["psnr_outside"] > 15 and 0 <= row["mask_on_kept"] <= 1
    json.dumps(r)
    with pytest.raises(InputError):
        evaluate_readme_example(SHAPES_MODEL, seeds=[-1])


@needs_model
def test_diffedit_scores_given_pairs():
    from minidiff.training.shapes.evaluate import evaluate_diffedit

    pairs = outside.outside_edit_pairs(2, seed=0)
    r = evaluate_diffedit(SHAPES_MODEL, pairs=pairs, blends=("aligned",), settings={"num_inference_steps": 10},
                          progress=False)
    assert r["n"] == 2 and 0 <= r["mask_iou"] <= 1
    assert 0 <= r["aligned"]["edit_success"] <= 1
    with pytest.raises(InputError):
        evaluate_diffedit(SHAPES_MODEL, pairs=[])


# ----------------------------------------------------------------------------------------------
# mask_study.py


def test_grid_oracle_is_exact_for_a_cell_aligned_region_and_finer_grids_do_better():
    from minidiff.training.shapes import mask_study

    block = np.zeros((128, 128), bool)
    block[16:48, 40:72] = True  # whole 8x8 cells: a 16x16 grid represents it exactly
    assert mask_study.iou(mask_study.upsample(mask_study.cells(block, 16), 128), block) == 1.0
    oracle = mask_study.grid_oracle_iou(data.edit_pairs(12, seed=1))
    assert oracle["16x16"]["mean"] < oracle["32x32"]["mean"] < oracle["64x64"]["mean"] <= 1.0


def test_score_map_of_the_true_region_reaches_the_grid_oracle():
    """A map that is 1 on the true region's cells and 0 elsewhere: the per-image best threshold
    finds exactly the oracle cut, and nothing lands on the other object."""
    from minidiff.training.shapes import mask_study

    pair = next(p for p in data.edit_pairs(30, seed=1) if len(p.scene.objects) == 2)
    perfect = mask_study.cells(pair.changed_mask, 16).astype(np.float32)
    row = mask_study.score_map(pair, perfect, ratio=1.0)
    oracle = mask_study.iou(mask_study.upsample(mask_study.cells(pair.changed_mask, 16), 128), pair.changed_mask)
    assert row["best_iou"] == pytest.approx(oracle)
    assert row["other_covered"] == 0.0 and row["map_background"] == 0.0


@needs_model
def test_study_masks_runs_on_the_shapes_model():
    from minidiff.training.shapes.mask_study import study_masks

    result = study_masks(SHAPES_MODEL, n=2)
    assert result["n"] == 2
    assert all(0.0 <= result["all"][k] <= 1.0 for k in ("iou", "best_iou"))
    assert result["grid_oracle_iou"]["16x16"]["mean"] > 0.5
