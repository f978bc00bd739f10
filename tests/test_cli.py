"""The `minidiff` command: the check table on a tiny random checkpoint, and errors that print one
sentence and exit non-zero without a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    from minidiff.models.unet import UNet2DConditionModel, UNet2DConditionOutput

    forward = UNet2DConditionModel.forward
    monkeypatch.setattr(UNet2DConditionModel, "forward",
                        lambda self, *a, **k: UNet2DConditionOutput(forward(self, *a, **k).sample * 1.01))
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


@pytest.fixture(scope="module")
def circle(tmp_path_factory):
    from PIL import Image, ImageDraw

    path = tmp_path_factory.mktemp("img") / "circle.png"
    im = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(im).ellipse((4, 4, 20, 20), fill="red")
    im.save(path)
    return path


def test_edit_writes_image_mask_and_panel(tiny, circle, tmp_path):
    from PIL import Image

    out = tmp_path / "edit"
    args = ["edit", str(circle), "--model", str(tiny), "--source", "a red circle", "--target", "a blue square",
            "--steps", "4", "--num-maps", "2", "--out", str(out)]
    assert main(args) == 0
    assert Image.open(out / "edited.png").size == (32, 32)
    assert Image.open(out / "mask.png").size == (32, 32)
    assert Image.open(out / "panel.png").width > 3 * 32
    assert main(args) == 2  # the folder is not empty now: nothing is overwritten silently


def test_generate_mask_invert_commands(tiny, circle, tmp_path):
    from safetensors import safe_open

    assert main(["generate", "a star", "--model", str(tiny), "--steps", "2", "--height", "32", "--width", "32",
                 "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "image_0.png").is_file()
    assert main(["mask", str(circle), "--model", str(tiny), "--source", "a", "--target", "b", "--steps", "4",
                 "--num-maps", "1", "--out", str(tmp_path / "mask")]) == 0
    assert (tmp_path / "mask" / "mask.png").is_file()
    assert main(["invert", str(circle), "--model", str(tiny), "--source", "a", "--steps", "5", "--strength", "0.4",
                 "--out", str(tmp_path / "inv")]) == 0
    with safe_open(str(tmp_path / "inv" / "inverted_latents.safetensors"), "pt") as f:
        assert f.metadata()["num_inference_steps"] == "5"
        assert f.get_tensor("latents").shape[1] == 2  # int(5 * 0.4) inverted latents


@pytest.mark.parametrize("args, message", [
    (["edit", "/no/such.png", "--source", "a", "--target", "b"], "No image file"),
    (["edit", "{circle}", "--source", "a", "--target", "b", "--strength", "1.5"], "--strength must be a finite number > 0 and <= 1"),
    (["generate", "a", "--height", "30", "--width", "32", "--steps", "1"], "needs positive multiples of 4 pixels"),
])
def test_errors_are_one_sentence(tiny, circle, tmp_path, args, message):
    args = [a.replace("{circle}", str(circle)) for a in args] + ["--model", str(tiny), "--out", str(tmp_path / "o")]
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------
# The DiffEdit defaults are the evaluated settings

SHAPES = Path(__file__).resolve().parents[1] / "weights" / "shapes"


def test_mask_command_computes_the_evaluated_mask(tmp_path, monkeypatch):
    """`minidiff mask` without flags = evaluate_diffedit's generate_mask call (the model card's
    figures), on the bundled shapes model: the same image, prompts and seed give the same mask."""
    import numpy as np
    from PIL import Image

    from minidiff.pipelines.diffedit import DiffEditPipeline
    from minidiff.training.shapes.evaluate import evaluate_diffedit

    class Seen(Exception):
        """Raised once the mask is captured: the rest of the evaluation is not needed."""

    generate_mask = DiffEditPipeline.generate_mask

    def capture(self, **kwargs):
        raise Seen(kwargs, generate_mask(self, **kwargs))

    monkeypatch.setattr(DiffEditPipeline, "generate_mask", capture)
    with pytest.raises(Seen) as seen:
        evaluate_diffedit(SHAPES, n=1, seed=0, progress=False)
    monkeypatch.undo()
    kwargs, evaluated = seen.value.args  # evaluated: (1, h, w) float 0/1
    pixels = ((kwargs["image"][0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()  # back to its uint8 scene
    Image.fromarray(pixels).save(tmp_path / "case.png")

    assert main(["mask", str(tmp_path / "case.png"), "--model", str(SHAPES), "--source", kwargs["source_prompt"][0],
                 "--target", kwargs["target_prompt"][0], "--seed", "0", "--out", str(tmp_path / "o")]) == 0
    saved = np.asarray(Image.open(tmp_path / "o" / "mask.png")) // 255  # (H, W), each latent pixel an f x f block
    f = saved.shape[0] // evaluated.shape[-1]
    expected = evaluated[0].numpy().astype(np.uint8).repeat(f, 0).repeat(f, 1)
    assert 0 < expected.mean() < 1, "a trivial mask would not test the settings"
    assert np.array_equal(saved, expected)


# ----------------------------------------------------------------------------------------------
# The defaults come from the model folder's recommended_settings.json, else diffusers'


class FakePipeline:
    """Stands in for the loaded pipeline: records each call's keyword arguments (no weights are
    loaded, so these tests take milliseconds)."""

    def __init__(self):
        self.calls = {}

    def generate_mask(self, **kwargs):
        from PIL import Image

        self.calls["generate_mask"] = kwargs
        return [Image.new("L", (16, 16), 255)]

    def invert(self, **kwargs):
        from types import SimpleNamespace

        self.calls["invert"] = kwargs
        return SimpleNamespace(latents=torch.zeros(1, 20, 4, 16, 16), save=lambda path: Path(path).write_bytes(b""))

    def __call__(self, *args, **kwargs):
        from types import SimpleNamespace

        from PIL import Image

        self.calls["__call__"] = kwargs
        n = kwargs.get("num_images_per_prompt", 1)
        return SimpleNamespace(images=[Image.new("RGB", (128, 128))] * n)


@pytest.fixture
def fake(monkeypatch):
    import minidiff.cli

    pipe = FakePipeline()
    monkeypatch.setattr(minidiff.cli, "_load_pipeline", lambda cls, args: pipe)
    return pipe


@pytest.fixture(scope="module")
def shapes_without_settings(tmp_path_factory):
    """weights/shapes' JSON files (all the command reads before loading) without recommended_settings.json."""
    import shutil

    folder = tmp_path_factory.mktemp("plain") / "shapes"
    for name in ("model_index.json", "unet/config.json", "vae/config.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHAPES / name, folder / name)
    return folder


def passed(s: dict, method: str) -> dict:
    """What the command passes to `method` for the diffedit settings `s` (evaluate_diffedit's mapping)."""
    return {"generate_mask": {k: s[k] for k in ("num_maps_per_mask", "mask_encode_strength", "mask_thresholding_ratio",
                                               "num_inference_steps", "guidance_scale", "mask_clamp")},
            "invert": {"num_inference_steps": s["num_inference_steps"], "inpaint_strength": s["inpaint_strength"],
                       "guidance_scale": s["invert_guidance_scale"]},
            "__call__": {"num_inference_steps": s["num_inference_steps"], "inpaint_strength": s["inpaint_strength"],
                         "guidance_scale": s["edit_guidance_scale"], "negative_prompt": s["negative_prompt"],
                         "blend": s["blend"]}}[method]


EXAMPLE = Path(__file__).resolve().parents[1] / "weights" / "examples" / "red_circle_green_triangle.png"


def edit(model, out, *flags):
    return main(["edit", str(EXAMPLE), "--model", str(model), "--source", "a red circle", "--target", "a blue square",
                 "--out", str(out), *flags])


def test_edit_defaults_are_the_models_recommended_settings(fake, tmp_path):
    from minidiff.pipelines.settings import recommended_settings

    assert edit(SHAPES, tmp_path / "o") == 0
    s = recommended_settings(SHAPES)["diffedit"]
    for method in ("generate_mask", "invert", "__call__"):
        kwargs = fake.calls[method]
        assert {k: kwargs[k] for k in passed(s, method)} == passed(s, method), method
    assert fake.calls["__call__"]["blend"] == "aligned"  # the file's, not diffusers' "diffusers"


def test_a_flag_overrides_the_file(fake, tmp_path):
    assert edit(SHAPES, tmp_path / "o", "--steps", "10", "--mask-strength", "0.5", "--blend", "diffusers",
                "--guidance", "3", "--negative-prompt", "source") == 0
    mask, inv, call = fake.calls["generate_mask"], fake.calls["invert"], fake.calls["__call__"]
    assert mask["num_inference_steps"] == inv["num_inference_steps"] == call["num_inference_steps"] == 10
    assert mask["mask_encode_strength"] == 0.5 and call["blend"] == "diffusers"
    assert mask["guidance_scale"] == call["guidance_scale"] == 3
    assert call["negative_prompt"] == "a red circle"
    assert mask["mask_thresholding_ratio"] == 4.0 and inv["guidance_scale"] == 1.0  # the rest: still the file's


def test_a_folder_without_the_file_gets_diffusers_defaults(fake, shapes_without_settings, tmp_path):
    """The defaults of the methods themselves (their signatures: diffusers')."""
    import inspect

    from minidiff.pipelines.diffedit import DiffEditPipeline
    from minidiff.pipelines.text_to_image import StableDiffusionPipeline

    assert edit(shapes_without_settings, tmp_path / "o") == 0
    for method in ("generate_mask", "invert", "__call__"):
        defaults = {n: p.default for n, p in inspect.signature(getattr(DiffEditPipeline, method)).parameters.items()}
        for name, value in fake.calls[method].items():
            if name in defaults and name not in ("image", "generator", "output_type", "prompt", "source_prompt",
                                                 "target_prompt", "mask_image", "image_latents"):
                assert value == defaults[name], (method, name)
    assert main(["generate", "x", "--model", str(shapes_without_settings), "--out", str(tmp_path / "g")]) == 0
    defaults = inspect.signature(StableDiffusionPipeline.__call__).parameters
    for name in ("num_inference_steps", "guidance_scale", "negative_prompt"):
        assert fake.calls["__call__"][name] == defaults[name].default, name


def test_generate_defaults_are_the_text_to_image_section(fake, tmp_path):
    assert main(["generate", "x", "--model", str(SHAPES), "--out", str(tmp_path / "g")]) == 0
    assert (fake.calls["__call__"]["num_inference_steps"], fake.calls["__call__"]["guidance_scale"]) == (25, 6.0)
    assert main(["generate", "x", "--model", str(SHAPES), "--steps", "3", "--guidance", "2",
                 "--out", str(tmp_path / "g2")]) == 0
    assert (fake.calls["__call__"]["num_inference_steps"], fake.calls["__call__"]["guidance_scale"]) == (3, 2)


def test_mask_and_invert_defaults_are_the_file_too(fake, tmp_path):
    from minidiff.pipelines.settings import recommended_settings

    s = recommended_settings(SHAPES)["diffedit"]
    assert main(["mask", str(EXAMPLE), "--model", str(SHAPES), "--source", "a", "--target", "b",
                 "--out", str(tmp_path / "m")]) == 0
    assert {k: fake.calls["generate_mask"][k] for k in passed(s, "generate_mask")} == passed(s, "generate_mask")
    assert main(["invert", str(EXAMPLE), "--model", str(SHAPES), "--source", "a", "--out", str(tmp_path / "i")]) == 0
    assert {k: fake.calls["invert"][k] for k in passed(s, "invert")} == passed(s, "invert")


def test_a_bad_settings_file_is_one_sentence_before_anything_is_written(shapes_without_settings, tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(shapes_without_settings, folder)
    (folder / "recommended_settings.json").write_text('{"diffedit": {"mask_strength": 0.7}}')
    assert edit(folder, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "unknown key 'mask_strength'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    # A user's --steps that the file's strength leaves without a step is the user's flag to fix.
    assert edit(SHAPES, tmp_path / "o", "--steps", "1") == 2
    assert "--steps=1 with --mask-strength=0.7 gives int(1 * 0.7) = 0 steps" in capsys.readouterr().err
