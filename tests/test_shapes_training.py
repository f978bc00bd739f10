"""The shapes-world training loops (minidiff/training/shapes/train_*.py), the export and the shipped pipeline.

Fast checks on tiny configs, a few steps each:
  * seeded: two runs with the same seed give bit-identical weights (the loops are deterministic
    on one machine, so the comparison is exact);
  * resume: 2 steps + resume to 3 steps gives the same weights as 3 steps in one go (model,
    optimizer, RNG and data position all restored) and the checkpoint says step 3;
  * checkpoints are written atomically: a crash inside torch.save leaves the old file intact and
    no half-written checkpoint under the final name;
  * export: save_pipeline writes the diffusers layout that minidiff and diffusers both load, with
    the same files as weights/shapes when it re-exports the shipped components, and refuses to
    write into a folder that holds files unless told to overwrite (then it keeps the others).
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

from minidiff.errors import InputError
from minidiff.models.unet import UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL, AutoencoderKLConfig
from minidiff.training.shapes.configs import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG, VISION_CONFIG
from minidiff.training.shapes.export import folder_size_mb, save_pipeline
from minidiff.training.shapes.loop import load_checkpoint, save_checkpoint
from minidiff.training.shapes.train import main
from minidiff.training.shapes.train_clip import train_clip
from minidiff.training.shapes.train_unet import train_unet
from minidiff.training.shapes.train_vae import train_vae

SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "shapes"

TINY_VAE = dict(VAE_CONFIG, block_out_channels=(8, 8, 8, 8), norm_num_groups=4)
TINY_TEXT = dict(TEXT_CONFIG, hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=1,
                 num_attention_heads=2)
TINY_VISION = dict(VISION_CONFIG, hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=1,
                   num_attention_heads=2)
TINY_UNET = dict(UNET_CONFIG, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=2,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def run_all(folder: Path, steps: int = 2, resume: bool = False):
    kw = dict(seed=0, progress=False, resume=resume, ckpt_every=1)
    vae = train_vae(folder, steps=steps, batch_size=2, config=TINY_VAE, std_scenes=4, **kw)
    clip = train_clip(folder, steps=steps, batch_size=4, text_config=TINY_TEXT, vision_config=TINY_VISION, **kw)
    unet = train_unet(folder, steps=steps, batch_size=2, config=TINY_UNET, pool_size=8, **kw)
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
    fresh = AutoencoderKL(AutoencoderKLConfig(**TINY_VAE))
    assert not torch.equal(fresh.encoder.conv_in.weight, models_a[0].encoder.conv_in.weight)


def test_outputs_and_checkpoints_written(two_runs):
    folder = two_runs[0]
    for name in ("vae", "clip", "unet"):
        state = load_checkpoint(folder / f"{name}.pt")
        assert state["step"] == 2
    assert not list(folder.glob("*.tmp")), "a temporary checkpoint file was left behind"
    vae = AutoencoderKL.from_pretrained(folder / "vae")
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
        "vae": lambda folder, steps, resume: train_vae(folder, steps=steps, batch_size=2, config=TINY_VAE,
                                                         std_scenes=4, resume=resume, **kw),
        "clip": lambda folder, steps, resume: train_clip(folder, steps=steps, batch_size=4, text_config=TINY_TEXT,
                                                           vision_config=TINY_VISION, resume=resume, **kw),
        "unet": lambda folder, steps, resume: train_unet(folder, steps=steps, batch_size=2, config=TINY_UNET,
                                                           pool_size=8, resume=resume, **kw),
    }
    for name, run in runs.items():
        run(split, 2, False)
        resumed = run(split, 3, True)
        assert load_checkpoint(split / f"{name}.pt")["step"] == 3
        assert_same_weights(resumed, run(straight, 3, False))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    save_checkpoint({"step": 1}, path)

    def crashing_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1


def test_save_pipeline_loads_in_minidiff_and_diffusers(two_runs, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from minidiff.pipelines.text_to_image import StableDiffusionPipeline

    out = save_pipeline(tmp_path / "pipe", ckpt_dir=two_runs[0])
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_schedule"], sched["steps_offset"], sched["set_alpha_to_one"]) == ("scaled_linear", 1, False)
    compare_pipelines(out, StableDiffusionPipeline, diffusers)


def test_stage_two_continues_an_exported_fp16_unet(two_runs, tmp_path):
    """The model card's stage 2 through the command line: a checkpoint folder holding an exported
    (fp16) pipeline's vae/ and text_encoder/, the UNet started from the exported UNet (--init-from),
    with its own lr, warmup and pool size. The frozen components are used in float32 and training
    moves the weights away from the starting point."""
    exported = save_pipeline(tmp_path / "pipe", ckpt_dir=two_runs[0])  # fp16 files
    ckpt = tmp_path / "stage2"
    ckpt.mkdir()
    for sub in ("vae", "text_encoder"):
        shutil.copytree(exported / sub, ckpt / sub)
    main(["unet", "--ckpt-dir", str(ckpt), "--init-from", str(exported / "unet"), "--steps", "2", "--batch-size", "2",
          "--lr", "3e-4", "--warmup", "1", "--pool-size", "4"])
    start = UNet2DConditionModel.from_pretrained(exported / "unet", torch_dtype=torch.float32)
    trained = UNet2DConditionModel.from_pretrained(ckpt / "unet")
    assert start.config.block_out_channels == trained.config.block_out_channels  # the exported config
    assert not torch.equal(start.conv_in.weight, trained.conv_in.weight)
    state = load_checkpoint(ckpt / "unet.pt")
    assert state["step"] == 2


@pytest.mark.parametrize("argv, says", [
    (["unet", "--init-from", "no/such/unet"], "not a UNet folder"),
    (["vae", "--pool-size", "8"], "the unet command's"),
    (["clip", "--init-from", "weights/shapes/unet"], "not a model folder with text_encoder/ and image_encoder/"),
    (["vae", "--init-from", "weights/shapes"], "for the unet and clip commands"),
    (["unet", "--no-hard-negatives"], "the clip command's"),
    (["eval", "--lr", "1e-3"], "trains nothing"),
])
def test_stage_two_flags_refuse_bad_input_before_work(argv, says, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(SystemExit) as err:
        main(argv + ["--ckpt-dir", str(ckpt)])
    assert err.value.code == 2 and says in capsys.readouterr().err
    assert not ckpt.exists()


@pytest.mark.parametrize("argv, says", [
    (["unet", "--lr", "-1"], "--lr must be"),
    (["unet", "--lr", "nan"], "--lr must be"),
    (["unet", "--warmup", "-5"], "--warmup must be"),
    (["unet", "--pool-size", "0"], "--pool-size must be a positive whole number of scenes"),
])
def test_stage_two_values_out_of_range_are_one_sentence_before_work(argv, says, tmp_path):
    # The shared checks of minidiff/validation.py: an InputError, which both command lines turn into
    # one sentence and status 2 (the __main__ block here, cli.cmd_train_shapes for `minidiff`).
    ckpt = tmp_path / "ckpt"
    with pytest.raises(InputError, match=says) as err:
        main(argv + ["--ckpt-dir", str(ckpt)])
    assert str(err.value).endswith(".")
    assert not ckpt.exists()


def test_save_pipeline_refuses_a_folder_with_files_unless_overwrite(two_runs, tmp_path):
    model = tmp_path / "model"
    (model / "judge").mkdir(parents=True)
    (model / "judge" / "config.json").write_text("{}")  # a file the export does not own
    with pytest.raises(InputError, match="overwrite"):
        save_pipeline(model, ckpt_dir=two_runs[0])
    assert not (model / "model_index.json").exists()
    save_pipeline(model, ckpt_dir=two_runs[0], overwrite=True)
    save_pipeline(model, ckpt_dir=two_runs[0], overwrite=True)  # again: its own entries are replaced
    assert (model / "judge" / "config.json").read_text() == "{}"
    assert (model / "model_index.json").is_file() and (model / "unet" / "config.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "a staging folder was left behind"


@pytest.mark.parametrize("argv", [["export"], ["eval", "--out", "weights/shapes"]])
def test_command_line_says_which_folder_flag(argv, capsys):
    # export writes --out (no default: it never writes into the source tree by itself); eval reads
    # --model, and an --out given to it (the flag's old meaning) is refused, not silently ignored.
    with pytest.raises(SystemExit):
        main(argv)
    assert "--out" in capsys.readouterr().err


@pytest.mark.skipif(not (SHIPPED / "model_index.json").is_file(), reason="weights/shapes not exported yet")
def test_export_of_the_shipped_components_matches_weights_shapes(tmp_path):
    # Re-exporting the shipped components (fp16 -> fp16, no change) through save_pretrained must
    # give the files weights/shapes has: the same JSON, vocabulary and merges, bit-identical
    # tensors. Two files are written more fully than the shipped ones and are compared by what
    # they load to: scheduler_config.json lists every DDIM option (the shipped file leaves the
    # defaults out), the tokenizer files spell out each special token's flags.
    from safetensors.torch import load_file

    from minidiff.schedulers.ddim import DDIMScheduler
    from minidiff.tokenizer import CLIPTokenizer

    out = save_pipeline(tmp_path / "pipe", ckpt_dir=SHIPPED)
    exported = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    by_loading = {Path("scheduler/scheduler_config.json"), Path("tokenizer/special_tokens_map.json"),
                  Path("tokenizer/tokenizer_config.json")}
    for rel in exported:
        mine, shipped = out / rel, SHIPPED / rel
        assert shipped.is_file(), f"{rel} is not in weights/shapes"
        if rel in by_loading:
            continue
        if rel.suffix == ".json":
            assert json.loads(mine.read_text()) == json.loads(shipped.read_text()), rel
        elif rel.suffix == ".safetensors":
            a, b = load_file(mine), load_file(shipped)
            assert a.keys() == b.keys(), rel
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{rel}: {k}"
        else:
            assert mine.read_bytes() == shipped.read_bytes(), rel
    assert DDIMScheduler.from_pretrained(out, subfolder="scheduler").config == \
        DDIMScheduler.from_pretrained(SHIPPED, subfolder="scheduler").config
    ours, theirs = (CLIPTokenizer.from_pretrained(f, subfolder="tokenizer") for f in (out, SHIPPED))
    assert [(t.content, t.normalized) for t in ours.added_tokens] == [(t.content, t.normalized) for t in theirs.added_tokens]
    assert (ours.pad_token, ours.model_max_length) == (theirs.pad_token, theirs.model_max_length)
    prompts = ["a red circle on a white background", "A BLUE Square <|startoftext|> <|endoftext|>"]
    assert torch.equal(ours(prompts).input_ids, theirs(prompts).input_ids)
    transformers = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(diffusers.DDIMScheduler.from_pretrained(out, subfolder="scheduler").config) == \
        public(diffusers.DDIMScheduler.from_pretrained(SHIPPED, subfolder="scheduler").config)
    ours, theirs = (transformers.CLIPTokenizer.from_pretrained(f, subfolder="tokenizer") for f in (out, SHIPPED))
    assert ours.added_tokens_decoder == theirs.added_tokens_decoder
    assert ours(prompts, padding="max_length").input_ids == theirs(prompts, padding="max_length").input_ids


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
    size_mb = folder_size_mb(SHIPPED)
    assert size_mb <= 40, f"weights/shapes is {size_mb:.1f} MB; the budget is 40 MB"


# ----------------------------------------------------------------------------------------------
# Devices: the CPU path above is the default (device="cpu"); a device the machine lacks is refused
# with one sentence before any work; on a GPU, checkpoints still hold CPU tensors.


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: nothing to refuse")
@pytest.mark.parametrize("what", ["vae", "clip", "unet"])
def test_device_flag_refuses_cuda_without_a_gpu(what, tmp_path):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(InputError, match="CUDA is not available") as err:
        main([what, "--device", "cuda", "--ckpt-dir", str(ckpt)])
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")  # one sentence
    assert not ckpt.exists(), "work started before the device was checked"
    with pytest.raises(InputError, match="unknown device"):
        train_vae(ckpt, steps=1, device="tpu:x")


def test_device_flag_is_for_the_training_commands(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--device", "cpu"])
    assert "--device is for the training commands" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run_checkpoints_hold_cpu_tensors_and_resume_on_the_cpu(tmp_path):
    # 2 steps on the GPU, then resumed to 3 on the CPU: every tensor in the checkpoint is a CPU
    # tensor, the resume loads, and the returned models are on the CPU.
    kw = dict(seed=0, progress=False, ckpt_every=1)
    for device, steps, resume in (("cuda", 2, False), ("cpu", 3, True)):
        vae = train_vae(tmp_path, steps=steps, batch_size=2, config=TINY_VAE, std_scenes=4, resume=resume,
                        device=device, **kw)
        clip = train_clip(tmp_path, steps=steps, batch_size=4, text_config=TINY_TEXT, vision_config=TINY_VISION,
                          resume=resume, device=device, **kw)
        unet = train_unet(tmp_path, steps=steps, batch_size=2, config=TINY_UNET, pool_size=8, resume=resume,
                          device=device, **kw)
        for model in (vae, clip, unet):
            assert {p.device.type for p in model.parameters()} == {"cpu"}
        for name in ("vae", "clip", "unet"):
            state = load_checkpoint(tmp_path / f"{name}.pt")
            assert state["step"] == steps
            assert tensor_devices(state) == {"cpu"}, name


def tensor_devices(obj) -> set[str]:
    """The device types of every tensor in a nested checkpoint (dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return {obj.device.type}
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return set().union(*(tensor_devices(v) for v in obj))
    return set()


def test_hard_negatives_bind_the_words_wrongly():
    """train_clip's hard negative: the same words, swapped between the objects (or, where a swap
    changes nothing, another colour), so its content key differs from the scene's."""
    import random

    from minidiff.training.shapes.data import describe, render
    from minidiff.training.shapes.train_clip import hard_negative, scene_key

    def scene(objects, template=0):
        specs = [{"shape": sh, "colour": c, "centre": (30.0 + 60 * i, 64.0), "size": 40.0, "rotation": 0.0}
                 for i, (c, sh) in enumerate(objects)]
        return render(specs, "white", describe(objects, "white", template))

    rng = random.Random(0)
    s = scene([("red", "circle"), ("green", "square")], template=1)
    caption, key = hard_negative(s, rng)
    assert caption == "a green circle next to a red square on a white background"
    assert key != scene_key(s) and set(caption.split()) == set(s.caption.split())
    for objects in ([("red", "circle"), ("red", "square")], [("red", "star"), ("blue", "star")], [("red", "star")]):
        s = scene(objects)
        caption, key = hard_negative(s, rng)
        assert key != scene_key(s) and caption != s.caption


def test_clip_starts_from_a_model_folder(tmp_path):
    """--init-from for clip: both towers start from the folder's weights (the shipped ones here)."""
    from minidiff.models.clip import CLIPTextModel

    clip = train_clip(tmp_path, steps=1, batch_size=4, lr=1e-12, warmup=0, init_from=SHIPPED, progress=False)
    shipped = CLIPTextModel.from_pretrained(SHIPPED / "text_encoder", torch_dtype=torch.float32)
    a, b = clip.text.state_dict(), shipped.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
