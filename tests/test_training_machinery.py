"""The training machinery the prior (and decoder) trainers share: Min-SNR weights, checkpoints,
captioned-image lists."""

from __future__ import annotations

import json

import pytest
import torch

from minidiff.errors import InputError
from minidiff.schedulers.ddpm import DDPMScheduler
from minidiff.training.captioned_images import read_captioned_images
from minidiff.training.checkpoints import (
    checkpoint_steps,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from minidiff.training.min_snr import min_snr_weights, snr

# ----------------------------------------------------------------------------------------------
# Min-SNR


@pytest.fixture(scope="module")
def schedule():
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample")


def _diffusers_script_weights(noise_scheduler, timesteps, gamma, prediction_type):
    """What diffusers' train_text_to_image_prior.py computes, with its own compute_snr."""
    from diffusers.training_utils import compute_snr

    s = compute_snr(noise_scheduler, timesteps)
    w = torch.stack([s, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        w = w / s
    elif prediction_type == "v_prediction":
        w = w / (s + 1)
    return w


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_min_snr_weights_equal_the_formula_and_diffusers_script(schedule, prediction_type):
    from diffusers import DDPMScheduler as RefDDPM

    t = torch.arange(0, 1000, 7)
    abar = schedule.alphas_cumprod.double()[t]
    s = abar / (1 - abar)
    direct = {"sample": s.clamp(max=5.0), "epsilon": s.clamp(max=5.0) / s,
              "v_prediction": s.clamp(max=5.0) / (s + 1)}[prediction_type]
    ours = min_snr_weights(schedule.alphas_cumprod, t, 5.0, prediction_type)
    torch.testing.assert_close(ours.double(), direct, rtol=1e-5, atol=1e-8)
    ref = RefDDPM(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    torch.testing.assert_close(ours, _diffusers_script_weights(ref, t, 5.0, prediction_type), rtol=1e-5, atol=1e-8)


def test_min_snr_facts_for_the_prior(schedule):
    """Sample prediction, gamma 5: full weight 5 on the easy steps, almost none where sampling starts."""
    t = torch.tensor([0, 100, 260, 900, 999])
    w = min_snr_weights(schedule.alphas_cumprod, t, 5.0, "sample")
    assert w[:3].tolist() == [5.0, 5.0, 5.0]
    assert w[3] < 0.03 and w[4] < 1e-6
    assert torch.equal(min_snr_weights(schedule.alphas_cumprod, t, None, "sample"), torch.ones(5))
    assert snr(schedule.alphas_cumprod, torch.tensor([999]))[0] < 1e-8
    with pytest.raises(InputError, match="prediction_type"):
        min_snr_weights(schedule.alphas_cumprod, t, 5.0, "x0")


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _state(step):
    return {"step": step, "w": torch.full((3,), float(step)), "g": torch.Generator().manual_seed(step).get_state()}


def test_checkpoints_round_trip_and_total_limit(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, _state(step), total_limit=2)
    assert list(checkpoint_steps(tmp_path)) == [3, 4]
    folder = resolve_checkpoint(tmp_path, "latest")
    assert folder.name == "checkpoint-4"
    state = load_checkpoint(folder)
    assert state["step"] == 4 and torch.equal(state["w"], torch.full((3,), 4.0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_corrupt_or_partial_checkpoint_is_refused_and_names_the_good_one(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1))
    save_checkpoint(tmp_path, 2, _state(2))
    state = tmp_path / "checkpoint-2" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    state.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"SHA-256.*checkpoint-1"):
        resolve_checkpoint(tmp_path, "latest")
    (tmp_path / "checkpoint-3").mkdir()  # a folder without complete.json: a save that never finished
    with pytest.raises(InputError, match="not finished"):
        resolve_checkpoint(tmp_path, "latest")
    assert resolve_checkpoint(tmp_path, "checkpoint-1").name == "checkpoint-1"
    with pytest.raises(InputError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path, "checkpoint-9")


def test_a_failed_save_keeps_the_last_good_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1), total_limit=1)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 2, {"bad": Unpicklable()}, total_limit=1)
    assert list(checkpoint_steps(tmp_path)) == [1]
    assert load_checkpoint(resolve_checkpoint(tmp_path, "latest"))["step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------
# Captioned images


def _png(path):
    import PIL.Image

    PIL.Image.new("RGB", (8, 8), (255, 0, 0)).save(path)


def test_imagefolder_jsonl_and_csv_layouts(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "a red square"}) + "\n" + json.dumps({"file_name": "b.png", "text": "b"}) + "\n")
    pairs = read_captioned_images(tmp_path)
    assert [p.caption for p in pairs] == ["a red square", "b"] and pairs[0].load().size == (8, 8)
    (tmp_path / "list.csv").write_text("path,caption\na.png,one\nb.png,two\n")
    pairs = read_captioned_images(tmp_path / "list.csv", image_column="path", caption_column="caption")
    assert [p.caption for p in pairs] == ["one", "two"]
    (tmp_path / "list.jsonl").write_text(json.dumps({"image": "b.png", "text": "x"}) + "\n")
    assert read_captioned_images(tmp_path / "list.jsonl")[0].image.name == "b.png"


def test_captioned_image_lists_refuse_bad_input_with_one_sentence(tmp_path):
    with pytest.raises(InputError, match="metadata.jsonl"):
        read_captioned_images(tmp_path)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "missing.png", "text": "t"}) + "\n")
    with pytest.raises(InputError, match="line 1: image .*missing.png.* does not exist"):
        read_captioned_images(tmp_path)
    _png(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "t"}) + "\n")
    with pytest.raises(InputError, match="no 'text' field.*--caption_column"):
        read_captioned_images(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(InputError, match="line 1: not valid JSON"):
        read_captioned_images(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("\n")
    with pytest.raises(InputError, match="no images listed"):
        read_captioned_images(tmp_path)
