"""benchmarks/gpu_train_shapes.py on a CPU: its --dry-run runs every stage (the three loops, the
pool, the export and packing, the four evaluations as subprocesses) with tiny settings and writes
the files a device run brings back; the pack unpacks into a pipeline that loads and a checkpoint
that a CPU run resumes; without a GPU the real run is refused with one sentence."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_train_shapes.py"
STAGES = ["vae", "clip", "pool", "unet", "export"]
EVALS = ["text_to_image", "diffedit", "two_objects", "readme"]


def unpack(out: Path, dest: Path) -> None:
    parts = sorted(out.glob("shapes.tar.gz.*"))
    joined = dest / "shapes.tar.gz"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))  # = cat shapes.tar.gz.* > shapes.tar.gz
    with tarfile.open(joined) as tar:
        tar.extractall(dest, filter="data")


def test_dry_run_trains_exports_scores_and_packs(tmp_path):
    # One step of each loop (the fast variant of --dry-run's default 2): about 40 s on a busy
    # 2-core machine, most of it the four evaluations' model loading.
    out, work = tmp_path / "out", tmp_path / "work"
    run = subprocess.run([sys.executable, str(SCRIPT), str(out), "--dry-run", "--dry-steps", "1",
                          "--work-dir", str(work)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"dry run failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    results = json.loads((out / "results.json").read_text())
    assert {k: v["status"] for k, v in results["stages"].items()} == {s: "ok" for s in STAGES}, results["stages"]
    assert {k: v["status"] for k, v in results["evaluations"].items()} == {e: "ok" for e in EVALS}
    assert results["stages"]["unet"]["steps_done"] == 1
    assert results["evaluations"]["text_to_image"]["result"]["n"] == 2
    assert results["evaluations"]["readme"]["result"]["seeds"] == 1
    log = (out / "gpu_train_shapes.log").read_text()
    assert "DRY RUN" in log and "[vae] latent std" in log  # the library's own prints are in the log
    assert "| unet | ok |" in (out / "summary.md").read_text()
    # What the device tool brings back: at most 8 files, each under 16 MiB.
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.stat().st_size < 16 * 2**20 for f in files), files

    # The pack: a pipeline folder that minidiff loads (with the judge the evaluations read) ...
    unpack(out, tmp_path)
    from minidiff.pipelines.text_to_image import StableDiffusionPipeline

    shapes = tmp_path / "shapes"
    assert (shapes / "judge").is_dir() and (shapes / "training" / "unet_history.json").is_file()
    StableDiffusionPipeline.from_pretrained(shapes, torch_dtype=torch.float32)
    # ... and a UNet checkpoint of CPU tensors that a CPU run continues from (step 1 -> 2).
    from minidiff.training.shapes.loop import load_checkpoint
    from minidiff.training.shapes.train_unet import train_unet

    ckpt = tmp_path / "ckpt"
    assert load_checkpoint(ckpt / "unet.pt")["step"] == 1
    train_unet(ckpt, steps=2, batch_size=2, pool_size=8, resume=True, progress=False)
    assert load_checkpoint(ckpt / "unet.pt")["step"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the real run would start")
def test_real_run_without_a_gpu_is_refused_in_one_sentence(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(SCRIPT), str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0], run.stderr
    assert not out.exists(), "work started before the device was checked"


def test_output_inside_weights_is_refused(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "weights/shapes", "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "inside weights/" in run.stderr, run.stderr
