"""Parity of minidiff's UnCLIPScheduler (the Kandinsky 2.2 prior's sampler) with diffusers'.

How the comparison works, as in test_schedulers.py: both libraries build the scheduler from the
same options, set the same grid, and run the whole sampling loop on a deterministic fake model
(`fake_model`, a smooth function of (x_t, t)), each on its own trajectory, in float64, with
identically seeded generators (so both draw the same noise) and each step told the next grid
timestep, as the prior pipeline does (None after the last). diffusers' float32 tables are cast to
float64 (`_float64`) so that it, too, does its step arithmetic in float64.

Why RTOL = 1e-12: the float32 tables are bit-identical (test_tables_are_identical), so what is left
is the order of float64 operations. Measured over the 25-step loops: at most 3.4e-15 relative
(max |a - b| / max |b|), 3e-11 absolute where unclipped epsilon estimates grow to 4e4. A real
difference is far larger: test_controls_are_far_outside_the_tolerance measures a different seed,
a swapped variance type, a missing clip and prev_timestep=None at >= 1e-3.
"""

from __future__ import annotations

import json
import warnings

import diffusers
import pytest
import torch

import minidiff
import minidiff.data
from minidiff.errors import InputError
from minidiff.schedulers import UnCLIPScheduler

RTOL = 1e-12
SHAPES = {"prior": (2, 16), "image": (1, 3, 4, 4)}  # (B, D) embeddings as in the prior; (B, C, H, W)
KANDINSKY = minidiff.data.config_folder("kandinsky-2-2-prior")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tensors of 32-48 elements: extra threads only add wake-ups while other jobs use the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fake_model(x: torch.Tensor, t, learned_range: bool = False) -> torch.Tensor:
    """A stand-in for the prior: smooth in x and t, of order one like eps or x_0 (so that clipping
    to 0.5 really clips). For learned_range it appends v = tanh(2 x + t / T) in (-1, 1) along dim 1."""
    s = float(t) / 1000
    out = (0.8 - 0.3 * s) * 2 * x / (1 + x * x) + 0.2 / (1 + (x - s) ** 2)
    if learned_range:
        out = torch.cat([out, torch.tanh(2 * x + s)], dim=1)  # (B, 2C, ...)
    return out


def _float64(ref):
    """diffusers' tables as float64: the same float32 numbers, float64 arithmetic."""
    for name in ("betas", "alphas", "alphas_cumprod", "one"):
        setattr(ref, name, getattr(ref, name).double())
    return ref


def _start(shape, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


def _loop(scheduler, n: int, shape, seed: int = 3, pass_prev: bool = True, dtype=torch.float64):
    """The prior pipeline's loop; returns [(prev_sample, pred_original_sample)] per step."""
    scheduler.set_timesteps(n)
    learned = scheduler.config.variance_type == "learned_range"
    generator, x, steps = torch.Generator().manual_seed(seed), _start(shape, dtype), []
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        prev_t = timesteps[i + 1] if pass_prev and i + 1 < len(timesteps) else None
        out = scheduler.step(fake_model(x, t, learned), t, x, prev_timestep=prev_t, generator=generator)
        steps.append((out.prev_sample, out.pred_original_sample))
        x = out.prev_sample
    return steps


def _max_err(ours, ref) -> float:
    """max over steps and outputs of max |a - b| / max |b|."""
    return max(((a - b).abs().max() / b.abs().max()).item() for sa, sb in zip(ours, ref) for a, b in zip(sa, sb))


def _assert_steps_close(ours, ref) -> None:
    assert len(ours) == len(ref)
    for i, (sa, sb) in enumerate(zip(ours, ref)):
        for what, a, b in zip(("prev_sample", "pred_original_sample"), sa, sb):
            assert a.dtype == b.dtype and a.shape == b.shape
            # relative to the tensor's scale, so that entries near 0 are not held to 1e-12 of themselves
            torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * b.abs().max().item(), msg=f"step {i}, {what}")


# ------------------------------------------------------------------------------------------------
# Tables and timesteps


def test_tables_are_identical():
    ours, ref = UnCLIPScheduler(), diffusers.UnCLIPScheduler()
    assert ours.betas.dtype == torch.float32
    for name in ("betas", "alphas", "alphas_cumprod", "timesteps"):  # timesteps: 999 ... 0 before set_timesteps
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name


def test_timesteps_match_diffusers_for_every_step_count():
    for T in (1000, 50):
        ours, ref = UnCLIPScheduler(num_train_timesteps=T), diffusers.UnCLIPScheduler(num_train_timesteps=T)
        for n in range(2, T + 1):
            ours.set_timesteps(n)
            ref.set_timesteps(n)
            assert ours.timesteps.dtype == torch.int64 and ours.num_inference_steps == n
            assert torch.equal(ours.timesteps, ref.timesteps), (T, n)
            assert ours.timesteps[0] == T - 1 and ours.timesteps[-1] == 0
    ours = UnCLIPScheduler()
    ours.set_timesteps(25)  # the prior pipeline's default: 999 / 24 = 41.625 apart, rounded
    assert ours.timesteps[:4].tolist() == [999, 957, 916, 874] and ours.timesteps[-2:].tolist() == [42, 0]
    ours.set_timesteps(3)  # 499.5 rounds half to even, as numpy does in diffusers
    assert ours.timesteps.tolist() == [999, 500, 0]


# ------------------------------------------------------------------------------------------------
# Step-by-step parity


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
@pytest.mark.parametrize("variance", ["fixed_small_log", "learned_range"])
def test_step_matches_diffusers(variance, prediction, clip, shape):
    config = {"variance_type": variance, "prediction_type": prediction, "clip_sample": clip, "clip_sample_range": 0.5}
    ours = _loop(UnCLIPScheduler.from_config(config), 25, SHAPES[shape])
    ref = _loop(_float64(diffusers.UnCLIPScheduler.from_config(config)), 25, SHAPES[shape])
    _assert_steps_close(ours, ref)
    # The comparison means something: the x_0 estimates cross the clip range (and are clipped to it).
    x0_max = max(x0.abs().max().item() for _, x0 in ours)
    assert x0_max == 0.5 if clip else x0_max > 0.5
    assert all(torch.isfinite(x).all() for x, _ in ours)


def test_prev_timestep_none_means_t_minus_1():
    """Without prev_timestep each step is one training step t -> t - 1 (the tables' own betas[t] and
    alphas[t], not 1 - alpha_bar_t / alpha_bar_{t-1}): the full 1000-step loop, and single steps."""
    config = {"variance_type": "learned_range", "prediction_type": "epsilon", "clip_sample": True}
    ours = _loop(UnCLIPScheduler(**config), 1000, SHAPES["image"], pass_prev=False)
    ref = _loop(_float64(diffusers.UnCLIPScheduler(**config)), 1000, SHAPES["image"], pass_prev=False)
    _assert_steps_close(ours, ref)
    # on a coarse grid too, where it is not the next grid timestep
    ours_s, ref_s = UnCLIPScheduler(**config), _float64(diffusers.UnCLIPScheduler(**config))
    ours_s.set_timesteps(25)
    ref_s.set_timesteps(25)
    x = _start(SHAPES["image"])
    for t in (957, 500, 1, 0):
        a = ours_s.step(fake_model(x, t, True), t, x, generator=torch.Generator().manual_seed(t))
        b = ref_s.step(fake_model(x, t, True), t, x, generator=torch.Generator().manual_seed(t))
        _assert_steps_close([(a.prev_sample, a.pred_original_sample)], [(b.prev_sample, b.pred_original_sample)])


def test_float32_samples():
    """The official Kandinsky 2.2 config on float32 embeddings of the prior's size (2, 1280).

    minidiff computes the per-step coefficients in float64 and multiplies float32 tensors by them;
    so does diffusers once its tables are float64 (a float64 0-dim tensor times a float32 tensor
    stays float32): measured identical, 0.0. Stock diffusers computes the coefficients in float32,
    where they cancel: alpha = 1 - beta at t = 999 (beta = 1 - 5.7e-7) is 5e-2 off, beta =
    1 - alpha_bar_42 / alpha_bar_0 is 2e-6 off. Measured against stock diffusers: 4.7e-5 to 1.2e-4
    over seeds 0-4; against float64 tables: 0.0 for the same seeds."""
    load = lambda cls: cls.from_pretrained(KANDINSKY, subfolder="scheduler")  # noqa: E731
    ours = _loop(load(UnCLIPScheduler), 25, (2, 1280), dtype=torch.float32)
    wide = _loop(_float64(load(diffusers.UnCLIPScheduler)), 25, (2, 1280), dtype=torch.float32)
    stock = _loop(load(diffusers.UnCLIPScheduler), 25, (2, 1280), dtype=torch.float32)
    assert ours[-1][0].dtype == torch.float32
    assert _max_err(ours, wide) <= 1e-6  # a few float32 ulps of room for other platforms' pow / exp
    assert 1e-6 < _max_err(ours, stock) <= 3e-4


def test_controls_are_far_outside_the_tolerance():
    """Negative controls for the parity tests: each of these changes gives errors >= 1e-3, so a
    scheduler that got one of them wrong could not pass at 1e-12."""
    base = {"variance_type": "fixed_small_log", "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.5}
    shape = SHAPES["prior"]
    ref = _loop(_float64(diffusers.UnCLIPScheduler(**base)), 25, shape)
    controls = {
        "another seed": _loop(UnCLIPScheduler(**base), 25, shape, seed=4),
        "learned_range": _loop(UnCLIPScheduler(**{**base, "variance_type": "learned_range"}), 25, shape),
        "no clip": _loop(UnCLIPScheduler(**{**base, "clip_sample": False}), 25, shape),
        "prev_timestep=None": _loop(UnCLIPScheduler(**base), 25, shape, pass_prev=False),
    }
    errors = {name: _max_err(steps, ref) for name, steps in controls.items()}
    assert min(errors.values()) >= 1e-3, errors


# ------------------------------------------------------------------------------------------------
# API, files and errors


def test_api_details():
    s = UnCLIPScheduler()
    assert s.init_noise_sigma == 1.0 and s.order == 1 and len(s) == 1000
    assert minidiff.UnCLIPScheduler is UnCLIPScheduler  # the public, lazily imported name
    x = _start(SHAPES["prior"])
    assert s.scale_model_input(x, 999) is x
    s.set_timesteps(25)
    out = s.step(fake_model(x, 999), 999, x, prev_timestep=957, generator=torch.Generator().manual_seed(1))
    prev, x0 = s.step(fake_model(x, 999), 999, x, prev_timestep=957, generator=torch.Generator().manual_seed(1), return_dict=False)
    assert torch.equal(out.prev_sample, prev) and torch.equal(out.pred_original_sample, x0)
    # at t = 0 no noise is drawn: the generator is left untouched and the step is deterministic
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    s.step(fake_model(x, 0), 0, x, generator=g)
    assert torch.equal(g.get_state(), state)
    # one generator per batch entry, drawn as diffusers' randn_tensor draws them
    ref = _float64(diffusers.UnCLIPScheduler())
    gens = lambda: [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]  # noqa: E731
    a = s.step(fake_model(x, 500), 500, x, prev_timestep=458, generator=gens()).prev_sample
    b = ref.step(fake_model(x, 500), 500, x, prev_timestep=458, generator=gens()).prev_sample
    torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL)
    # add_noise: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, the same float ops as diffusers
    eps, t = _start(SHAPES["prior"]).flip(0), torch.tensor([3, 700])
    assert torch.equal(s.add_noise(x, eps, t), diffusers.UnCLIPScheduler().add_noise(x, eps, t))


def test_official_config_loads_and_round_trips(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # `_class_name` / `_diffusers_version` are dropped silently
        ours = UnCLIPScheduler.from_pretrained(KANDINSKY, subfolder="scheduler")
    ref = diffusers.UnCLIPScheduler.from_pretrained(KANDINSKY, subfolder="scheduler")
    expected = {"num_train_timesteps": 1000, "variance_type": "fixed_small_log", "clip_sample": True,
                "clip_sample_range": 10.0, "prediction_type": "sample", "beta_schedule": "squaredcos_cap_v2"}
    assert dict(ours.config) == expected == {k: ref.config[k] for k in expected}
    assert ours.config.clip_sample_range == 10.0 and ours.variance_type == "fixed_small_log"

    ours.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert written["_class_name"] == "UnCLIPScheduler"
    assert dict(UnCLIPScheduler.from_pretrained(tmp_path / "ours").config) == expected
    back = diffusers.UnCLIPScheduler.from_pretrained(tmp_path / "ours")
    assert {k: back.config[k] for k in expected} == expected
    ref.save_pretrained(tmp_path / "ref")  # and what diffusers writes loads here
    assert dict(UnCLIPScheduler.from_pretrained(tmp_path / "ref").config) == expected
    assert UnCLIPScheduler.from_config(ours.config, prediction_type="epsilon").config.prediction_type == "epsilon"


def _one_sentence(message: str) -> bool:
    return message.endswith(".") and ". " not in message[:-1]


def test_refusals_explain_themselves():
    s = UnCLIPScheduler()
    with pytest.raises(ZeroDivisionError):  # why n = 1 is refused: diffusers divides by n - 1
        diffusers.UnCLIPScheduler().set_timesteps(1)
    for n in (1, 0, -2, 1001, 2.5, True):
        with pytest.raises(InputError, match=r"between 2 and num_train_timesteps \(1000\)") as caught:
            s.set_timesteps(n)
        assert _one_sentence(str(caught.value)), str(caught.value)
    with pytest.raises(InputError, match="only beta_schedule 'squaredcos_cap_v2'.*got 'linear'") as caught:
        UnCLIPScheduler(beta_schedule="linear")
    assert _one_sentence(str(caught.value))
    with pytest.raises(ValueError):  # diffusers refuses it too
        diffusers.UnCLIPScheduler(beta_schedule="linear")
    with pytest.raises(InputError, match=r"\['epsilon', 'sample'\]; got 'v_prediction'"):
        UnCLIPScheduler(prediction_type="v_prediction")
    with pytest.raises(InputError, match=r"\['fixed_small_log', 'learned_range'\]; got 'fixed_small'"):
        UnCLIPScheduler(variance_type="fixed_small")

    x = _start(SHAPES["image"])
    learned = UnCLIPScheduler(variance_type="learned_range")
    with pytest.raises(InputError, match="2 x 3 channels"):
        learned.step(fake_model(x, 999), 999, x, prev_timestep=957)
    with pytest.raises(InputError, match=r"shape \(1, 6, 4, 4\) but the sample has shape \(1, 3, 4, 4\)"):
        s.step(fake_model(x, 999, True), 999, x, prev_timestep=957)
    for t, prev_t in ((999, 999), (500, 600), (1000, 957), (5, -2)):
        with pytest.raises(InputError, match="-1 <= prev_timestep < timestep"):
            s.step(fake_model(x, t), t, x, prev_timestep=prev_t)
