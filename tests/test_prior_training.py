"""`minidiff train-prior` on a tiny random prior folder (written by diffusers) and a tiny imagefolder."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from minidiff.errors import InputError
from minidiff.reference import save_tiny_prior_pipeline
from minidiff.training.prior import train_prior
from minidiff.training.trainer import lr_factor

TINY_PRIOR = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=32,
                  num_embeddings=77, additional_embeddings=4)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20)}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_tiny_prior_pipeline(tmp_path_factory.mktemp("prior-source"))


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    """8 images (4 colours x 2 shades) with metadata.jsonl, as the guide's datasets are laid out."""
    folder = tmp_path_factory.mktemp("imagefolder")
    rows = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        for shade in (0, 1):
            x = np.full((40, 48, 3), rgb, np.uint8) // (1 + shade)
            x[10:30, 12:36] = 255 - x[10:30, 12:36]
            PIL.Image.fromarray(x).save(folder / f"{i}{shade}.png")
            rows.append({"file_name": f"{i}{shade}.png", "text": f"a {name} picture"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _run(source, data, out, **kw):
    args = dict(train_data_dir=data, prior_config=TINY_PRIOR, train_batch_size=4, max_train_steps=6,
                checkpointing_steps=2, learning_rate=1e-3, progress=False, seed=0)
    return train_prior(source, out, **{**args, **kw})


def test_two_steps_on_an_imagefolder_give_a_prior_pipeline_folder(source, imagefolder, tmp_path):
    from minidiff import DiffusionPipeline

    out = tmp_path / "run"
    summary = _run(source, imagefolder, out, max_train_steps=2, validation_data_dir=imagefolder,
                   validation_prompts=["a red picture"])
    assert summary["finished"] and summary["step"] == 2
    for part in ("model_index.json", "prior", "text_encoder", "image_encoder", "tokenizer", "scheduler", "image_processor"):
        assert (out / part).exists(), part
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "KandinskyV22PriorPipeline"
    assert pipe.prior.clip_std.abs().min() > 0  # set from the data, not diffusers' zeros
    assert summary["validation"]["n"] == 0 or "cosine" in summary["validation"]
    assert list(summary["validation_prompts"]) == ["a red picture"]
    # The guide's inference hand-over: prior_ + component names
    assert {"prior_" + k for k in pipe.components} >= {"prior_prior", "prior_text_encoder"}


def test_loss_falls(source, imagefolder, tmp_path):
    summary = _run(source, imagefolder, tmp_path / "run", max_train_steps=150, checkpointing_steps=150,
                   train_batch_size=8)
    history = json.loads((tmp_path / "run" / "loss_log.json").read_text())["loss"]
    assert len(history) == 150
    first, last = np.mean(history[:15]), np.mean(history[-15:])
    assert last < 0.5 * first, (first, last)
    assert summary["loss_last_100"] < first


def test_stop_and_resume_equals_the_uninterrupted_run_bit_for_bit(source, imagefolder, tmp_path):
    from safetensors.torch import load_file

    kw = dict(use_ema=True, snr_gamma=5.0, caption_dropout=0.25, gradient_accumulation_steps=2,
              lr_scheduler="cosine", lr_warmup_steps=2)
    _run(source, imagefolder, tmp_path / "straight", **kw)
    stopped = _run(source, imagefolder, tmp_path / "resumed", stop_after=3, **kw)
    assert not stopped["finished"] and stopped["step"] == 3
    assert not (tmp_path / "resumed" / "model_index.json").exists()
    _run(source, imagefolder, tmp_path / "resumed", resume_from_checkpoint="latest", **kw)
    a = load_file(tmp_path / "straight" / "prior" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "prior" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = json.loads((tmp_path / "straight" / "loss_log.json").read_text())["loss"]
    lb = json.loads((tmp_path / "resumed" / "loss_log.json").read_text())["loss"]
    assert la == lb
    # Control: a different seed gives different weights (the comparison above can fail).
    _run(source, imagefolder, tmp_path / "other", seed=1, **kw)
    c = load_file(tmp_path / "other" / "prior" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_corrupt_checkpoint_is_refused_and_the_good_one_kept(source, imagefolder, tmp_path):
    out = tmp_path / "run"
    _run(source, imagefolder, out, stop_after=4, checkpoints_total_limit=5)
    state = out / "checkpoint-4" / "state.pt"
    data = bytearray(state.read_bytes())
    data[-100] ^= 0x55
    state.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"checkpoint-4.*SHA-256.*checkpoint-2"):
        _run(source, imagefolder, out, resume_from_checkpoint="latest", checkpoints_total_limit=5)
    assert (out / "checkpoint-2" / "complete.json").is_file()
    summary = _run(source, imagefolder, out, resume_from_checkpoint="checkpoint-2", checkpoints_total_limit=5)
    assert summary["finished"]


def test_bad_input_is_refused_before_any_work(source, imagefolder, tmp_path):
    with pytest.raises(InputError, match="--train_data_dir .* or --dataset shapes"):
        train_prior(source, tmp_path / "a", prior_config=TINY_PRIOR, progress=False)
    with pytest.raises(InputError, match="metadata.jsonl"):
        _run(source, tmp_path, tmp_path / "b")
    with pytest.raises(InputError, match="--learning_rate"):
        _run(source, imagefolder, tmp_path / "c", learning_rate=0)
    with pytest.raises(InputError, match="fp16 needs a CUDA device"):
        _run(source, imagefolder, tmp_path / "d", mixed_precision="fp16")
    with pytest.raises(InputError, match="a prior folder needs text_encoder/"):
        _run(tmp_path, imagefolder, tmp_path / "e")
    _run(source, imagefolder, tmp_path / "f", stop_after=2)
    with pytest.raises(InputError, match="holds checkpoints of an earlier run"):
        _run(source, imagefolder, tmp_path / "f")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_cli_says_one_sentence_and_exits_2(source, tmp_path, capsys):
    from minidiff.cli import main

    status = main(["train-prior", "--pretrained_prior_model_name_or_path", str(source), "--output_dir",
                   str(tmp_path / "out"), "--dataset", "shapes", "--learning_rate", "-1"])
    err = capsys.readouterr().err
    assert status == 2 and "--learning_rate" in err and "Traceback" not in err


def test_lr_schedules():
    assert [lr_factor("constant", s, 5, 10) for s in (0, 9)] == [1.0, 1.0]
    assert lr_factor("constant_with_warmup", 0, 4, 10) == 0.25 and lr_factor("constant_with_warmup", 8, 4, 10) == 1.0
    assert lr_factor("linear", 4, 4, 10) == 1.0 and lr_factor("linear", 10, 4, 10) == 0.0
    assert lr_factor("cosine", 7, 4, 10) == pytest.approx(0.5)


def test_bf16_autocast_and_gradient_accumulation_run_on_the_cpu(source, imagefolder, tmp_path):
    summary = _run(source, imagefolder, tmp_path / "run", max_train_steps=2, mixed_precision="bf16",
                   gradient_accumulation_steps=2)
    assert summary["finished"] and all(np.isfinite(json.loads((tmp_path / "run" / "loss_log.json").read_text())["loss"]))
