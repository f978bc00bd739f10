"""Parity of minidiff's DDPM / DDIM / DDIM-inverse schedulers with diffusers, option by option.

How the comparison works: both libraries build the same scheduler from the same config dict,
then run a full sampling loop on a deterministic dummy denoiser (`dummy_model`, a smooth function
of (x_t, t)), each on its own trajectory, in float64. At every step the timesteps must be
identical and `prev_sample` / `pred_original_sample` must agree to RTOL = 1e-10 relative (max
|a - b| / max |b|).

Why 1e-10 is the right tolerance: both libraries build the float32 alpha_bar table bit for bit
(checked exactly in test_schedule_tables_are_identical) and then do the step arithmetic in
float64 (diffusers keeps its tables in float32 and would do the scalar coefficients in float32,
so the tests cast its tables to float64 with `_float64`; test_float32_parity_with_stock_diffusers
runs stock diffusers in float32 too). What remains is the order of float64 operations, ~1e-16 per
step; even 1000 steps stay many orders of magnitude under 1e-10, while any real difference (a
wrong alpha_bar index, a sign, a missing clip) is >= 1e-4.

The option grids are pairwise covering arrays: every pair of option values appears in at least one
row (test_grids_cover_every_pair checks this), which catches every bug that needs two options to
show, with 19 / 28 / 16 rows instead of a cartesian product of ~10^5.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings

import diffusers
import numpy as np
import pytest
import torch

from minidiff.schedulers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, SchedulerConfig
from minidiff.schedulers.betas import log_snr, make_betas
from tests.helpers import max_rel_err

RTOL = 1e-10
SHAPE = (1, 4, 8, 8)
STEP_COUNTS = (1, 10, 50, 1000)
# Trained betas: an arbitrary increasing curve, to check that an explicit list wins over the schedule.
TRAINED_BETAS = (np.linspace(0.0003, 0.025, 1000) ** 1.1).tolist()


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here have 256 elements: a second thread only adds OpenMP wake-ups, which cost up
    to a scheduler time slice (~10 ms) per op when the 2 cores are busy with other tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dummy_model(x: torch.Tensor, t, learned_variance: bool = False) -> torch.Tensor:
    """A stand-in for the UNet: smooth in x and t, of order one like eps, v or x_0. For the learned
    variance types it also returns a second half of channels in (0, 1) (a variance for "learned",
    a value in [-1, 1] for "learned_range")."""
    s = float(t) / 1000
    out = (0.8 - 0.3 * s) * 2 * x / (1 + x * x) + 0.2 / (1 + (x - s) ** 2)
    if learned_variance:
        out = torch.cat([out, 1 / (1 + (x + s) ** 2)], dim=1)  # (B, 2C, H, W)
    return out


def _float64(ref):
    """Cast a diffusers scheduler's alpha tables to float64, so it does its step arithmetic in
    float64 as minidiff does (the values are the same float32 numbers, only the math is wider)."""
    for name in ("alphas_cumprod", "final_alpha_cumprod", "initial_alpha_cumprod", "one"):
        if hasattr(ref, name):
            setattr(ref, name, getattr(ref, name).double())
    return ref


def _start(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _beta_options(beta: str) -> dict:
    if beta == "trained":
        return {"trained_betas": TRAINED_BETAS}
    if beta == "linear":
        return {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
    return {"beta_schedule": beta, "beta_start": 0.00085, "beta_end": 0.012}


def _x0_options(x0: str) -> dict:
    # "clip" uses range 0.8 so that clipping really happens for the dummy model's x_0 estimates.
    return {
        "none": {"clip_sample": False, "thresholding": False},
        "clip": {"clip_sample": True, "clip_sample_range": 0.8, "thresholding": False},
        "threshold": {"clip_sample": True, "thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
    }[x0]


# ------------------------------------------------------------------------------------------------
# Option grids (pairwise covering arrays, generated once by a greedy search and pasted here)

DDIM_FACTORS = dict(
    beta=["linear", "scaled_linear", "squaredcos_cap_v2", "trained"], spacing=["leading", "trailing", "linspace"],
    offset=[0, 1], alpha_one=[False, True], x0=["none", "clip", "threshold"],
    pred=["epsilon", "v_prediction", "sample"], zero_snr=[False, True], eta=[0.0, 0.5, 1.0],
    clipped_eps=[False, True], n=list(STEP_COUNTS),
)
DDIM_GRID = [
    # beta, spacing, offset, alpha_one, x0, pred, zero_snr, eta, clipped_eps, n
    ("scaled_linear", "trailing", 0, True, "none", "v_prediction", False, 0.5, True, 1),
    ("scaled_linear", "linspace", 0, False, "threshold", "v_prediction", True, 1.0, True, 1),
    ("squaredcos_cap_v2", "leading", 1, False, "none", "sample", True, 0.0, False, 1),
    ("trained", "linspace", 1, True, "threshold", "sample", False, 0.5, False, 1),
    ("linear", "linspace", 1, False, "clip", "v_prediction", True, 1.0, False, 1),
    ("trained", "trailing", 1, False, "none", "epsilon", False, 0.0, True, 1),
    ("squaredcos_cap_v2", "linspace", 0, False, "clip", "epsilon", False, 0.5, False, 10),
    ("linear", "trailing", 1, True, "clip", "sample", True, 0.0, True, 10),
    ("trained", "trailing", 0, True, "none", "epsilon", False, 1.0, False, 10),
    ("scaled_linear", "leading", 1, True, "threshold", "v_prediction", False, 0.0, False, 10),
    ("linear", "leading", 1, False, "threshold", "sample", True, 1.0, False, 50),
    ("trained", "leading", 0, True, "clip", "sample", False, 0.0, True, 50),
    ("scaled_linear", "leading", 1, True, "none", "epsilon", False, 0.5, False, 50),
    ("squaredcos_cap_v2", "trailing", 1, True, "clip", "v_prediction", False, 1.0, False, 50),
    ("linear", "linspace", 0, True, "clip", "epsilon", False, 0.0, True, 50),
    ("trained", "linspace", 1, True, "none", "v_prediction", True, 0.0, False, 1000),
    ("squaredcos_cap_v2", "trailing", 1, False, "threshold", "epsilon", False, 1.0, True, 1000),
    ("linear", "leading", 0, True, "none", "sample", True, 0.5, False, 1000),
    ("scaled_linear", "linspace", 0, True, "clip", "sample", False, 1.0, True, 1000),
]

DDPM_FACTORS = dict(
    beta=DDIM_FACTORS["beta"], spacing=DDIM_FACTORS["spacing"], offset=[0, 1], x0=DDIM_FACTORS["x0"],
    pred=DDIM_FACTORS["pred"], zero_snr=[False, True],
    variance=["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"],
    noise=["generator", "tensor"], n=list(STEP_COUNTS),
)
DDPM_GRID = [
    # beta, spacing, offset, x0, pred, zero_snr, variance, noise, n
    ("linear", "linspace", 0, "none", "epsilon", False, "fixed_large", "tensor", 1),
    ("linear", "trailing", 1, "clip", "sample", True, "learned", "generator", 1),
    ("trained", "trailing", 1, "none", "v_prediction", True, "fixed_small_log", "tensor", 1),
    ("scaled_linear", "leading", 1, "clip", "v_prediction", True, "learned_range", "tensor", 1),
    ("scaled_linear", "trailing", 0, "threshold", "sample", True, "fixed_large", "tensor", 1),
    ("squaredcos_cap_v2", "leading", 1, "threshold", "sample", True, "fixed_large_log", "tensor", 1),
    ("trained", "trailing", 0, "clip", "v_prediction", True, "fixed_small", "tensor", 1),
    ("linear", "trailing", 1, "clip", "epsilon", False, "fixed_small_log", "tensor", 1),
    ("scaled_linear", "trailing", 1, "clip", "sample", True, "fixed_large_log", "generator", 10),
    ("trained", "linspace", 0, "threshold", "v_prediction", False, "learned", "generator", 10),
    ("scaled_linear", "linspace", 0, "none", "sample", True, "fixed_small", "tensor", 10),
    ("linear", "leading", 0, "threshold", "sample", False, "fixed_small_log", "generator", 10),
    ("squaredcos_cap_v2", "leading", 0, "none", "epsilon", False, "fixed_large", "tensor", 10),
    ("linear", "linspace", 0, "threshold", "v_prediction", True, "learned_range", "tensor", 10),
    ("squaredcos_cap_v2", "leading", 1, "threshold", "v_prediction", True, "fixed_small", "tensor", 50),
    ("trained", "leading", 1, "clip", "epsilon", False, "fixed_large", "generator", 50),
    ("scaled_linear", "trailing", 0, "threshold", "epsilon", False, "learned_range", "tensor", 50),
    ("linear", "linspace", 0, "clip", "v_prediction", True, "fixed_large_log", "tensor", 50),
    ("scaled_linear", "trailing", 1, "none", "epsilon", False, "learned", "tensor", 50),
    ("scaled_linear", "linspace", 0, "none", "sample", False, "fixed_small_log", "tensor", 50),
    ("trained", "trailing", 1, "clip", "epsilon", False, "fixed_large_log", "generator", 50),
    ("squaredcos_cap_v2", "linspace", 0, "none", "v_prediction", False, "learned_range", "generator", 50),
    ("squaredcos_cap_v2", "trailing", 0, "clip", "sample", False, "fixed_small_log", "tensor", 1000),
    ("trained", "leading", 0, "none", "sample", True, "learned_range", "generator", 1000),
    ("squaredcos_cap_v2", "linspace", 1, "none", "v_prediction", False, "fixed_large_log", "generator", 1000),
    ("linear", "linspace", 1, "threshold", "epsilon", False, "fixed_small", "generator", 1000),
    ("scaled_linear", "trailing", 1, "threshold", "v_prediction", True, "fixed_large", "generator", 1000),
    ("squaredcos_cap_v2", "leading", 0, "threshold", "v_prediction", False, "learned", "tensor", 1000),
]

INVERSE_FACTORS = dict(
    beta=DDIM_FACTORS["beta"], spacing=["leading", "trailing"], offset=[0, 1], alpha_one=[False, True],
    clip=[False, True], pred=DDIM_FACTORS["pred"], zero_snr=[False, True], n=list(STEP_COUNTS),
)
INVERSE_GRID = [
    # beta, spacing, offset, alpha_one, clip, pred, zero_snr, n
    ("scaled_linear", "trailing", 0, False, False, "epsilon", False, 1),
    ("squaredcos_cap_v2", "leading", 1, True, False, "v_prediction", True, 1),
    ("linear", "leading", 1, False, True, "sample", True, 1),
    ("trained", "leading", 0, False, False, "v_prediction", False, 1),
    ("linear", "leading", 1, True, True, "v_prediction", False, 10),
    ("trained", "trailing", 0, False, True, "sample", True, 10),
    ("scaled_linear", "leading", 0, True, False, "epsilon", True, 10),
    ("squaredcos_cap_v2", "leading", 1, False, True, "sample", False, 10),
    ("trained", "leading", 1, False, False, "sample", True, 50),
    ("linear", "trailing", 0, True, True, "epsilon", True, 50),
    ("scaled_linear", "trailing", 1, False, True, "v_prediction", False, 50),
    ("squaredcos_cap_v2", "leading", 0, True, True, "epsilon", False, 50),
    ("squaredcos_cap_v2", "trailing", 0, False, True, "v_prediction", True, 1000),
    ("trained", "trailing", 1, True, False, "epsilon", False, 1000),
    ("scaled_linear", "leading", 0, False, False, "sample", True, 1000),
    ("linear", "trailing", 1, False, False, "epsilon", True, 1000),
]


def _impossible_pair(a: tuple, b: tuple) -> bool:
    """Pairs no valid row can hold: epsilon-prediction divides by sqrt(alpha_bar_T) = 0 under a
    zero-terminal-SNR schedule, and sample-prediction divides by sqrt(1 - 1) = 0 on the first
    inverse step from alpha_bar = 1. (Lin et al. 2023 pair zero SNR with v-prediction.)"""
    pair = {a, b}
    return pair == {("pred", "epsilon"), ("zero_snr", True)} or pair == {("pred", "sample"), ("alpha_one", True)}


@pytest.mark.parametrize(
    "factors, grid, exempt",
    [(DDIM_FACTORS, DDIM_GRID, ()), (DDPM_FACTORS, DDPM_GRID, ()), (INVERSE_FACTORS, INVERSE_GRID, ("zero_snr",))],
    ids=["ddim", "ddpm", "inverse"],
)
def test_grids_cover_every_pair(factors, grid, exempt):
    names = list(factors)
    seen = {((names[i], row[i]), (names[j], row[j])) for row in grid for i, j in itertools.combinations(range(len(names)), 2)}
    missing = []
    for i, j in itertools.combinations(range(len(names)), 2):
        for a in factors[names[i]]:
            for b in factors[names[j]]:
                pair = ((names[i], a), (names[j], b))
                # The inverse scheduler never divides by sqrt(alpha_bar_T), so zero SNR + epsilon is valid there.
                blocked = _impossible_pair(*pair) and not (names[i] in exempt or names[j] in exempt)
                if pair not in seen and not blocked:
                    missing.append(pair)
    assert not missing, f"the grid misses these option pairs: {missing}"


# ------------------------------------------------------------------------------------------------
# Schedules and timesteps


@pytest.mark.parametrize("beta", DDIM_FACTORS["beta"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedule_tables_are_identical(beta, zero_snr):
    options = {**_beta_options(beta), "rescale_betas_zero_snr": zero_snr}
    ours, ref = DDPMScheduler(**options), diffusers.DDPMScheduler(**options)
    # Bit-identical float32 tables: everything downstream depends on them.
    assert ours.betas.dtype == torch.float32
    assert torch.equal(ours.betas, ref.betas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    if zero_snr:  # Lin et al. 2023: alpha_bar_T = 0 exactly, alpha_bar_0 unchanged
        assert ours.alphas_cumprod[-1] == 0
        plain = DDPMScheduler(**_beta_options(beta))
        assert math.isclose(ours.alphas_cumprod[0], plain.alphas_cumprod[0], rel_tol=1e-6)
        assert log_snr(ours.alphas_cumprod)[-1] == -math.inf


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_for_every_step_count(spacing, offset):
    """Every n from 1 to 1000. Two documented differences: leading + steps_offset=1 + n=1000 would
    reach timestep 1000 (diffusers fails later with an IndexError, minidiff raises a ValueError
    at once), and for some n np.arange's float error makes diffusers' trailing grid n + 1 long with
    a last timestep of -1; minidiff keeps the n proper timesteps."""
    options = {"timestep_spacing": spacing, "steps_offset": offset}
    kinds = [(DDIMScheduler, diffusers.DDIMScheduler, False), (DDPMScheduler, diffusers.DDPMScheduler, False)]
    if spacing != "linspace":
        kinds.append((DDIMInverseScheduler, diffusers.DDIMInverseScheduler, True))
    extra_point = 0
    for ours_cls, ref_cls, inverse in kinds:
        ours, ref = ours_cls(**options), ref_cls(**options)
        for n in range(1, 1001):
            if spacing == "leading" and offset == 1 and n == 1000:
                with pytest.raises(ValueError, match="past the last training step"):
                    ours.set_timesteps(n)
                continue
            ours.set_timesteps(n)
            ref.set_timesteps(n)
            expected = ref.timesteps
            if len(expected) == n + 1:  # the diffusers trailing quirk described above
                assert spacing == "trailing" and int(expected[0 if inverse else -1]) == -1
                expected = expected[1:] if inverse else expected[:-1]
                extra_point += 1
            assert ours.timesteps.dtype == torch.int64
            assert torch.equal(ours.timesteps, expected), (ours_cls.__name__, n)
    assert (extra_point > 0) == (spacing == "trailing")


def test_ddpm_custom_timesteps():
    ours, ref = DDPMScheduler(), _float64(diffusers.DDPMScheduler())
    custom = [900, 700, 420, 100, 7, 0]
    ours.set_timesteps(timesteps=custom)
    ref.set_timesteps(timesteps=custom)
    assert torch.equal(ours.timesteps, ref.timesteps)
    x_ours = x_ref = _start()
    g_ours, g_ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t in ours.timesteps:
        a = ours.step(dummy_model(x_ours, t), t, x_ours, generator=g_ours)
        b = ref.step(dummy_model(x_ref, t), t, x_ref, generator=g_ref)
        errs = max_rel_err(a.prev_sample, b.prev_sample), max_rel_err(a.pred_original_sample, b.pred_original_sample)
        assert max(errs) <= RTOL, (int(t), errs)
        x_ours, x_ref = a.prev_sample, b.prev_sample


# ------------------------------------------------------------------------------------------------
# Step-by-step parity on the option grids


def _compare_step(t, a, b) -> None:
    a_prev, a_x0 = a
    assert a_prev.dtype == torch.float64
    errs = max_rel_err(a_prev, b.prev_sample), max_rel_err(a_x0, b.pred_original_sample)
    assert max(errs) <= RTOL, f"t={int(t)}: prev_sample / pred_original_sample rel. errors {errs}"


@pytest.mark.parametrize("row", DDIM_GRID, ids=lambda r: "-".join(map(str, r)))
def test_ddim_matches_diffusers(row):
    beta, spacing, offset, alpha_one, x0, pred, zero_snr, eta, clipped_eps, n = row
    config = {
        **_beta_options(beta), **_x0_options(x0), "timestep_spacing": spacing, "steps_offset": offset,
        "set_alpha_to_one": alpha_one, "prediction_type": pred, "rescale_betas_zero_snr": zero_snr,
    }
    ours, ref = DDIMScheduler.from_config(config), _float64(diffusers.DDIMScheduler.from_config(config))
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert torch.equal(ours.timesteps, ref.timesteps)
    noise = torch.Generator().manual_seed(1)
    x_ours = x_ref = _start()
    for t in ours.timesteps:
        # The same eta-noise tensor for both (variance_noise); the generator path is tested below.
        z = torch.randn(SHAPE, generator=noise, dtype=torch.float64)
        kw = dict(eta=eta, use_clipped_model_output=clipped_eps, variance_noise=z)
        a = ours.step(dummy_model(x_ours, t), t, x_ours, return_dict=False, **kw)
        b = ref.step(dummy_model(x_ref, t), t, x_ref, **kw)
        _compare_step(t, a, b)
        x_ours, x_ref = a[0], b.prev_sample
    assert torch.isfinite(x_ours).all()


@pytest.mark.parametrize("row", DDPM_GRID, ids=lambda r: "-".join(map(str, r)))
def test_ddpm_matches_diffusers(row):
    beta, spacing, offset, x0, pred, zero_snr, variance, noise_source, n = row
    config = {
        **_beta_options(beta), **_x0_options(x0), "timestep_spacing": spacing, "steps_offset": offset,
        "prediction_type": pred, "rescale_betas_zero_snr": zero_snr, "variance_type": variance,
    }
    ours, ref = DDPMScheduler.from_config(config), _float64(diffusers.DDPMScheduler.from_config(config))
    if variance == "fixed_large_log":
        # diffusers 0.42 returns NaN here (sqrt of log(beta_t) < 0); its intended value is GLIDE's
        # log form of fixed_large, so compare with diffusers' fixed_large.
        ref = _float64(diffusers.DDPMScheduler.from_config({**config, "variance_type": "fixed_large"}))
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert torch.equal(ours.timesteps, ref.timesteps)
    learned = variance.startswith("learned")
    g_ours, g_ref = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    x_ours = x_ref = _start()
    for t in ours.timesteps:
        if noise_source == "generator":  # identically seeded generators, one per library
            kw = {"generator": g_ours}
        else:  # minidiff gets the noise tensor that diffusers' generator is about to draw
            kw = {"variance_noise": torch.randn(SHAPE, generator=g_ours, dtype=torch.float64) if int(t) > 0 else None}
        a = ours.step(dummy_model(x_ours, t, learned), t, x_ours, return_dict=False, **kw)
        b = ref.step(dummy_model(x_ref, t, learned), t, x_ref, generator=g_ref)
        _compare_step(t, a, b)
        x_ours, x_ref = a[0], b.prev_sample
    assert torch.isfinite(x_ours).all()


@pytest.mark.parametrize("row", INVERSE_GRID, ids=lambda r: "-".join(map(str, r)))
def test_ddim_inverse_matches_diffusers(row):
    beta, spacing, offset, alpha_one, clip, pred, zero_snr, n = row
    config = {
        **_beta_options(beta), "timestep_spacing": spacing, "steps_offset": offset, "set_alpha_to_one": alpha_one,
        "clip_sample": clip, "clip_sample_range": 0.8, "prediction_type": pred, "rescale_betas_zero_snr": zero_snr,
    }
    ours, ref = DDIMInverseScheduler.from_config(config), _float64(diffusers.DDIMInverseScheduler.from_config(config))
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert torch.equal(ours.timesteps, ref.timesteps)
    x_ours = x_ref = _start().clamp(-1, 1)  # an "image"
    for t in ours.timesteps:
        a = ours.step(dummy_model(x_ours, t), t, x_ours, return_dict=False)
        b = ref.step(dummy_model(x_ref, t), t, x_ref)
        _compare_step(t, a, b)
        x_ours, x_ref = a[0], b.prev_sample
    assert torch.isfinite(x_ours).all()


def test_ddim_inverse_deprecated_set_alpha_to_zero():
    with pytest.warns(FutureWarning, match="set_alpha_to_zero"):
        ours = DDIMInverseScheduler(set_alpha_to_zero=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.DDIMInverseScheduler(set_alpha_to_zero=False)
    assert ours.config.set_alpha_to_one is False and "set_alpha_to_zero" not in ours.config
    assert torch.equal(ours.initial_alpha_cumprod, ref.initial_alpha_cumprod)


def test_eta_noise_from_generators():
    """DDIM with eta > 0 and DDPM draw their noise like diffusers' randn_tensor: the same seeded
    generator gives the same samples (also a list of generators, one per batch entry)."""
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False}
    for ours, ref, kw in [
        (DDIMScheduler(**config), diffusers.DDIMScheduler(**config), {"eta": 0.7}),
        (DDPMScheduler(**config), diffusers.DDPMScheduler(**config), {}),
    ]:
        _float64(ref)
        ours.set_timesteps(20)
        ref.set_timesteps(20)
        x = torch.randn(2, *SHAPE[1:], dtype=torch.float64)
        for gens in ([torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)], torch.Generator().manual_seed(3)):
            clone = lambda g: [torch.Generator().manual_seed(s) for s in (3, 4)] if isinstance(g, list) else torch.Generator().manual_seed(3)
            a = ours.step(dummy_model(x, 500), ours.timesteps[5], x, generator=gens, **kw)
            b = ref.step(dummy_model(x, 500), ref.timesteps[5], x, generator=clone(gens), **kw)
            assert max_rel_err(a.prev_sample, b.prev_sample) <= RTOL
            c = ours.step(dummy_model(x, 500), ours.timesteps[5], x, generator=clone(gens), **kw)
            assert torch.equal(a.prev_sample, c.prev_sample)  # reproducible
        # eta noise really matters: a different seed gives a different sample
        d = ours.step(dummy_model(x, 500), ours.timesteps[5], x, generator=torch.Generator().manual_seed(9), **kw)
        assert max_rel_err(d.prev_sample, a.prev_sample) > 1e-3


def test_float32_parity_with_stock_diffusers():
    """No float64 cast of diffusers' tables: SD 1.5's DDIM config, 50 steps, float32 samples.
    diffusers computes the per-step coefficients in float32 and minidiff in float64 before
    multiplying float32 tensors; the two differ by a few float32 ulps per step (2e-6 over 50
    steps is ~20 ulps of 1.2e-7)."""
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
              "set_alpha_to_one": False, "steps_offset": 1}
    ours, ref = DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
    ours.set_timesteps(50)
    ref.set_timesteps(50)
    x_ours = x_ref = _start().float()
    for t in ours.timesteps:
        x_ours = ours.step(dummy_model(x_ours, t), t, x_ours).prev_sample
        x_ref = ref.step(dummy_model(x_ref, t), t, x_ref).prev_sample
    assert x_ours.dtype == torch.float32
    err = max_rel_err(x_ours, x_ref)
    assert err <= 2e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_add_noise_and_velocity(dtype, zero_snr):
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": zero_snr}
    ours, ref = DDPMScheduler(**config), diffusers.DDPMScheduler(**config)
    x0 = torch.randn(4, 4, 8, 8, dtype=dtype)
    eps = torch.randn(4, 4, 8, 8, dtype=dtype)
    t = torch.tensor([0, 17, 500, 999])  # one timestep per batch entry
    noisy, v = ours.add_noise(x0, eps, t), ours.get_velocity(x0, eps, t)
    assert noisy.dtype == v.dtype == dtype
    # Same float ops as diffusers: exact in float64, within rounding in float32.
    tol = 1e-15 if dtype == torch.float64 else 1e-6
    errs = max_rel_err(noisy, ref.add_noise(x0, eps, t)), max_rel_err(v, ref.get_velocity(x0, eps, t))
    assert max(errs) <= tol
    # The definitions, independently: x_t = sqrt(ab) x0 + sqrt(1-ab) eps; v = sqrt(ab) eps - sqrt(1-ab) x0;
    # and v-prediction's x0 = sqrt(ab) x_t - sqrt(1-ab) v recovers x0.
    ab = ours.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    assert max_rel_err(noisy, ab.sqrt() * x0 + (1 - ab).sqrt() * eps) <= 10 * tol
    assert max_rel_err(ab.sqrt() * noisy - (1 - ab).sqrt() * v, x0.double()) <= 10 * tol
    # Same timestep for the whole batch, as a plain int tensor.
    assert torch.equal(ours.add_noise(x0, eps, torch.tensor(17)), ref.add_noise(x0, eps, torch.tensor(17)))


def test_api_details():
    s = DDIMScheduler()
    assert s.init_noise_sigma == 1.0 and s.order == 1 and len(s) == 1000 and s.config.num_train_timesteps == 1000
    x = torch.randn(SHAPE)
    assert s.scale_model_input(x, 10) is x
    s.set_timesteps(10)
    out = s.step(dummy_model(x, 900), s.timesteps[0], x)
    prev, x0 = s.step(dummy_model(x, 900), s.timesteps[0], x, return_dict=False)
    assert torch.equal(out.prev_sample, prev) and torch.equal(out.pred_original_sample, x0)
    # DDPM's learned variance needs a model output with 2x the channels
    d = DDPMScheduler(variance_type="learned_range")
    d.set_timesteps(10)
    with pytest.raises(ValueError, match="2 x 4 channels"):
        d.step(torch.randn(SHAPE), d.timesteps[0], x)


# ------------------------------------------------------------------------------------------------
# DDIM inversion round trip


X0_TRUE = _start(11).clamp(-1, 1)  # the "image" that is inverted


def _round_trip(eps_model, n: int, spacing: str = "leading", alpha_one: bool = True) -> float:
    """Invert the image X0_TRUE with DDIMInverseScheduler over n steps, then run DDIM (eta = 0)
    back over the same n noise levels; return max |x_back - x_start| / max |x_start|."""
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
              "set_alpha_to_one": alpha_one, "timestep_spacing": spacing}
    inverse, forward = DDIMInverseScheduler(**config), DDIMScheduler(**config)
    inverse.set_timesteps(n)
    forward.set_timesteps(n)
    assert torch.equal(inverse.timesteps.flip(0), forward.timesteps)
    x_start = x = X0_TRUE
    for t in inverse.timesteps:
        x = inverse.step(eps_model(x, t, inverse), t, x).prev_sample
    for t in forward.timesteps:
        x = forward.step(eps_model(x, t, forward), t, x).prev_sample
    return max_rel_err(x, x_start)


def oracle_eps(x, t, scheduler):
    """The ideal denoiser for a data set holding the single image X0_TRUE:
    eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t)."""
    ab = float(scheduler.alphas_cumprod[int(t)])
    return (x - ab**0.5 * X0_TRUE) / (1 - ab) ** 0.5


def smooth_eps(x, t, scheduler):
    """A non-trivial denoiser: the oracle pulled towards a nonlinear function of x_t, so eps changes
    along the path and the inverse step's eps(x_t) differs from the eps(x_{t_next}) DDIM uses."""
    return 0.5 * oracle_eps(x, t, scheduler) + 0.5 * dummy_model(x, t)


def test_ddim_inversion_round_trip():
    """DDIM-inverse over n steps, then DDIM (eta = 0) back over the same n noise levels.

    What the DDIM paper predicts (sec. 4.3): DDIM with eta = 0 is an Euler discretisation of an
    ODE, and inversion is exact only in the ODE limit. The DDIM step x_t -> x_{t-1} uses eps at
    x_t; the inverse step x_{t-1} -> x_t has only x_{t-1} and uses eps there instead. That
    mismatch is O(step size) in eps and O(step size^2) in x per step, so over n steps the
    round-trip error is O(1/n): it shrinks as the number of steps grows.

    Measured here (float64, SD's scaled_linear schedule, leading spacing, x0 an image in [-1, 1]):
    * oracle denoiser (eps consistent with the one image x0): exact, <= 1e-15 for n = 1..1000.
      Every DDIM step then predicts x0 exactly, and the last one (to alpha_bar = 1,
      set_alpha_to_one) returns it, whatever the inversion did.
    * smooth denoiser, set_alpha_to_one=False (start and end at alpha_bar_0, as SD 1.5 does):
      n = 10: 7.7e-2, 50: 2.4e-2, 250: 7.2e-3, 500: 4.1e-3, 1000: 2.2e-3 (ROUND_TRIP_MEASURED):
      from a few hundred steps on, doubling n halves the error, the O(1/n) of an Euler method.
    * smooth denoiser, set_alpha_to_one=True: 4.4e-2 (n = 10) down to 7.8e-3 (n = 1000), then
      levelling off: the extra step between alpha_bar = 1 and alpha_bar_0 has the same size for
      every n, so its error never shrinks.
    """
    for n in (1, 10, 50, 1000):
        err = _round_trip(oracle_eps, n, alpha_one=True)
        assert err <= 1e-12, (n, err)

    errors = {n: _round_trip(smooth_eps, n, alpha_one=False) for n in ROUND_TRIP_MEASURED}
    for n, err in errors.items():
        # within 10% of the measured value: the round trip is deterministic float64 arithmetic
        assert abs(err / ROUND_TRIP_MEASURED[n] - 1) < 0.1, (n, err)
    steps = sorted(errors)
    assert all(errors[a] > errors[b] for a, b in zip(steps, steps[1:])), errors  # strictly shrinking
    assert 1.6 < errors[500] / errors[1000] < 2.2, errors  # O(1/n): twice the steps, half the error

    with_final_step = {n: _round_trip(smooth_eps, n, alpha_one=True) for n in (10, 250, 1000)}
    assert with_final_step[10] > with_final_step[250] > with_final_step[1000] > 5e-3, with_final_step


# n -> round-trip error of `smooth_eps` with set_alpha_to_one=False, as measured (see above).
ROUND_TRIP_MEASURED = {10: 7.704e-2, 50: 2.369e-2, 250: 7.210e-3, 500: 4.063e-3, 1000: 2.195e-3}


# ------------------------------------------------------------------------------------------------
# Configs, files and errors

SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}


def test_from_pretrained_sd15_pndm_config(tmp_path):
    folder = tmp_path / "scheduler"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG))
    for cls, ref_cls in [(DDIMScheduler, diffusers.DDIMScheduler), (DDPMScheduler, diffusers.DDPMScheduler),
                         (DDIMInverseScheduler, diffusers.DDIMInverseScheduler)]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = cls.from_pretrained(tmp_path, subfolder="scheduler")
        # One warning, about the PNDM-only key; `_class_name`/`_diffusers_version` are silent, and
        # DDIM's `set_alpha_to_one` given to DDPM is a known scheduler option, silent too.
        assert len(caught) == 1, [str(w.message) for w in caught]
        assert "skip_prk_steps" in str(caught[0].message) and "_class_name" not in str(caught[0].message)
        assert ours.config.steps_offset == 1 and ours.config["clip_sample"] is False
        ref = ref_cls.from_pretrained(tmp_path, subfolder="scheduler")
        assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
        ours.set_timesteps(50)
        ref.set_timesteps(50)
        assert torch.equal(ours.timesteps, ref.timesteps)
    with pytest.warns(UserWarning, match="skip_prk_steps"):  # the folder itself, no subfolder
        sd = DDIMScheduler.from_pretrained(tmp_path / "scheduler")
    sd.set_timesteps(50)
    assert sd.timesteps[0] == 981 and sd.timesteps[-1] == 1  # SD 1.5: leading spacing + steps_offset 1


def test_config_object_and_round_trips(tmp_path):
    s = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")
    assert isinstance(s.config, SchedulerConfig) and isinstance(s.config, dict)
    assert s.config.beta_end == s.config["beta_end"] == 0.012
    with pytest.raises(TypeError, match="read-only"):
        s.config["beta_end"] = 0.02
    with pytest.raises(TypeError, match="read-only"):
        s.config.beta_end = 0.02
    with pytest.raises(AttributeError, match="no option"):
        s.config.skip_prk_steps
    import copy
    import pickle
    assert copy.deepcopy(s.config) == s.config and pickle.loads(pickle.dumps(s.config)) == s.config

    # from another scheduler's config, with overrides; and into diffusers and back
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DDIM-only keys (thresholding, ...) are dropped silently
        inv = DDIMInverseScheduler.from_config(s.config)
    assert inv.config.timestep_spacing == "trailing" and "thresholding" not in inv.config
    assert DDIMScheduler.from_config(s.config, prediction_type="v_prediction").config.prediction_type == "v_prediction"
    ref = diffusers.DDIMScheduler.from_config(s.config)
    assert torch.equal(ref.alphas_cumprod, s.alphas_cumprod)
    back = DDIMScheduler.from_config(ref.config)
    assert dict(back.config) == dict(s.config)

    # save_pretrained writes a scheduler_config.json both libraries read
    s.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert written["_class_name"] == "DDIMScheduler" and written["timestep_spacing"] == "trailing"
    assert dict(DDIMScheduler.from_pretrained(tmp_path).config) == dict(s.config)
    assert diffusers.DDIMScheduler.from_pretrained(tmp_path).config.timestep_spacing == "trailing"
    # trained betas (a tensor) are written as a list and read back exactly
    t = DDPMScheduler(trained_betas=torch.tensor(TRAINED_BETAS))
    t.save_pretrained(tmp_path / "t")
    assert torch.equal(DDPMScheduler.from_pretrained(tmp_path / "t").betas, t.betas)
    assert torch.equal(diffusers.DDPMScheduler.from_pretrained(tmp_path / "t").betas, t.betas)


def test_bad_input_errors(tmp_path):
    s = DDIMScheduler()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="before set_timesteps"):
        s.step(x, 999, x)
    with pytest.raises(ValueError, match="before set_timesteps"):
        DDPMScheduler().step(x, 999, x)
    with pytest.raises(ValueError, match="before set_timesteps"):
        DDIMInverseScheduler().step(x, 0, x)
    for n in (0, -3, 1001):
        with pytest.raises(ValueError, match=r"between 1 and num_train_timesteps \(1000\)"):
            s.set_timesteps(n)
    with pytest.raises(ValueError, match="whole number"):
        s.set_timesteps(2.5)
    with pytest.raises(ValueError, match=r"'linear', 'scaled_linear', 'squaredcos_cap_v2'"):
        DDIMScheduler(beta_schedule="cosine")
    with pytest.raises(ValueError, match=r"'epsilon', 'v_prediction', 'sample'"):
        DDIMScheduler(prediction_type="eps")
    with pytest.raises(ValueError, match=r"'leading', 'trailing', 'linspace'"):
        DDPMScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match=r"'leading', 'trailing'\]"):  # no linspace for the inverse
        DDIMInverseScheduler(timestep_spacing="linspace")
    with pytest.raises(ValueError, match="fixed_small.*learned_range"):
        DDPMScheduler(variance_type="small")
    with pytest.raises(ValueError, match="trained_betas has 3 entries"):
        DDPMScheduler(trained_betas=[0.1, 0.2, 0.3])
    d = DDPMScheduler()
    with pytest.raises(ValueError, match="exactly one"):
        d.set_timesteps(10, timesteps=[5, 1])
    with pytest.raises(ValueError, match="descending"):
        d.set_timesteps(timesteps=[1, 5])
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        d.set_timesteps(timesteps=[1000, 5])
    d.set_timesteps(10)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        d.step(x, 123, x)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="either `generator` or `variance_noise`"):
        s.step(x, s.timesteps[0], x, eta=1.0, generator=torch.Generator(), variance_noise=x)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        s.step(x, s.timesteps[0], x, eta=-1.0)
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        DDIMScheduler.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no subfolder 'scheduler'"):
        DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    with pytest.raises(TypeError):  # a misspelt override is not silently dropped
        DDIMScheduler.from_config({}, prediction_tpye="epsilon")


def test_make_betas_matches_schedulers():
    # the library function the notebook plots is the one the schedulers use
    assert torch.equal(make_betas(1000, 0.00085, 0.012, "scaled_linear"), DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").betas)


@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_kandinsky_decoder_scheduler_config(variance):
    """kandinsky-2-2-decoder's scheduler_config.json (DDPM, linear 0.00085..0.012, leading,
    steps_offset 1, no clipping; the DDIM key set_alpha_to_one is read and ignored by DDPM as in
    diffusers), read from the shipped file by both libraries: the decoder pipeline's 100 steps,
    and its DDIM alternative, in float64 to RTOL, with the learned-range variance the pipeline
    can hand it too."""
    from minidiff.data import config_folder

    folder = config_folder("kandinsky-2-2-decoder")
    ours = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    ref = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    if variance != "fixed_small":
        ours = DDPMScheduler.from_config({**dict(ours.config), "variance_type": variance})
        # Without the private keys: diffusers' `_use_default_values` would reset variance_type.
        public = {k: v for k, v in ref.config.items() if not k.startswith("_")}
        ref = diffusers.DDPMScheduler.from_config({**public, "variance_type": variance})
    _float64(ref)
    ours.set_timesteps(100)
    ref.set_timesteps(100)
    assert torch.equal(ours.timesteps, ref.timesteps) and int(ours.timesteps[0]) == 991
    g_ours, g_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x_ours = x_ref = _start()
    learned = variance.startswith("learned")
    for t in ours.timesteps:
        a = ours.step(dummy_model(x_ours, t, learned), t, x_ours, generator=g_ours, return_dict=False)
        b = ref.step(dummy_model(x_ref, t, learned), t, x_ref, generator=g_ref)
        _compare_step(t, a, b)
        x_ours, x_ref = a[0], b.prev_sample
    ddim, ddim_ref = DDIMScheduler.from_pretrained(folder, subfolder="scheduler"), _float64(
        diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler"))
    ddim.set_timesteps(50)
    ddim_ref.set_timesteps(50)
    x_ours = x_ref = _start(1)
    for t in ddim.timesteps:
        a = ddim.step(dummy_model(x_ours, t), t, x_ours, return_dict=False)
        b = ddim_ref.step(dummy_model(x_ref, t), t, x_ref)
        _compare_step(t, a, b)
        x_ours, x_ref = a[0], b.prev_sample
