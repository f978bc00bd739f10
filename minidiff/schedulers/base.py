"""What every minidiff scheduler shares: config, loading, timestep spacing, the forward process.

A scheduler holds the noise schedule (betas -> alpha_bar_t) and turns one network output into
the next, less noisy sample. The sampling rule itself lives in ddpm.py / ddim.py; this file has
the parts they have in common:

    SchedulerConfig   the frozen options dict: `config["beta_end"]` and `config.beta_end` both work
                      (like diffusers' FrozenDict, so a config moves freely between the libraries)
    SchedulerOutput   `prev_sample` (x_{t-1}) and `pred_original_sample` (the model's guess of x_0)
    randn             Gaussian noise drawn exactly as diffusers draws it (same generator -> same noise)
    Scheduler         from_config / from_pretrained / save_pretrained (scheduler_config.json),
                      the alpha_bar table, timestep spacing, the model-output -> (x_0, eps)
                      conversion, clipping and dynamic thresholding, add_noise, get_velocity

Config keys are the diffusers ones, so an official scheduler_config.json loads as is. A config
written for another scheduler (SD 1.5 ships a PNDMScheduler config with `skip_prk_steps`) loads
too: private keys (`_class_name`, `_diffusers_version`) are dropped silently, options of the other
minidiff schedulers as well (moving a config between DDIM and DDIM-inverse is routine), and any
other unknown key is dropped with one warning per `from_config` call.

References:
    Ho et al. 2020 (DDPM), eq. 4: q(x_t | x_0), used by add_noise
    Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", sec. 4
        and appendix D: the v-parameterisation, used by get_velocity and prediction_type
    Saharia et al. 2022 (Imagen), sec. 2.3: dynamic thresholding
    Lin et al. 2023, sec. 3.3 and table 2: "leading", "trailing" and "linspace" timestep spacing
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minidiff.errors import InputError
from minidiff.loading import read_json, resolve_folder, write_json
from minidiff.schedulers.betas import make_betas
from minidiff.validation import (
    check_choice,  # re-exported: the schedulers' option checks
)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
CONFIG_NAME = "scheduler_config.json"


class SchedulerConfig(dict):
    """A read-only dict whose keys are also attributes: `config.num_train_timesteps`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"The scheduler config has no option {name!r}.") from None

    def _frozen(self, *args, **kwargs):
        raise TypeError(
            "A scheduler config is read-only: build a new scheduler instead, e.g. "
            "`DDIMScheduler.from_config(old.config, timestep_spacing='trailing')`."
        )

    __setattr__ = __setitem__ = __delitem__ = _frozen
    pop = popitem = clear = update = setdefault = _frozen

    def __reduce__(self):  # copy / deepcopy / pickle rebuild from a plain dict
        return (type(self), (dict(self),))


@dataclass
class SchedulerOutput:
    prev_sample: torch.Tensor  # x_{t-1} (x_{t+1} for the inverse scheduler)
    pred_original_sample: torch.Tensor | None = None  # the model's estimate of x_0 at this step


def randn(
    shape: tuple[int, ...],
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn on the generator's device and moved to `device`.

    A list of generators gives one per batch entry, so each image of a batch is reproducible on
    its own. This matches diffusers' `randn_tensor`, so the same seeded generator gives the same
    noise in both libraries.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise InputError(f"Got {len(generator)} generators for a batch of {shape[0]}; pass one per batch entry.")
        parts = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(parts).to(device)
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


def _expand_to(values: torch.Tensor, ndim: int) -> torch.Tensor:
    # (B,) -> (B, 1, 1, 1) so a per-sample scalar broadcasts over (B, C, H, W)
    return values.flatten().reshape(-1, *([1] * (ndim - 1)))


class Scheduler:
    """Base class; a subclass defines `__init__(self, <options>)` and calls `_setup(locals())`."""

    order = 1  # one model evaluation per step (multistep solvers have order > 1)
    init_noise_sigma = 1.0  # x_T ~ N(0, I): pipelines scale the first latent by this
    timestep_spacings: tuple[str, ...] = TIMESTEP_SPACINGS
    # Option names of every scheduler subclass; a config key in here is never "unknown".
    _all_options: set[str] = set()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Scheduler._all_options |= cls._option_names()

    @classmethod
    def _option_names(cls) -> set[str]:
        return {p for p in inspect.signature(cls.__init__).parameters if p != "self"}

    # ------------------------------------------------------------------------------------------
    # Construction, config and files

    def _setup(self, options: dict) -> None:
        """Store the constructor's arguments as `self.config` and build the alpha_bar table."""
        options = {k: v for k, v in options.items() if k not in ("self", "__class__")}
        if isinstance(options.get("trained_betas"), (torch.Tensor, np.ndarray)):
            options["trained_betas"] = options["trained_betas"].tolist()  # keep the config JSON-able
        self.config = SchedulerConfig(options)
        c = self.config
        if "prediction_type" in c:
            check_choice("prediction_type", c.prediction_type, PREDICTION_TYPES)
        if "timestep_spacing" in c:
            check_choice("timestep_spacing", c.timestep_spacing, self.timestep_spacings)
        self.betas = make_betas(
            c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.trained_betas,
            c.rescale_betas_zero_snr,
        )
        self.alphas = 1.0 - self.betas  # alpha_t = 1 - beta_t
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # alpha_bar_t, float32, (T,)
        self.num_inference_steps: int | None = None

    @classmethod
    def from_config(cls, config: dict | None = None, **overrides):
        """Build from a config dict (or another scheduler's `.config`), with keyword overrides."""
        config = dict(config or {})
        mine = cls._option_names()
        # Unknown = not an option of any minidiff scheduler and not private ("_class_name", ...).
        unknown = sorted(k for k in config if not k.startswith("_") and k not in Scheduler._all_options)
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring config keys it does not use: {unknown}.", stacklevel=2)
        options = {k: v for k, v in config.items() if k in mine}
        return cls(**{**options, **overrides})

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        subfolder: str | None = None,
        local_files_only: bool | None = None,
        revision: str | None = None,
        **overrides,
    ):
        """Read `scheduler_config.json` from a folder (or hub repo); a pipeline passes
        `subfolder="scheduler"`."""
        folder = resolve_folder(
            path_or_repo_id, subfolder, allow_patterns=[CONFIG_NAME],
            local_files_only=local_files_only, revision=revision,
        )
        return cls.from_config(read_json(folder, CONFIG_NAME), **overrides)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        write_json({**self.config, "_class_name": type(self).__name__}, folder / CONFIG_NAME)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "trained_betas")
        return f"{type(self).__name__}({options})"

    # ------------------------------------------------------------------------------------------
    # Timesteps

    def _check_num_inference_steps(self, num_inference_steps: int) -> None:
        T = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise InputError(f"num_inference_steps must be a whole number, got {num_inference_steps!r}.")
        if not 1 <= num_inference_steps <= T:
            raise InputError(
                f"num_inference_steps must be between 1 and num_train_timesteps ({T}): the model was "
                f"trained on {T} noise levels and a sampler can visit each at most once. "
                f"Got {num_inference_steps}."
            )

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        """n of the T training timesteps, descending (Lin et al. 2023, table 2).

        leading   0, r, 2r, ..., (n-1) r with r = T // n, plus steps_offset   (DDIM paper, SD 1.x)
        trailing  T - 1, T - 1 - r, ... with r = T / n, rounded: always starts at the noisiest step
        linspace  n evenly spaced points from 0 to T - 1, rounded
        Rounding is numpy's half-to-even, as in diffusers, so both pick the same steps.
        """
        T, spacing = self.config.num_train_timesteps, self.config.timestep_spacing
        if spacing == "leading":
            t = np.arange(n)[::-1] * (T // n) + self.config.steps_offset
        elif spacing == "trailing":
            # np.arange with a float step (not T - k * T / n) so that exact .5 ties round the same
            # way as in diffusers. Its float error can give n + 1 points (n = 61, 103, ...), where
            # diffusers keeps a last timestep of -1 (a bug: alpha_bar[-1] is alpha_bar_T); we keep n.
            t = np.round(np.arange(T, 0, -T / n)[:n]) - 1
        else:  # linspace
            t = np.linspace(0, T - 1, n).round()[::-1]
        t = t.astype(np.int64)
        if t.max() >= T:
            raise InputError(
                f"With steps_offset={self.config.steps_offset} and {n} steps the timesteps reach "
                f"{t.max()}, past the last training step {T - 1}. Use fewer steps or steps_offset=0."
            )
        return t

    def _check_ready(self) -> None:
        if self.num_inference_steps is None:
            raise InputError(
                f"{type(self).__name__}.step was called before set_timesteps: call "
                "`scheduler.set_timesteps(num_inference_steps)` first, then loop over `scheduler.timesteps`."
            )

    # ------------------------------------------------------------------------------------------
    # Model output -> x_0 and eps

    def predict_x0_and_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: float):
        """Read the network output as x_0 and eps at noise level alpha_bar_t.

        Every parameterisation describes the same x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
        (DDPM eq. 4); given x_t and one of the three, the other two follow. Public: DiffEdit's
        inversion regulariser reads eps from a model output through it.
        """
        sqrt_ab, sqrt_1m_ab = alpha_bar_t**0.5, (1 - alpha_bar_t) ** 0.5
        # Under a zero-terminal-SNR schedule (Lin et al. 2023) alpha_bar_T = 0: x_T holds no signal,
        # eps = x_T, and only "v_prediction" / "sample" can still say what x_0 is (their sec. 3.2);
        # "epsilon" divides by sqrt(0) there.
        kind = self.config.prediction_type
        if kind == "epsilon":
            eps = model_output
            x0 = (x_t - sqrt_1m_ab * eps) / sqrt_ab  # DDPM eq. 15, DDIM eq. 12 "predicted x_0"
        elif kind == "sample":
            x0 = model_output
            eps = (x_t - sqrt_ab * x0) / sqrt_1m_ab
        else:  # v_prediction: v = sqrt(ab) eps - sqrt(1-ab) x_0 (Salimans & Ho 2022, sec. 4, app. D)
            v = model_output
            x0 = sqrt_ab * x_t - sqrt_1m_ab * v
            eps = sqrt_ab * v + sqrt_1m_ab * x_t
        return x0, eps

    def _clip_or_threshold(self, x0: torch.Tensor) -> torch.Tensor:
        if self.config.get("thresholding", False):
            return self._dynamic_threshold(x0)
        if self.config.clip_sample:  # static clipping to the data range
            return x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0

    def _dynamic_threshold(self, x0: torch.Tensor) -> torch.Tensor:
        """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3).

        Per image, s = the `dynamic_thresholding_ratio` quantile of |x_0|, kept in
        [1, sample_max_value]; x_0 is clipped to [-s, s] and divided by s. With s = 1 this is plain
        clipping to [-1, 1]; with s > 1 saturated pixels are pulled inwards instead of flattened.
        Meant for pixel-space models, not for SD's latents.
        """
        dtype = x0.dtype
        B = x0.shape[0]
        flat = x0.reshape(B, -1)  # (B, C*H*W)
        if dtype not in (torch.float32, torch.float64):
            flat = flat.float()  # quantile needs float32/64
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)  # (B,)
        s = s.clamp(min=1, max=self.config.sample_max_value).unsqueeze(1)  # (B, 1)
        flat = torch.clamp(flat, -s, s) / s
        return flat.reshape(x0.shape).to(dtype)

    # ------------------------------------------------------------------------------------------
    # The forward process, for training and for editing

    def _sqrt_alpha_bars(self, timesteps: torch.Tensor, like: torch.Tensor):
        alpha_bar = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)[timesteps.to(like.device)]
        return _expand_to(alpha_bar**0.5, like.ndim), _expand_to((1 - alpha_bar) ** 0.5, like.ndim)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, a sample of q(x_t | x_0) (DDPM eq. 4).
        `timesteps` holds one t per batch entry (or one for all)."""
        sqrt_ab, sqrt_1m_ab = self._sqrt_alpha_bars(torch.as_tensor(timesteps), original_samples)
        return sqrt_ab * original_samples + sqrt_1m_ab * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0
        (Salimans & Ho 2022, sec. 4); `sample` is the clean x_0."""
        sqrt_ab, sqrt_1m_ab = self._sqrt_alpha_bars(torch.as_tensor(timesteps), sample)
        return sqrt_ab * noise - sqrt_1m_ab * sample

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """Identity: DDPM/DDIM feed x_t to the model unscaled. Kept so that a pipeline can call it
        for every scheduler (Karras-style schedulers divide by sqrt(sigma^2 + 1) here)."""
        return sample

    @staticmethod
    def _variance_noise(model_output: torch.Tensor, generator, variance_noise: torch.Tensor | None) -> torch.Tensor:
        """z ~ N(0, I) for a stochastic step: the caller's `variance_noise`, or drawn from `generator`."""
        if generator is not None and variance_noise is not None:
            raise InputError("Pass either `generator` or `variance_noise` to step, not both.")
        if variance_noise is None:
            variance_noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
        return variance_noise

    def _alpha_bar(self, t: int) -> float:
        return float(self.alphas_cumprod[t])
