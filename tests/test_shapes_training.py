"""The shapes-world training loops (minidiff/training/shapes/train.py) and the shipped pipeline.

Fast checks on tiny configs, a few steps each:
  * seeded: two runs with the same seed give bit-identical weights (the loops are deterministic
    on one machine, so the comparison is exact);
  * resume: 2 steps + resume to 3 steps gives the same weights as 3 steps in one go (model,
    optimizer, RNG and data position all restored) and the checkpoint says step 3;
  * checkpoints are written atomically: a crash inside torch.save leaves the old file intact and
    no half-written checkpoint under the final name;
  * export: save_pipeline writes the diffusers layout that minidiff and diffusers both load.
If weights/shapes/model_index.json exists, the shipped pipeline must give the same image in
minidiff and in diffusers for the same initial latents (atol 1e-4: both run the same fp32
arithmetic, only summation order differs).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from minidiff.training.shapes import train as T

SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "shapes"

TINY_VAE = dict(T.VAE_CONFIG, block_out_channels=(8, 8, 8, 8), norm_num_groups=4)
TINY_TEXT = dict(T.TEXT_CONFIG, hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=1,
                 num_attention_heads=2)
TINY_VISION = dict(T.VISION_CONFIG, hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=1,
                   num_attention_heads=2)
TINY_UNET = dict(T.UNET_CONFIG, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=2,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def run_all(folder: Path, steps: int = 2, resume: bool = False):
    kw = dict(seed=0, progress=False, resume=resume, ckpt_every=1)
    vae = T.train_vae(folder, steps=steps, batch_size=2, config=TINY_VAE, std_scenes=4, **kw)
    clip = T.train_clip(folder, steps=steps, batch_size=4, text_config=TINY_TEXT, vision_config=TINY_VISION, **kw)
    unet = T.train_unet(folder, steps=steps, batch_size=2, config=TINY_UNET, pool_size=8, **kw)
    return vae, clip, unet


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=f"{k} differs")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("run_a"), tmp_path_factory.mktemp("run_b")
    return a, run_all(a), b, run_all(b)


def test_seeded_runs_are_identical(two_runs):
    _, models_a, _, models_b = two_runs
    for ma, mb in zip(models_a, models_b):
        assert_same_weights(ma, mb)
    # ... and training changed something: the weights differ from a fresh initialisation.
    torch.manual_seed(0)
    fresh = T.AutoencoderKL(T.AutoencoderKLConfig(**TINY_VAE))
    assert not torch.equal(fresh.encoder.conv_in.weight, models_a[0].encoder.conv_in.weight)


def test_outputs_and_checkpoints_written(two_runs):
    folder = two_runs[0]
    for name in ("vae", "clip", "unet"):
        state = T.load_checkpoint(folder / f"{name}.pt")
        assert state["step"] == 2
    assert not list(folder.glob("*.tmp")), "a temporary checkpoint file was left behind"
    vae = T.AutoencoderKL.from_pretrained(folder / "vae")
    assert vae.config.scaling_factor != 0.18215  # measured, not SD's default
    assert (folder / "text_encoder" / "model.safetensors").is_file()
    assert (folder / "image_encoder" / "model.safetensors").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_resume_continues_exactly(two_runs, tmp_path):
    # 2 steps, then resume to 3, must equal 3 steps in one go: model, optimizer, RNG and data
    # position are all restored. The UNets of both runs use the same frozen VAE and text encoder
    # (copied from the fixture's run), as in a real resumed run.
    frozen = two_runs[0]
    split, straight = tmp_path / "split", tmp_path / "straight"
    for folder in (split, straight):
        for sub in ("vae", "text_encoder"):
            shutil.copytree(frozen / sub, folder / sub)
    kw = dict(seed=0, progress=False, ckpt_every=1)
    runs = {
        "vae": lambda folder, steps, resume: T.train_vae(folder, steps=steps, batch_size=2, config=TINY_VAE,
                                                         std_scenes=4, resume=resume, **kw),
        "clip": lambda folder, steps, resume: T.train_clip(folder, steps=steps, batch_size=4, text_config=TINY_TEXT,
                                                           vision_config=TINY_VISION, resume=resume, **kw),
        "unet": lambda folder, steps, resume: T.train_unet(folder, steps=steps, batch_size=2, config=TINY_UNET,
                                                           pool_size=8, resume=resume, **kw),
    }
    for name, run in runs.items():
        run(split, 2, False)
        resumed = run(split, 3, True)
        assert T.load_checkpoint(split / f"{name}.pt")["step"] == 3
        assert_same_weights(resumed, run(straight, 3, False))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    T.save_checkpoint({"step": 1}, path)

    def crashing_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        T.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert T.load_checkpoint(path)["step"] == 1


def test_save_pipeline_loads_in_minidiff_and_diffusers(two_runs, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from minidiff.pipelines.text_to_image import StableDiffusionPipeline

    out = T.save_pipeline(tmp_path / "pipe", ckpt_dir=two_runs[0])
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_schedule"], sched["steps_offset"], sched["set_alpha_to_one"]) == ("scaled_linear", 1, False)
    compare_pipelines(out, StableDiffusionPipeline, diffusers)


def compare_pipelines(folder: Path, minidiff_cls, diffusers, steps: int = 3):
    ours = minidiff_cls.from_pretrained(folder, torch_dtype=torch.float32)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, torch_dtype=torch.float32)
    ours.set_progress_bar_config(disable=True)
    ref.set_progress_bar_config(disable=True)
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(prompt="a red circle on a white background", num_inference_steps=steps, guidance_scale=6.0,
              output_type="np", latents=latents.clone())
    a = ours(**kw).images
    b = ref(**kw).images
    # Same fp32 arithmetic in both; only summation order differs: 1e-4 on [0, 1] pixels.
    assert abs(a - b).max() < 1e-4, f"max abs diff {abs(a - b).max():.2e}"


@pytest.mark.skipif(not (SHIPPED / "model_index.json").is_file(), reason="weights/shapes not exported yet")
def test_shipped_pipeline_minidiff_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    from minidiff.pipelines.text_to_image import StableDiffusionPipeline

    compare_pipelines(SHIPPED, StableDiffusionPipeline, diffusers)
    size_mb = T.folder_size_mb(SHIPPED)
    assert size_mb <= 40, f"weights/shapes is {size_mb:.1f} MB; the budget is 40 MB"
