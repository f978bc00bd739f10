"""A model folder's recommended_settings.json (minidiff/pipelines/settings.py): the reader refuses
what it does not understand with one sentence, from_pretrained attaches the file and
save_pretrained writes it back, the defaults it falls back to are the methods' own, and the
shapes model's file holds the settings its model card was measured with. (The command's use of
the file: tests/test_cli.py; diffusers ignoring it: tests/test_drop_in.py.)"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch

from minidiff import DiffEditPipeline, DiffusionPipeline, StableDiffusionPipeline
from minidiff.errors import InputError
from minidiff.pipelines import diffedit, settings
from minidiff.pipelines.settings import (
    DIFFUSERS_DEFAULTS,
    FILE_NAME,
    recommended_settings,
    with_diffusers_defaults,
)
from minidiff.reference import save_tiny_pipeline

SHAPES = Path(__file__).resolve().parents[1] / "weights" / "shapes"


def write(folder: Path, data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = data if isinstance(data, str) else json.dumps(data)
    (folder / FILE_NAME).write_text(text)
    return folder


# ----------------------------------------------------------------------------------------------
# The reader


def test_absent_file_reads_as_no_settings(tmp_path):
    assert recommended_settings(tmp_path) == {}
    assert with_diffusers_defaults({}, "diffedit") == DIFFUSERS_DEFAULTS["diffedit"]


def test_comments_are_dropped_and_missing_keys_are_diffusers_defaults(tmp_path):
    write(tmp_path, {"_comment": "x", "diffedit": {"_why": "y", "mask_encode_strength": 0.7}})
    assert recommended_settings(tmp_path) == {"diffedit": {"mask_encode_strength": 0.7}}
    full = with_diffusers_defaults(recommended_settings(tmp_path), "diffedit")
    assert full == {**DIFFUSERS_DEFAULTS["diffedit"], "mask_encode_strength": 0.7}


@pytest.mark.parametrize("content, phrase", [
    ("{ not json", "is not valid JSON"),
    ([1, 2], "must hold a JSON object"),
    ({"img2img": {}}, "unknown section 'img2img'"),
    ({"diffedit": 3}, "section 'diffedit' must be a JSON object"),
    ({"diffedit": {"mask_strength": 0.7}}, "unknown key 'mask_strength'"),
    ({"text_to_image": {"blend": "aligned"}}, "unknown key 'blend'"),  # a key of the other section
    ({"diffedit": {"num_inference_steps": 0}}, "`diffedit.num_inference_steps` must be a positive whole number"),
    ({"diffedit": {"num_inference_steps": 25.0}}, "`diffedit.num_inference_steps` must be a positive whole number"),
    ({"diffedit": {"mask_encode_strength": 1.5}}, "`diffedit.mask_encode_strength` must be a finite number > 0 and <= 1"),
    ({"diffedit": {"blend": "paper"}}, "`diffedit.blend` must be one of ['diffusers', 'aligned']"),
    ({"diffedit": {"mask_clamp": "image"}}, "`diffedit.mask_clamp` must be one of ['batch', 'per_image']"),
    ({"diffedit": {"negative_prompt": 0}}, "`diffedit.negative_prompt` must be a string or null"),
    ({"text_to_image": {"guidance_scale": -1}}, "`text_to_image.guidance_scale` must be a finite number >= 0"),
    ({"diffedit": {"num_inference_steps": 2, "inpaint_strength": 0.3}}, "gives int(2 * 0.3) = 0 steps"),
])
def test_malformed_files_are_one_sentence(tmp_path, content, phrase):
    write(tmp_path, content)
    with pytest.raises(InputError) as err:
        recommended_settings(tmp_path)
    message = str(err.value)
    assert phrase in message, message
    assert FILE_NAME in message and "\n" not in message


def test_the_defaults_are_the_methods_own():
    """DIFFUSERS_DEFAULTS (what the command falls back to) = the defaults in the methods'
    signatures, which are diffusers'; and the choices are diffedit.py's."""
    def defaults(method):
        return {n: p.default for n, p in inspect.signature(method).parameters.items()}

    mask, invert, call = (defaults(m) for m in (DiffEditPipeline.generate_mask, DiffEditPipeline.invert,
                                                DiffEditPipeline.__call__))
    d = DIFFUSERS_DEFAULTS["diffedit"]
    for key in ("num_maps_per_mask", "mask_encode_strength", "mask_thresholding_ratio", "mask_clamp", "guidance_scale"):
        assert d[key] == mask[key], key
    assert d["num_inference_steps"] == mask["num_inference_steps"] == invert["num_inference_steps"] \
        == call["num_inference_steps"]
    assert d["inpaint_strength"] == invert["inpaint_strength"] == call["inpaint_strength"]
    assert d["invert_guidance_scale"] == invert["guidance_scale"]
    assert (d["edit_guidance_scale"], d["negative_prompt"], d["blend"]) == (
        call["guidance_scale"], call["negative_prompt"], call["blend"])
    t2i = defaults(StableDiffusionPipeline.__call__)
    assert DIFFUSERS_DEFAULTS["text_to_image"] == {k: t2i[k] for k in DIFFUSERS_DEFAULTS["text_to_image"]}
    assert settings.BLEND_CHOICES == diffedit.BLENDS and settings.MASK_CLAMP_CHOICES == diffedit.MASK_CLAMPS
    from minidiff.pipelines.kandinsky_decoder import KandinskyV22CombinedPipeline

    kandinsky = defaults(KandinskyV22CombinedPipeline.__call__)
    assert DIFFUSERS_DEFAULTS["kandinsky"] == {k: kandinsky[k] for k in DIFFUSERS_DEFAULTS["kandinsky"]}
    assert set(settings.CHECKS) == set().union(*(set(v) for v in DIFFUSERS_DEFAULTS.values()))


# ----------------------------------------------------------------------------------------------
# The shapes model's file


def test_shapes_file_holds_the_measured_settings():
    """The single source of truth: evaluate.py's EDIT_SETTINGS (what the model card's figures
    were measured with) equals the file's diffedit section on every key they share, and the
    text-to-image section is the card's (DDIM 25 steps, guidance 6). Until evaluate reads the file."""
    from minidiff.training.shapes import evaluate

    shapes = recommended_settings(SHAPES)
    assert set(shapes) == {"diffedit", "text_to_image"}
    edit = shapes["diffedit"]
    edit_settings = getattr(evaluate, "EDIT_SETTINGS", None)
    if edit_settings is not None:
        shared = set(edit_settings) & set(edit)
        assert shared == set(edit_settings), "every EDIT_SETTINGS key belongs in the file"
        assert {k: edit[k] for k in shared} == {k: edit_settings[k] for k in shared}
    assert edit["mask_clamp"] == "per_image"  # evaluate_diffedit's
    assert edit["blend"] in diffedit.BLENDS
    assert shapes["text_to_image"] == {"num_inference_steps": 25, "guidance_scale": 6.0}
    assert json.loads((SHAPES / FILE_NAME).read_text())["_comment"] == settings.COMMENT


# ----------------------------------------------------------------------------------------------
# from_pretrained and save_pretrained


def test_from_pretrained_attaches_the_file_and_save_pretrained_writes_it_back(tmp_path):
    pipe = DiffEditPipeline.from_pretrained(SHAPES, torch_dtype=torch.float32)
    assert pipe.recommended_settings == recommended_settings(SHAPES) != {}
    assert DiffusionPipeline.from_pretrained(SHAPES).recommended_settings == pipe.recommended_settings
    pipe.save_pretrained(tmp_path / "saved")
    # The same file back (same comment, same values).
    assert json.loads((tmp_path / "saved" / FILE_NAME).read_text()) == json.loads((SHAPES / FILE_NAME).read_text())
    assert DiffEditPipeline.from_pretrained(tmp_path / "saved").recommended_settings == pipe.recommended_settings


def test_no_file_no_settings_and_nothing_written(tmp_path):
    tiny = save_tiny_pipeline(tmp_path / "tiny")
    pipe = StableDiffusionPipeline.from_pretrained(tiny)
    assert pipe.recommended_settings == {}
    assert StableDiffusionPipeline(**pipe.components).recommended_settings == {}  # built by hand: none
    pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / FILE_NAME).exists()


def test_a_bad_file_stops_loading_and_saving(tmp_path):
    tiny = save_tiny_pipeline(tmp_path / "tiny")
    pipe = StableDiffusionPipeline.from_pretrained(tiny)
    pipe.recommended_settings = {"diffedit": {"strength": 0.8}}
    with pytest.raises(InputError, match="unknown key 'strength'"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    write(bad, {"diffedit": {"blend": "paper"}})
    with pytest.raises(InputError, match="diffedit.blend"):
        StableDiffusionPipeline.from_pretrained(bad)
