"""Bad input gets one clear sentence, checked before any work starts.

The cases of the bad-input probe (issue "every bad input answered in one sentence"), through the
`minidiff` command (exit status 2, the key phrase, no traceback, no folder created, no file of
the user's changed) and, where it applies, through the Python API (exception type and phrase).
The cases the probe found already right are kept in tests/test_cli.py, tests/test_loading.py and
the representative rows at the end of this file.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from minidiff.cli import main
from minidiff.errors import InputError, NonFiniteError

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "weights" / "shapes"
EXAMPLE = ROOT / "weights" / "examples" / "red_circle_green_triangle.png"
FAST = ["--steps", "2", "--num-maps", "2"]
EDIT = ["--source", "a red circle", "--target", "a blue square"]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cli(capsys, *args):
    """Run the command in this process: a traceback would surface as an exception here."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def refused(capsys, phrase, *args, out: Path | None = None):
    code, err = cli(capsys, *args)
    assert code == 2, err
    assert phrase in err, err
    assert "Traceback" not in err
    # One sentence (progress bars of the stage that failed share stderr with it).
    assert len([line for line in err.replace("\r", "\n").splitlines() if "error:" in line]) == 1, err
    if out is not None:
        assert not out.exists(), f"{out} was created although the input was refused"
    return err


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    shutil.copy(EXAMPLE, path)
    return path


# ----------------------------------------------------------------------------------------------
# Crashes, wrong results, data lost


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("nan") / "shapes"
    shutil.copytree(SHAPES, folder, ignore=shutil.ignore_patterns("judge", "training"))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["conv_out.bias"] = torch.full_like(state["conv_out.bias"], float("nan"))
    save_file(state, str(weights))
    return folder


def test_nan_weights_stop_the_loop_with_a_sentence(nan_model, tmp_path, capsys):
    refused(capsys, "stopped being finite", "generate", "a red circle", "--model", nan_model, "--steps", "2",
            "--out", tmp_path / "o")
    from minidiff import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(nan_model)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(NonFiniteError, match="minidiff check"):
        pipe("a red circle", num_inference_steps=2)


@pytest.mark.parametrize("command", ["generate", "edit", "check"])
@pytest.mark.parametrize("device", ["cuda", "cuda:7"])
def test_cuda_on_a_cpu_only_torch(command, device, image, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = {"generate": ["generate", "x", "--model", SHAPES, "--out", tmp_path / "o"],
            "edit": ["edit", image, *EDIT, "--model", SHAPES, "--out", tmp_path / "o"],
            "check": ["check", SHAPES]}[command]
    refused(capsys, "CUDA is not available", *args, "--device", device, out=tmp_path / "o")


def test_unknown_device(tmp_path, capsys):
    refused(capsys, "unknown device 'nonsense'", "generate", "x", "--model", SHAPES, "--device", "nonsense",
            "--out", tmp_path / "o", out=tmp_path / "o")


def test_truncated_png(image, tmp_path, capsys):
    bad = tmp_path / "cut.png"
    bad.write_bytes(image.read_bytes()[:300])
    refused(capsys, "is truncated or corrupt", "edit", bad, *EDIT, "--model", SHAPES, "--out", tmp_path / "o",
            out=tmp_path / "o")


def test_huge_image_is_refused_and_resize_works(tmp_path, capsys):
    big = tmp_path / "big.png"
    PIL.Image.open(EXAMPLE).resize((4000, 4000)).save(big)
    refused(capsys, "pass --resize 128", "mask", big, *EDIT, "--model", SHAPES, *FAST, "--out", tmp_path / "o",
            out=tmp_path / "o")
    code, err = cli(capsys, "mask", big, *EDIT, "--model", SHAPES, *FAST, "--resize", "128", "--out", tmp_path / "o")
    assert code == 0, err
    assert PIL.Image.open(tmp_path / "o" / "mask.png").size == (128, 128)


def test_nan_threshold_and_an_empty_mask(image, tmp_path, capsys):
    refused(capsys, "--threshold must be a finite number", "edit", image, *EDIT, "--model", SHAPES,
            "--threshold", "nan", "--out", tmp_path / "o", out=tmp_path / "o")
    # The same prompt twice: the two noise predictions agree everywhere, so the mask is empty.
    code, err = cli(capsys, "mask", image, "--source", "a red circle", "--target", "a red circle", "--model", SHAPES,
                    *FAST, "--out", tmp_path / "o")
    assert code == 0 and "the mask is empty: nothing to edit" in err


@pytest.mark.parametrize("flag, value", [("--num-images", "-2"), ("--height", "-8"), ("--num-images", "0"),
                                         ("--height", "0"), ("--width", "0"), ("--steps", "0")])
def test_counts_must_be_positive(flag, value, tmp_path, capsys):
    refused(capsys, "must be a positive whole number", "generate", "x", "--model", SHAPES, flag, value,
            "--out", tmp_path / "o", out=tmp_path / "o")


def test_out_is_a_file_or_cannot_be_created(tmp_path, capsys):
    afile = tmp_path / "afile.txt"
    afile.write_text("mine")
    before = sha(afile)
    refused(capsys, "is a file", "generate", "x", "--model", SHAPES, "--out", afile)
    refused(capsys, "is a file", "generate", "x", "--model", SHAPES, "--out", afile / "sub")
    assert sha(afile) == before
    for place in ("/sys/minidiff-x", "/proc/minidiff-x"):
        refused(capsys, f"cannot create folder '{place}'", "generate", "x", "--model", SHAPES, "--steps", "1",
                "--out", place)


# ----------------------------------------------------------------------------------------------
# Unclear, silent or late


def test_check_names_the_missing_subfolder(tmp_path, capsys):
    folder = tmp_path / "nounet"
    shutil.copytree(SHAPES, folder, ignore=shutil.ignore_patterns("unet", "judge", "training"))
    refused(capsys, "has no subfolder 'unet'", "check", folder)


def test_transparent_image_warns(tmp_path, capsys):
    rgba = tmp_path / "clear.png"
    PIL.Image.new("RGBA", (128, 128), (255, 0, 0, 0)).save(rgba)
    with pytest.warns(UserWarning, match="fully transparent"):
        code, _ = cli(capsys, "mask", rgba, *EDIT, "--model", SHAPES, *FAST, "--out", tmp_path / "o")
    assert code == 0


@pytest.mark.parametrize("size", [100, 104])
def test_one_size_rule_stated_once(size, tmp_path, capsys):
    odd = tmp_path / f"odd{size}.png"
    PIL.Image.open(EXAMPLE).resize((size, size)).save(odd)
    err = refused(capsys, "needs positive multiples of 32 pixels", "edit", odd, *EDIT, "--model", SHAPES,
                  "--out", tmp_path / "o", out=tmp_path / "o")
    assert "e.g. 96x96" in err or "e.g. 128x128" in err
    from minidiff import DiffEditPipeline

    pipe = DiffEditPipeline.from_pretrained(SHAPES)
    with pytest.raises(InputError, match="positive multiples of 32 pixels"):
        pipe.generate_mask(image=PIL.Image.open(odd), source_prompt="a", target_prompt="b")


def test_tiny_image_gets_a_real_size(tmp_path, capsys):
    one = tmp_path / "one.png"
    PIL.Image.new("RGB", (1, 1)).save(one)
    err = refused(capsys, "smaller than the 32x32 minimum", "edit", one, *EDIT, "--model", SHAPES,
                  "--out", tmp_path / "o", out=tmp_path / "o")
    assert "0x0" not in err


@pytest.mark.parametrize("value", ["-5", "nan"])
def test_guidance_must_be_finite_and_non_negative(value, tmp_path, capsys):
    refused(capsys, "--guidance must be a finite number >= 0", "generate", "x", "--model", SHAPES,
            "--guidance", value, "--out", tmp_path / "o", out=tmp_path / "o")
    from minidiff import StableDiffusionPipeline

    with pytest.raises(InputError, match="guidance_scale"):
        StableDiffusionPipeline.from_pretrained(SHAPES)("x", guidance_scale=float(value), num_inference_steps=1)


def test_seed_out_of_range(tmp_path, capsys):
    refused(capsys, "--seed must be a whole number from 0 to 2**64 - 1", "generate", "x", "--model", SHAPES,
            "--seed", "99999999999999999999999", "--out", tmp_path / "o", out=tmp_path / "o")


def test_input_inside_out_is_never_overwritten(image, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    inside = out / "mask.png"
    shutil.copy(image, inside)
    before = sha(inside)
    refused(capsys, "would overwrite the input", "mask", inside, *EDIT, "--model", SHAPES, *FAST,
            "--out", out, "--overwrite")
    assert sha(inside) == before


def test_saved_inversion_is_checked_against_the_schedule(image, tmp_path, capsys):
    from minidiff import DiffEditPipeline
    from minidiff.pipelines.diffedit import InversionOutput

    code, err = cli(capsys, "invert", image, "--source", "a red circle", "--model", SHAPES, "--steps", "4",
                    "--out", tmp_path / "inv")
    assert code == 0, err
    saved = tmp_path / "inv" / "inverted_latents.safetensors"
    # Same number of latents (int(5 * 0.6) = 3 = int(4 * 0.8)), another schedule: refused by name.
    refused(capsys, "inverted with num_inference_steps=4", "edit", image, *EDIT, "--model", SHAPES, "--steps", "5",
            "--strength", "0.6", "--num-maps", "2", "--latents", saved, "--out", tmp_path / "e")
    code, err = cli(capsys, "edit", image, *EDIT, "--model", SHAPES, "--steps", "4", "--num-maps", "2",
                    "--latents", saved, "--out", tmp_path / "e")
    assert code == 0, err
    pipe = DiffEditPipeline.from_pretrained(SHAPES)
    pipe.set_progress_bar_config(disable=True)
    inv = InversionOutput.load(saved)
    with pytest.raises(InputError, match="inverted with num_inference_steps=4"):
        pipe(prompt="a blue square", mask_image=np.ones((1, 16, 16)), image_latents=inv, num_inference_steps=5,
             inpaint_strength=0.6)


def test_nan_mask_is_refused():
    from minidiff import DiffEditPipeline

    pipe = DiffEditPipeline.from_pretrained(SHAPES)
    pipe.set_progress_bar_config(disable=True)
    inv = pipe.invert(image=PIL.Image.open(EXAMPLE), prompt="a red circle", num_inference_steps=2)
    mask = np.full((1, 16, 16), np.nan)
    with pytest.raises(NonFiniteError, match="NaN"):
        pipe(prompt="a blue square", mask_image=mask, image_latents=inv, num_inference_steps=2)


def test_torch_dtype_as_a_string():
    from minidiff import StableDiffusionPipeline, UNet2DConditionModel

    assert UNet2DConditionModel.from_pretrained(SHAPES, subfolder="unet", torch_dtype="float16").dtype == torch.float16
    assert StableDiffusionPipeline.from_pretrained(SHAPES, torch_dtype="bfloat16").unet.dtype == torch.bfloat16
    with pytest.raises(InputError, match="not a torch dtype"):
        UNet2DConditionModel.from_pretrained(SHAPES, subfolder="unet", torch_dtype="float13")


# ----------------------------------------------------------------------------------------------
# Across the board


def test_strength_is_checked_before_the_mask_stage(image, tmp_path, capsys, monkeypatch):
    from minidiff.pipelines.diffedit import DiffEditPipeline

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(DiffEditPipeline, "from_pretrained", classmethod(no_load))
    refused(capsys, "--strength must be a finite number", "edit", image, *EDIT, "--model", SHAPES,
            "--strength", "1.5", "--out", tmp_path / "o", out=tmp_path / "o")
    refused(capsys, "gives int(10 * 0.05) = 0 steps", "edit", image, *EDIT, "--model", SHAPES, "--steps", "10",
            "--strength", "0.05", "--out", tmp_path / "o", out=tmp_path / "o")


def test_shared_argument_checks():
    """minidiff/validation.py: name first, then value; a keyword argument in backticks, a flag as typed."""
    from minidiff.validation import check_choice, check_number, check_positive_int

    with pytest.raises(InputError, match=r"`blend` must be one of \['diffusers', 'aligned'\]; got 'paper'"):
        check_choice("blend", "paper", ("diffusers", "aligned"))
    for value in (0, 2.0, True, None):
        with pytest.raises(InputError, match="--steps must be a positive whole number"):
            check_positive_int("--steps", value)
    with pytest.raises(NonFiniteError, match="`eta` must be a finite number >= 0; got nan"):
        check_number("eta", float("nan"), low=0)
    with pytest.raises(InputError, match=r"`r` must be a finite number > 0 and <= 1 \(a fraction\); got 0"):
        check_number("r", 0, low=0, high=1, low_open=True, why="a fraction")
    check_number("r", 1, low=0, high=1, low_open=True)


def test_long_prompt_warning_is_one_short_line_at_the_caller():
    from minidiff import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SHAPES)
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe("word " * 100, num_inference_steps=1, output_type="latent")
    long = [w for w in caught if "tokens" in str(w.message)]
    assert len(long) == 1
    assert "has 102 tokens; CLIP reads 77, so the last 25 were dropped" in str(long[0].message)
    assert len(str(long[0].message)) < 160 and Path(long[0].filename) == Path(__file__)


def test_a_library_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """A plain ValueError is not the user's mistake: main lets it through (with its traceback)."""
    from minidiff.pipelines.text_to_image import StableDiffusionPipeline

    def bug(*a, **k):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["generate", "x", "--model", str(SHAPES), "--steps", "1", "--out", str(tmp_path / "o")])


def test_debug_shows_the_traceback_of_user_errors(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="unknown device"):
        main(["--debug", "generate", "x", "--model", str(SHAPES), "--device", "nonsense", "--out", str(tmp_path / "o")])
    monkeypatch.setenv("MINIDIFF_DEBUG", "1")
    with pytest.raises(InputError, match="unknown device"):
        main(["generate", "x", "--model", str(SHAPES), "--device", "nonsense", "--out", str(tmp_path / "o")])


# ----------------------------------------------------------------------------------------------
# Already right before (kept right): broken checkpoints get one sentence and status 2


@pytest.mark.parametrize("breakage, phrase", [
    ("missing", "does not exist"),
    ("file", "is a file"),
    ("no_index", "model_index.json"),
    ("truncated", "not a readable safetensors file"),
    ("bad_json", "is not valid JSON"),
])
def test_broken_checkpoints_stay_one_sentence(breakage, phrase, tmp_path, capsys):
    folder = tmp_path / "model"
    if breakage == "file":
        folder.write_text("not a folder")
    elif breakage != "missing":
        shutil.copytree(SHAPES, folder, ignore=shutil.ignore_patterns("judge", "training"))
        if breakage == "no_index":
            (folder / "model_index.json").unlink()
        elif breakage == "truncated":
            w = folder / "unet" / "diffusion_pytorch_model.safetensors"
            w.write_bytes(w.read_bytes()[:1000])
        elif breakage == "bad_json":
            (folder / "unet" / "config.json").write_text("{ not json")
    refused(capsys, phrase, "generate", "x", "--model", folder, "--steps", "1", "--out", tmp_path / "o",
            out=tmp_path / "o")
