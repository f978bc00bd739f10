"""Argument checks shared by the schedulers, the pipelines and the `minidiff` command.

Every check takes the argument's name first, then its value, and raises `InputError` (NaN or
inf: `NonFiniteError`) with one sentence saying what was expected and what came:

    check_choice("blend", "paper", ("diffusers", "aligned"))
        -> `blend` must be one of ['diffusers', 'aligned']; got 'paper'.
    check_positive_int("--steps", 0)
        -> --steps must be a positive whole number (at least 1); got 0.

A pipeline names its keyword argument ("num_maps_per_mask", shown in backticks); the command
names its flag ("--num-maps", shown as typed).

This module imports only torch and minidiff.errors, so every layer may use it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from minidiff.errors import InputError, NonFiniteError


def _label(name: str) -> str:
    return name if name.startswith("-") else f"`{name}`"


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """`value` is one of `allowed`."""
    if value not in allowed:
        raise InputError(f"{_label(name)} must be one of {list(allowed)}; got {value!r}.")


def check_positive_int(name: str, value: Any, unit: str = "") -> None:
    """`value` is a whole number >= 1 (not a bool, not a float). `unit`: e.g. " of pixels"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InputError(f"{_label(name)} must be a positive whole number{unit} (at least 1); got {value!r}.")


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, why: str = "") -> None:
    """`value` is a finite real number in [low, high] ((low, high] when `low_open`); either bound
    may be None. `why` (a few words) is added to the message in parentheses."""
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    too_low = is_number and low is not None and (value <= low if low_open else value < low)
    too_high = is_number and high is not None and value > high
    finite = is_number and math.isfinite(value)
    if finite and not too_low and not too_high:
        return
    lo = "" if low is None else (f" > {low:g}" if low_open else f" >= {low:g}")
    hi = "" if high is None else f" and <= {high:g}"
    reason = f" ({why})" if why else ""
    error = NonFiniteError if is_number and not finite else InputError
    raise error(f"{_label(name)} must be a finite number{lo}{hi}{reason}; got {value!r}.")


def check_guidance(guidance_scale: Any, name: str = "guidance_scale") -> None:
    """Classifier-free guidance w (Ho & Salimans 2022, eq. 6): any finite w >= 0; w <= 1 turns
    guidance off (diffusers' rule)."""
    check_number(name, guidance_scale, low=0, why="1 or less turns guidance off")


def steps_for_strength(num_inference_steps: Any, strength: Any, strength_name: str,
                       steps_name: str = "num_inference_steps") -> int:
    """How many of the n steps of the DDIM grid a strength r in [0, 1] uses: int(n * r), as in
    img2img; at least one, or nothing would be noised."""
    check_positive_int(steps_name, num_inference_steps)
    check_number(strength_name, strength, low=0, high=1, why="the fraction of the noise schedule to use")
    k = min(int(num_inference_steps * strength), num_inference_steps)
    if k == 0:
        raise InputError(
            f"{steps_name}={num_inference_steps} with {strength_name}={strength} gives "
            f"int({num_inference_steps} * {strength}) = 0 steps, so no noise would be added; "
            f"raise {_label(strength_name)} or {_label(steps_name)}.")
    return k


def check_device(name, allowed: tuple[str, ...] = ("cpu", "cuda", "mps")) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:1", "mps", or a torch.device) as a torch.device, refused with
    one sentence when it is not one of the `allowed` types or this machine does not have it."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {str(name)!r}; use {', '.join(allowed)} (cuda:N for one GPU).") from None
    if device.type not in allowed:
        raise InputError(f"device {str(name)!r}: this runs on {', '.join(allowed)}.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {str(name)!r} asked for, but CUDA is not available in this torch build "
                             f"(or on this machine); use cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {str(name)!r} asked for, but this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s), numbered from 0.")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {str(name)!r} asked for, but MPS is not available on this machine; use cpu.")
    return device
