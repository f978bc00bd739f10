"""The package data ships with the package: a wheel built from this checkout, installed into an
empty folder, finds the official configs and the CLIP vocabulary on its own.

Why a wheel: the editable install the tests normally run against points back into the checkout,
so it would find minidiff/data/ even if pyproject.toml's `[tool.setuptools.package-data]` missed
files; `pip install .` (not editable) would then install a minidiff without them. Here:

    1. copy pyproject.toml, README.md and minidiff/ to a temporary folder (so that building writes
       no build/ or egg-info into the checkout) and build a wheel there: no network
       (--no-build-isolation uses the installed setuptools, --no-deps fetches nothing)
    2. the wheel holds every file of minidiff/data/ (nested config folders included)
    3. install it with `pip install --target <tmp>/site` and, in a fresh Python whose working
       directory is outside the checkout and whose PYTHONPATH is <tmp>/site, read a config
       through `minidiff.data.config_folder` and `minidiff.single_file.resolve_config`, and
       tokenize a prompt with the shipped vocabulary; the installed minidiff must be the one in
       <tmp>/site (not the checkout), and its results equal the checkout's.
About 10 s, most of it the fresh interpreter importing torch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import minidiff.data
from minidiff.single_file import SD1, resolve_config
from minidiff.tokenizer import CLIPTokenizer

pytest.importorskip("setuptools")

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photograph of an astronaut riding a horse, 4k"

# Run by the installed copy, printing what the parent compares with the checkout's answers.
PROBE = f"""
import json, minidiff, minidiff.data, minidiff.single_file
from minidiff.tokenizer import CLIPTokenizer
unet = minidiff.data.config_folder("stable-diffusion-v1-5") / "unet" / "config.json"
tok = CLIPTokenizer.from_pretrained(minidiff.data.CLIP_TOKENIZER)
print(json.dumps({{
    "file": minidiff.__file__,
    "unet_config": json.loads(unet.read_text()),
    "resolved": minidiff.single_file.resolve_config(None, "unet", minidiff.single_file.SD1),
    "ids": tok({PROMPT!r}).input_ids.tolist(),
}}))
"""


def _pip(*args: str, cwd: Path) -> None:
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, f"pip {' '.join(args)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "minidiff", src / "minidiff", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(src), cwd=tmp)
    (found,) = (tmp / "dist").glob("minidiff-*.whl")
    return found


def test_wheel_holds_every_data_file(wheel):
    data = ROOT / "minidiff" / "data"
    shipped = {p.relative_to(ROOT).as_posix() for p in data.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    assert any(name.endswith("stable-diffusion-v1-5/unet/config.json") for name in shipped)  # the walk saw nested folders
    missing = sorted(shipped - in_wheel)
    assert not missing, f"the wheel lacks {len(missing)} file(s) of minidiff/data (fix package-data in pyproject.toml): {missing[:10]}"


def test_installed_package_finds_its_data(wheel, tmp_path):
    site = tmp_path / "site"
    _pip("install", "--no-deps", "-q", "--target", str(site), str(wheel), cwd=tmp_path)
    outside = tmp_path / "elsewhere"  # neither the checkout nor the install folder
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", PROBE], cwd=outside, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, f"the installed minidiff failed:\n{run.stderr[-4000:]}"
    got = json.loads(run.stdout.strip().splitlines()[-1])

    assert Path(got["file"]).resolve().is_relative_to(site.resolve()), \
        f"the probe imported {got['file']}, not the installed copy in {site}"
    checkout_config = json.loads((minidiff.data.config_folder(SD1) / "unet" / "config.json").read_text())
    assert got["unet_config"] == checkout_config
    assert got["resolved"] == resolve_config(None, "unet", SD1) == checkout_config
    ids = CLIPTokenizer.from_pretrained(minidiff.data.CLIP_TOKENIZER)(PROMPT).input_ids.tolist()
    assert got["ids"] == ids
    assert ids[0][0] == 49406 and 49407 in ids[0]  # <|startoftext|> ... <|endoftext|>: a real vocabulary
