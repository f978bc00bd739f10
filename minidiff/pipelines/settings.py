"""A model folder's recommended settings: `recommended_settings.json` beside model_index.json.

minidiff's pipeline methods keep diffusers' defaults (`generate_mask(mask_encode_strength=0.5)`,
`invert(guidance_scale=7.5)`, ...), so diffusers code runs unchanged and gives the same result. A
small model may still need other values; its folder says which in one file, read by

    the `minidiff` command     its defaults for generate / mask / invert / edit (a flag overrides)
    Pipeline.from_pretrained   `pipe.recommended_settings` (a dict; {} without the file), which
                               save_pretrained writes back
    recommended_settings(folder) -> dict   this file's reader, for anyone else (an evaluation)

diffusers reads model_index.json and the component folders only, so it ignores the file.

The file (weights/shapes/recommended_settings.json, documented in its model card):

    {"_comment": "...",
     "diffedit": {"num_inference_steps": 25, "mask_encode_strength": 0.7, ..., "blend": "aligned"},
     "text_to_image": {"num_inference_steps": 25, "guidance_scale": 6.0}}

A section may name any of its keys; what it leaves out is diffusers' default (DIFFUSERS_DEFAULTS,
the defaults of the methods, which tests/test_recommended_settings.py reads off their signatures).
Keys starting with "_" are comments. What each key sets:

    diffedit
      num_inference_steps       DDIM grid of all three steps (generate_mask, invert, __call__)
      num_maps_per_mask, mask_encode_strength, mask_thresholding_ratio, mask_clamp   generate_mask's
      guidance_scale            generate_mask's guidance_scale
      inpaint_strength          invert's and __call__'s
      invert_guidance_scale     invert's guidance_scale (1: plain DDIM inversion)
      edit_guidance_scale       __call__'s guidance_scale
      negative_prompt           __call__'s; "source" means the source prompt (diffusers' example)
      blend                     __call__'s ("diffusers" or "aligned", diffedit.py)
    text_to_image               StableDiffusionPipeline.__call__'s
      num_inference_steps, guidance_scale, negative_prompt
    kandinsky                   KandinskyV22CombinedPipeline.__call__'s (a Kandinsky decoder folder)
      num_inference_steps, guidance_scale (the decoder's), negative_prompt,
      prior_num_inference_steps, prior_guidance_scale

Every value is checked when the file is read, with the rules the methods apply, so a mistake in
the file is one sentence naming the file and the key, not an error from deep inside a call.

This module imports only errors, loading and validation: pipeline.py reads the file through it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minidiff.errors import InputError
from minidiff.loading import read_json, write_json
from minidiff.validation import (
    check_choice,
    check_guidance,
    check_number,
    check_positive_int,
    steps_for_strength,
)

FILE_NAME = "recommended_settings.json"

# What save_pretrained writes as the file's "_comment" (weights/shapes carries the same text).
COMMENT = ("Recommended settings of this model (the model card's figures were measured with them). The minidiff "
           "command uses them as its defaults (a flag overrides them) and from_pretrained puts them in "
           "pipe.recommended_settings; the library's methods keep diffusers' defaults, and diffusers ignores "
           "this file. Keys: minidiff/pipelines/settings.py.")

# section -> key -> the default of the method argument it sets (diffusers' default).
DIFFUSERS_DEFAULTS: dict[str, dict[str, Any]] = {
    "diffedit": {
        "num_inference_steps": 50, "num_maps_per_mask": 10, "mask_encode_strength": 0.5,
        "mask_thresholding_ratio": 3.0, "mask_clamp": "batch", "guidance_scale": 7.5, "inpaint_strength": 0.8,
        "invert_guidance_scale": 7.5, "edit_guidance_scale": 7.5, "negative_prompt": None, "blend": "diffusers",
    },
    "text_to_image": {"num_inference_steps": 50, "guidance_scale": 7.5, "negative_prompt": None},
    "kandinsky": {"num_inference_steps": 100, "guidance_scale": 4.0, "negative_prompt": None,
                  "prior_num_inference_steps": 25, "prior_guidance_scale": 4.0},
}

# The choices of diffedit.py's BLENDS and MASK_CLAMPS (importing diffedit here would close a
# circle through pipeline.py; tests/test_recommended_settings.py checks they are equal).
BLEND_CHOICES = ("diffusers", "aligned")
MASK_CLAMP_CHOICES = ("batch", "per_image")


def _prompt(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise InputError(f"`{name}` must be a string or null; got {value!r}.")


# key -> check(name, value), the rule the method argument it sets applies.
CHECKS: dict[str, Callable[[str, Any], None]] = {
    "num_inference_steps": check_positive_int,
    "num_maps_per_mask": check_positive_int,
    "prior_num_inference_steps": check_positive_int,
    "prior_guidance_scale": lambda name, v: check_guidance(v, name),
    "mask_encode_strength": lambda name, v: check_number(name, v, low=0, high=1, low_open=True),
    "inpaint_strength": lambda name, v: check_number(name, v, low=0, high=1, low_open=True),
    "mask_thresholding_ratio": lambda name, v: check_number(name, v, low=0, low_open=True),
    "guidance_scale": lambda name, v: check_guidance(v, name),
    "invert_guidance_scale": lambda name, v: check_guidance(v, name),
    "edit_guidance_scale": lambda name, v: check_guidance(v, name),
    "mask_clamp": lambda name, v: check_choice(name, v, MASK_CLAMP_CHOICES),
    "blend": lambda name, v: check_choice(name, v, BLEND_CHOICES),
    "negative_prompt": _prompt,
}


def _entries(mapping: dict):
    """A JSON object's (key, value) pairs without its comments (keys starting with "_")."""
    return [(k, v) for k, v in mapping.items() if not (isinstance(k, str) and k.startswith("_"))]


def check_settings(settings: Any, where: str) -> dict[str, dict[str, Any]]:
    """The settings without comments, each value checked; `where` names the file in the error."""
    if not isinstance(settings, dict):
        raise InputError(f"{where} must hold a JSON object with the sections {sorted(DIFFUSERS_DEFAULTS)}; "
                         f"got {type(settings).__name__}.")
    clean = {}
    for section, values in _entries(settings):
        if section not in DIFFUSERS_DEFAULTS:
            raise InputError(f"{where} has an unknown section {section!r}; the sections are "
                             f"{sorted(DIFFUSERS_DEFAULTS)} (keys starting with '_' are comments).")
        if not isinstance(values, dict):
            raise InputError(f"{where}: section {section!r} must be a JSON object of settings; got {values!r}.")
        known = DIFFUSERS_DEFAULTS[section]
        clean[section] = {}
        for key, value in _entries(values):
            if key not in known:
                raise InputError(f"{where}: section {section!r} has an unknown key {key!r}; it may name "
                                 f"{sorted(known)}.")
            try:
                CHECKS[key](f"{section}.{key}", value)
            except InputError as err:
                raise InputError(f"In {where}, {err}") from None
            clean[section][key] = value
    # A strength must leave at least one step on the grid (the rule of the methods).
    full = with_diffusers_defaults(clean, "diffedit")
    for strength in ("inpaint_strength", "mask_encode_strength"):
        try:
            steps_for_strength(full["num_inference_steps"], full[strength], f"diffedit.{strength}",
                               "diffedit.num_inference_steps")
        except InputError as err:
            raise InputError(f"In {where}, {err}") from None
    return clean


def recommended_settings(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} from `folder`/recommended_settings.json (comments dropped, every
    value checked), or {} when the folder has no such file. A malformed file or an unknown key
    raises InputError."""
    path = Path(folder) / FILE_NAME
    if not path.is_file():
        return {}
    return check_settings(read_json(folder, FILE_NAME), repr(str(path)))


def with_diffusers_defaults(settings: dict, section: str) -> dict[str, Any]:
    """Every key of `section`: the value `settings` gives, else diffusers' default."""
    return {**DIFFUSERS_DEFAULTS[section], **settings.get(section, {})}


def write_recommended_settings(settings: dict, folder: str | os.PathLike) -> None:
    """Write `settings` ({section: {key: value}}, checked first) as `folder`/recommended_settings.json,
    with COMMENT as its "_comment"."""
    clean = check_settings(settings, "recommended_settings")
    write_json({"_comment": COMMENT, **clean}, Path(folder) / FILE_NAME)
