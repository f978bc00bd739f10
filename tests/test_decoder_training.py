"""`minidiff train-decoder` on a tiny random decoder and prior folder (written by diffusers) and a tiny imagefolder."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from minidiff.errors import InputError
from minidiff.reference import save_tiny_decoder_pipeline, save_tiny_prior_pipeline
from minidiff.training.captioned_images import read_captioned_images
from minidiff.training.decoder import encode_images, load_frozen, train_decoder, validation_loss, zero_image_embed

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20)}


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return save_tiny_decoder_pipeline(tmp_path_factory.mktemp("decoder-source"))


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
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


def _run(decoder, prior, data, out, **kw):
    args = dict(train_data_dir=data, train_batch_size=4, max_train_steps=6, checkpointing_steps=2,
                learning_rate=1e-3, lr_warmup_steps=0, progress=False, seed=0)
    return train_decoder(decoder, prior, out, **{**args, **kw})


def test_two_steps_on_an_imagefolder_give_a_decoder_pipeline_folder(decoder, prior, imagefolder, tmp_path):
    from minidiff import DiffusionPipeline, KandinskyV22Pipeline

    out = tmp_path / "run"
    summary = _run(decoder, prior, imagefolder, out, max_train_steps=2, validation_data_dir=imagefolder)
    assert summary["finished"] and summary["step"] == 2 and summary["resolution"] == 16  # movq f 2 x unet 8
    for part in ("model_index.json", "unet", "movq", "scheduler"):
        assert (out / part).exists(), part
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, KandinskyV22Pipeline)
    assert summary["validation"]["n"] == 8 and summary["validation"]["val_loss"] > 0
    import diffusers

    assert type(diffusers.DiffusionPipeline.from_pretrained(out)).__name__ == "KandinskyV22Pipeline"


def test_loss_falls(decoder, prior, imagefolder, tmp_path):
    """The held-out-style denoising loss (fixed noise and t) on the 8 training images falls."""
    from minidiff.models.unet import UNet2DConditionModel

    frozen = load_frozen(decoder, prior)
    data = encode_images(read_captioned_images(imagefolder), frozen, 16, progress=False)
    before = validation_loss(UNet2DConditionModel.from_pretrained(decoder, subfolder="unet"), data, frozen["scheduler"])
    out = tmp_path / "run"
    _run(decoder, prior, imagefolder, out, max_train_steps=40, train_batch_size=8, checkpointing_steps=40)
    after = validation_loss(UNet2DConditionModel.from_pretrained(out, subfolder="unet"), data, frozen["scheduler"])
    assert after < 0.7 * before, (before, after)


def test_stop_and_resume_equals_the_uninterrupted_run_bit_for_bit(decoder, prior, imagefolder, tmp_path):
    from minidiff.models.unet import UNet2DConditionModel

    whole = tmp_path / "whole"
    _run(decoder, prior, imagefolder, whole, use_ema=True)
    split = tmp_path / "split"
    first = _run(decoder, prior, imagefolder, split, use_ema=True, stop_after=3)
    assert not first["finished"] and first["step"] == 3
    _run(decoder, prior, imagefolder, split, use_ema=True, resume_from_checkpoint="latest")
    a = UNet2DConditionModel.from_pretrained(whole, subfolder="unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(split, subfolder="unet").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((split / "loss_log.json").read_text())
    assert log["step"] == 6 and log["loss"] == json.loads((whole / "loss_log.json").read_text())["loss"]


def test_zero_embed_is_the_prior_pipelines_negative(prior):
    """Image-embedding dropout trains on exactly what the prior pipeline hands the decoder as
    negative_image_embeds."""
    from minidiff import KandinskyV22PriorPipeline
    from minidiff.models.clip import CLIPVisionModelWithProjection

    pipe = KandinskyV22PriorPipeline.from_pretrained(prior)
    frozen = {"image_encoder": CLIPVisionModelWithProjection.from_pretrained(prior, subfolder="image_encoder")}
    assert torch.equal(zero_image_embed(frozen), pipe.get_zero_embed(1)[0].float())


def test_image_embed_dropout_and_min_snr_run(decoder, prior, imagefolder, tmp_path):
    summary = _run(decoder, prior, imagefolder, tmp_path / "run", max_train_steps=2, image_embed_dropout=1.0,
                   snr_gamma=5.0, gradient_accumulation_steps=2, mixed_precision="bf16")
    assert summary["finished"] and all(np.isfinite(json.loads((tmp_path / "run" / "loss_log.json").read_text())["loss"]))


def test_bad_input_is_refused_before_any_work(decoder, prior, imagefolder, tmp_path):
    cases = [
        (dict(pretrained=tmp_path), "movq"),
        (dict(dataset="shapes"), "one of them"),
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(image_embed_dropout=2.0), "image_embed_dropout"),
        (dict(resolution=0), "resolution"),
        (dict(mixed_precision="fp16"), "CUDA"),
    ]
    for kw, words in cases:
        source = kw.pop("pretrained", decoder)
        with pytest.raises(InputError, match=words):
            _run(source, prior, imagefolder, tmp_path / "never", **kw)
        assert not (tmp_path / "never").exists()
    done = tmp_path / "done"
    _run(decoder, prior, imagefolder, done, max_train_steps=2)
    with pytest.raises(InputError, match="checkpoints of an earlier run"):
        _run(decoder, prior, imagefolder, done, max_train_steps=2)


def test_cli_says_one_sentence_and_exits_2(decoder, prior, tmp_path, capsys):
    from minidiff.cli import main

    code = main(["train-decoder", "--pretrained_decoder_model_name_or_path", str(decoder),
                 "--pretrained_prior_model_name_or_path", str(prior), "--output_dir", str(tmp_path / "o"),
                 "--train_data_dir", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 2 and "no such folder" in err and "Traceback" not in err
