"""The `minidiff` command: the check table on a tiny random checkpoint, and errors that print one
sentence and exit non-zero without a traceback."""

import subprocess
import sys

import pytest

from minidiff.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "minidiff.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "sd"
    assert main(["tiny-random", str(folder)]) == 0
    return folder


def test_check_passes_on_tiny_checkpoint(tiny, capsys):
    assert main(["check", str(tiny)]) == 0
    out = capsys.readouterr().out
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert component in out
    assert "NO" not in out.split("\n", 2)[2]  # no row out of tolerance


def test_check_detects_a_wrong_component(tiny, monkeypatch, capsys):
    # A UNet that is 1% off must be reported: exit status 1 and a "NO" in its row.
    from minidiff.models.unet import UNet2DConditionModel

    forward = UNet2DConditionModel.forward
    monkeypatch.setattr(UNet2DConditionModel, "forward", lambda self, *a, **k: forward(self, *a, **k) * 1.01)
    assert main(["check", str(tiny)]) == 1
    unet_rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("unet")]
    assert unet_rows and all(l.rstrip().endswith("NO") for l in unet_rows)


def test_tiny_random_refuses_to_overwrite(tiny):
    result = run_cli("tiny-random", str(tiny))
    assert result.returncode == 2
    assert "already exists" in result.stderr and "Traceback" not in result.stderr


def test_missing_model_is_one_sentence():
    result = run_cli("check", "/no/such/checkpoint")
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
