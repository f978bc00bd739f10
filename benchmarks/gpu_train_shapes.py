"""Train the whole shapes-world family on one lent GPU, export it and score it: one prepared call.

    python benchmarks/gpu_train_shapes.py $OUT                   # on the device: v1 recipe, --budget-s 540
    python benchmarks/gpu_train_shapes.py $OUT --unet-steps 12000 --budget-s 560
    python benchmarks/gpu_train_shapes.py /tmp/dry --dry-run     # on a CPU: the whole script, tiny steps

Why one script: device time is scarce (15 minutes per task, one command at most 10 of them), so
the training, the export and the quick evaluations are prepared here, rehearsed on a CPU with
--dry-run, and run in one go. The stages, in order:

    1. vae     train_vae   (v1 recipe: 4000 steps, batch 16)    weights/shapes/README.md, "Training"
    2. clip    train_clip  (800 steps, batch 128)
    3. pool    encode_pool: the UNet's 48 000 training latents, encoded once on the device
    4. unet    train_unet  (7000 steps, batch 32), reading the pool that stage 3 cached
    5. export  save_pipeline into WORK/shapes (fp16, as always), plus judge/ and
               recommended_settings.json copied from --judge-from (the evaluations read both),
               training/ with the loss curves; then packed into OUT (see below)
    6. evals   evaluate_text_to_image (n=200), evaluate_diffedit (n=200, both blends),
               evaluate_two_object_text_to_image (n=200), evaluate_readme_example (seeds 0-9),
               in parallel, each a subprocess of this script (--eval NAME), each stopped when the
               budget ends. An evaluation function that takes a `device` argument runs there;
               today's evaluate.py has none, so they run on the machine's CPU cores (the log
               says which).

The recipe is v1's: the same batch sizes, learning rates and schedules (every flag's default is
the table's value; the loops' own defaults for everything else). A GPU makes it faster, nothing
else: larger batches with a scaled learning rate would be another recipe, to be measured first.

Budget (--budget-s, default 540 s). One device command may run at most 600 s (the device tool's
per-call limit, /work/.library/device/README.md), so the default leaves 60 s for the imports, the
CUDA start and the packing; run it with the tool's timeout_s=600. Each loop gets `max_minutes`
from what is left: the training share of the budget (all but --eval-reserve-s) split 1.5 : 1 : 3
between vae, clip and pool + unet, recomputed before each stage so that time one stage does not
use passes to the next. The split is an estimate, not a measurement (no GPU run yet): scenes are
drawn on one CPU core (about 1200 a second on this 2-core machine, `python -m
minidiff.training.shapes.data`), so the VAE (4000 steps, 64 000 scenes), CLIP (800 steps,
102 400 scenes) and the pool (48 000 scenes) are bound by the drawing as much as by the GPU, and
the UNet's 7000 small steps by kernel launches. results.json's steps_per_s says how it went. A loop stopped by its budget saves its checkpoint and component as usual
and the log says "stopped at step k of N". Evaluations start only with at least --eval-min-s left
and are stopped at the deadline; both cases are written to the log and results.json.

What comes back in OUT_DIR (the device tool returns at most 8 files of 16 MiB, 64 MiB in all, so
the model travels packed, not as its 20-odd files):
    gpu_train_shapes.log       the machine, the plan, every stage's output, times and status
    results.json               per stage: status, wall seconds, steps done, last loss, steps/s;
                               per evaluation: status and its result; rewritten after each stage
    summary.md                 the same as one short table (also printed last)
    shapes.tar.gz.00, .01 ...  the exported folder `shapes/` (and `ckpt/`, see below), gzip'd tar
                               cut into 15 MiB parts: `cat shapes.tar.gz.* | tar -xz -C DEST`
With --bundle-checkpoints (default: unet) the pack also holds `ckpt/`: the loops' fp32 components
(vae/, text_encoder/: what train_unet reads) and the named checkpoints (<name>.pt, CPU tensors),
so a run cut short by the budget continues on a CPU:
    SHAPES_CKPT_DIR=DEST/ckpt minidiff train-shapes unet --steps 7000 --batch-size 32 --resume
A pack over 60 MiB or 5 parts drops the checkpoints (said in the log).

Resuming on the device: the work folder (--work-dir; default a fresh temporary folder, named in
the log) holds every checkpoint; `--work-dir W --resume` continues each loop from its own
(a finished loop then does no step), re-uses the cached pool and redoes export and evaluations.
Without --resume a work folder that already holds checkpoints is refused.

--dry-run runs every stage on the CPU with tiny settings (--dry-steps steps of each loop at
batch 2-4, a pool of 8 scenes, evaluations on n=2 / 1 seed with 2 sampling steps and 1 mask map)
and writes the same files: it checks the plumbing, not the quality.

Settings on the device: cudnn.benchmark on (the shapes are fixed, so the fastest convolution
algorithms are picked once); float32 tensors throughout, with PyTorch's defaults for TF32
(printed in the header). No mixed precision: these models are small enough that a step is bound
by kernel launches, not by arithmetic.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # minidiff from this checkout when run as `python benchmarks/...`
    sys.path.insert(0, str(ROOT))

import torch

from minidiff.errors import InputError

PART_BYTES = 15 * 2**20  # under the device tool's 16 MiB per file
PACK_LIMIT_BYTES, PACK_LIMIT_PARTS = 60 * 2**20, 5  # 64 MiB and 8 files in all, with the 3 text files
SHARES = {"vae": 1.5, "clip": 1.0, "unet": 3.0}  # the training budget's split (pool + unet together)
EVALS = ("text_to_image", "diffedit", "two_objects", "readme")


# ----------------------------------------------------------------------------------------------
# One evaluation (the subprocess mode: --eval NAME)


def run_evaluation(name: str, model: str, n: int, seeds: int, device: str, steps: int | None,
                   maps: int | None) -> dict:
    """One of the four quick evaluations of `model`; `steps` / `maps` override the sampling steps
    and the DiffEdit mask maps (the dry run's tiny settings). The function gets `device` only if
    it takes one; the result says where it ran."""
    from minidiff.training.shapes import evaluate as E

    fn = {"text_to_image": E.evaluate_text_to_image, "diffedit": E.evaluate_diffedit,
          "two_objects": E.evaluate_two_object_text_to_image, "readme": E.evaluate_readme_example}[name]
    kw = {"progress": False}
    if name == "readme":
        kw["seeds"] = range(seeds)
    else:
        kw["n"] = n
    settings = {k: v for k, v in (("num_inference_steps", steps), ("num_maps_per_mask", maps)) if v is not None}
    if name in ("diffedit", "readme") and settings:
        kw["settings"] = settings
    elif name in ("text_to_image", "two_objects") and steps is not None:
        kw["steps"] = steps
    takes_device = "device" in inspect.signature(fn).parameters
    if takes_device:
        kw["device"] = device
    result = fn(model, **kw)
    result.pop("images", None)
    result["ran_on"] = device if takes_device else f"cpu ({torch.get_num_threads()} threads; {fn.__name__} takes no device)"
    return result


# ----------------------------------------------------------------------------------------------
# The log, the results and the summary


class Tee(io.TextIOBase):
    """stdout that also goes to the log file (what the library prints lands in both)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


class Report:
    """results.json and summary.md, rewritten after every stage, so a run cut short leaves both."""

    def __init__(self, out: Path, header: str, args: dict):
        self.out, self.header = out, header
        self.data = {"header": header, "args": args, "stages": {}, "evaluations": {}}

    def stage(self, name: str, **fields) -> None:
        self.data["stages"][name] = fields
        self.write()

    def evaluation(self, name: str, **fields) -> None:
        self.data["evaluations"][name] = fields
        self.write()

    def write(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / "summary.md").write_text(self.table() + "\n")

    def table(self) -> str:
        lines = ["# shapes world on one device", "", self.header, "",
                 "| stage | status | wall s | detail |", "|---|---|---|---|"]
        for name, r in list(self.data["stages"].items()) + list(self.data["evaluations"].items()):
            wall = f"{r['wall_s']:.1f}" if isinstance(r.get("wall_s"), (int, float)) else "-"
            lines.append(f"| {name} | {r.get('status', '?')} | {wall} | {r.get('detail', '')} |")
        return "\n".join(lines)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# ----------------------------------------------------------------------------------------------
# Training


def loop_summary(ckpt: Path, name: str, steps: int, wall_s: float, start_step: int) -> dict:
    """What a loop did, read back from its checkpoint and loss history."""
    from minidiff.training.shapes.loop import load_checkpoint

    state = load_checkpoint(ckpt / f"{name}.pt")
    done = state["step"] if state else 0
    history = state.get("history", []) if state else []
    ran = done - start_step
    detail = f"step {done} of {steps}" + ("" if done == steps else " (stopped by its time budget)")
    if history:
        detail += f", last loss {history[-1][1]}"
    return {"status": "ok" if done == steps else "stopped-for-time", "wall_s": wall_s, "steps_done": done,
            "steps": steps, "steps_this_run": ran, "last_loss": history[-1][1] if history else None,
            "steps_per_s": ran / wall_s if wall_s > 0 else None, "detail": detail}


def checkpoint_step(ckpt: Path, name: str) -> int:
    from minidiff.training.shapes.loop import load_checkpoint

    state = load_checkpoint(ckpt / f"{name}.pt")
    return state["step"] if state else 0


def train_family(a, ckpt: Path, device: torch.device, deadline: float, report: Report) -> bool:
    """Stages 1-4; True when every component exists afterwards (export can run)."""
    from minidiff.models.vae import AutoencoderKL
    from minidiff.training.shapes.train_clip import train_clip
    from minidiff.training.shapes.train_unet import encode_pool, train_unet
    from minidiff.training.shapes.train_vae import train_vae

    tiny = {"std_scenes": 16} if a.dry_run else {}
    calls = {
        "vae": lambda minutes: train_vae(ckpt, steps=a.vae_steps, batch_size=a.vae_batch, seed=a.seed,
                                         resume=a.resume, max_minutes=minutes, device=device, progress=False, **tiny),
        # v1's CLIP, without the hard negatives v3's stage 2 added (model card, "Training")
        "clip": lambda minutes: train_clip(ckpt, steps=a.clip_steps, batch_size=a.clip_batch, seed=a.seed,
                                           resume=a.resume, max_minutes=minutes, device=device, progress=False,
                                           hard_negatives=False),
        "unet": lambda minutes: train_unet(ckpt, steps=a.unet_steps, batch_size=a.unet_batch, seed=a.seed,
                                           pool_size=a.unet_pool, resume=a.resume, max_minutes=minutes,
                                           device=device, progress=False),
    }
    steps = {"vae": a.vae_steps, "clip": a.clip_steps, "unet": a.unet_steps}
    names = list(calls)
    ok = True
    for i, name in enumerate(names):
        if name == "unet" and not ((ckpt / "vae").is_dir() and (ckpt / "text_encoder").is_dir()):
            report.stage("unet", status="skipped-prerequisite-failed", detail="needs the vae and clip stages' output")
            return False
        component = {"vae": "vae", "clip": "text_encoder", "unet": "unet"}[name]
        if a.resume and checkpoint_step(ckpt, name) == steps[name] and (ckpt / component).is_dir():
            # Finished in an earlier call: not even re-saved (a re-measured scaling_factor would
            # change the VAE's fingerprint and so invalidate the cached pool).
            report.stage(name, status="ok", wall_s=0.0, steps_done=steps[name], steps=steps[name],
                         detail=f"finished in an earlier run (step {steps[name]})")
            log(f"{name}: finished in an earlier run, nothing to do")
            continue
        t0 = time.time()
        if name == "unet":  # stage 3: the pool, before the UNet's clock starts (train_unet reads the cache)
            try:
                vae = AutoencoderKL.from_pretrained(ckpt / "vae").requires_grad_(False).to(device)
                encode_pool(vae, a.seed + 2, a.unet_pool, cache=ckpt / "latent_pool.pt", progress=False)
                del vae
                report.stage("pool", status="ok", wall_s=time.time() - t0, detail=f"{a.unet_pool} scenes encoded")
            except Exception as err:  # noqa: BLE001 - a failed stage is recorded, the rest still run
                report.stage("pool", status="failed", wall_s=time.time() - t0, detail=f"{type(err).__name__}: {err}")
                log(f"pool failed:\n{traceback.format_exc()}")
                return False
            t0 = time.time()
        training_left = deadline - time.time() - a.eval_reserve_s
        seconds = training_left * SHARES[name] / sum(SHARES[n] for n in names[i:])
        if seconds < 5:
            report.stage(name, status="skipped-for-time", detail=f"{training_left:.0f} s of training budget left")
            log(f"{name}: skipped, {training_left:.0f} s of training budget left")
            ok = False
            continue
        start = checkpoint_step(ckpt, name) if a.resume else 0
        log(f"{name}: {steps[name]} steps from step {start}, at most {seconds:.0f} s, on {device}")
        try:
            calls[name](seconds / 60)
            report.stage(name, **loop_summary(ckpt, name, steps[name], time.time() - t0, start))
            log(f"{name}: {report.data['stages'][name]['detail']} in {time.time() - t0:.1f} s")
        except Exception as err:  # noqa: BLE001
            report.stage(name, status="failed", wall_s=time.time() - t0, detail=f"{type(err).__name__}: {err}")
            log(f"{name} failed:\n{traceback.format_exc()}")
            ok = False
    return ok and all((ckpt / c).is_dir() for c in ("vae", "text_encoder", "image_encoder", "unet"))


# ----------------------------------------------------------------------------------------------
# Export and packing


def export(ckpt: Path, folder: Path, judge_from: Path) -> None:
    """save_pipeline into `folder`, then the judge and recommended settings the evaluations read,
    and the loss curves under training/."""
    from minidiff.training.shapes.export import save_pipeline

    save_pipeline(folder, ckpt, overwrite=True)
    shutil.copytree(judge_from / "judge", folder / "judge", dirs_exist_ok=True)
    if (judge_from / "recommended_settings.json").is_file():
        shutil.copy(judge_from / "recommended_settings.json", folder)
    (folder / "training").mkdir(exist_ok=True)
    for history in ckpt.glob("*_history.json"):
        shutil.copy(history, folder / "training")


def pack(out: Path, members: dict[str, Path], name: str = "shapes.tar.gz") -> list[Path]:
    """The gzip'd tar of `members` (arcname -> path) in PART_BYTES parts out/name.00, .01, ..."""
    for old in out.glob(f"{name}.*"):
        old.unlink()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for arcname, path in members.items():
            tar.add(path, arcname=arcname)
    data = buffer.getvalue()
    parts = []
    for i in range(0, max(len(data), 1), PART_BYTES):
        parts.append(out / f"{name}.{i // PART_BYTES:02d}")
        parts[-1].write_bytes(data[i:i + PART_BYTES])
    return parts


def pack_results(out: Path, ckpt: Path, folder: Path, checkpoints: list[str]) -> dict:
    """The export (and ckpt/ for a resume, when it fits) into out/shapes.tar.gz.NN."""
    members = {"shapes": folder}
    if checkpoints:
        extra = {f"ckpt/{c}": ckpt / c for c in ("vae", "text_encoder") if (ckpt / c).is_dir()}
        extra.update({f"ckpt/{c}.pt": ckpt / f"{c}.pt" for c in checkpoints if (ckpt / f"{c}.pt").is_file()})
        extra.update({f"ckpt/{h.name}": h for h in ckpt.glob("*_history.json")})
        parts = pack(out, {**members, **extra})
        size = sum(p.stat().st_size for p in parts)
        if size <= PACK_LIMIT_BYTES and len(parts) <= PACK_LIMIT_PARTS:
            return {"parts": [p.name for p in parts], "bytes": size, "checkpoints": checkpoints}
        log(f"pack with checkpoints is {size / 2**20:.1f} MiB in {len(parts)} parts, over "
            f"{PACK_LIMIT_BYTES / 2**20:.0f} MiB / {PACK_LIMIT_PARTS} parts: packing the export alone")
    parts = pack(out, members)
    return {"parts": [p.name for p in parts], "bytes": sum(p.stat().st_size for p in parts), "checkpoints": []}


# ----------------------------------------------------------------------------------------------
# Evaluations


def run_evaluations(a, folder: Path, work: Path, device: torch.device, deadline: float, report: Report) -> None:
    """The chosen evaluations in parallel, each a subprocess of this script, stopped at the deadline."""
    left = deadline - time.time()
    if left < a.eval_min_s:
        for name in a.evals:
            report.evaluation(name, status="skipped-for-time", detail=f"{left:.0f} s left, needs {a.eval_min_s:.0f} s")
        log(f"evaluations skipped: {left:.0f} s of budget left, each needs at least {a.eval_min_s:.0f} s")
        return
    threads = max(1, (os.cpu_count() or 1) // len(a.evals))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    procs = {}
    for name in a.evals:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--eval", name, "--model", str(folder),
               "--json", str(work / f"eval_{name}.json"), "--n", str(a.n), "--seeds", str(a.seeds),
               "--device", str(device), "--threads", str(threads)]
        if a.dry_run:
            cmd += ["--eval-steps", "2", "--eval-maps", "1"]
        log(f"evaluation {name}: {' '.join(cmd[2:])}")
        err = open(work / f"eval_{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=err, stderr=subprocess.STDOUT,
                                        start_new_session=True), err, time.time())
    for name, (proc, err, t0) in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = None
        err.close()
        wall = time.time() - t0
        output = (work / f"eval_{name}.log").read_text(errors="replace")
        print(f"--- evaluation {name} (exit {rc}, {wall:.0f} s) ---\n{output[-3000:]}", flush=True)
        result_file = work / f"eval_{name}.json"
        if rc is None:
            report.evaluation(name, status="timed-out", wall_s=wall, detail="stopped at the end of the budget")
        elif rc != 0 or not result_file.is_file():
            report.evaluation(name, status="failed", wall_s=wall, detail=f"exit {rc}: {output.strip()[-200:]}")
        else:
            result = json.loads(result_file.read_text())
            report.evaluation(name, status="ok", wall_s=wall, detail=headline(name, result), result=result)


def headline(name: str, r: dict) -> str:
    """The figures the model card's table quotes, in one line."""
    if name == "text_to_image":
        return f"both {r['both']:.3f} (colour {r['colour']:.3f}, shape {r['shape']:.3f}), n={r['n']}"
    if name == "two_objects":
        return f"both {r['both']:.3f}, exactly two {r['exactly_two']:.3f}, n={r['n']}"
    if name == "diffedit":
        blends = [b for b in ("diffusers", "aligned") if b in r]
        return f"mask IoU {r['mask_iou']:.3f}; " + "; ".join(
            f"{b}: success {r[b]['edit_success']:.3f}, other kept {r[b]['other_object_kept']:.3f}, "
            f"PSNR outside true {r[b]['psnr_outside_true_region']:.1f} dB" for b in blends) + f"; n={r['n']}"
    return f"{r['successes']} of {r['seeds']} seeds ({r['blend']} blend)"


# ----------------------------------------------------------------------------------------------


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", nargs="?", help="folder for the log, results.json, summary.md and the packed model")
    p.add_argument("--dry-run", action="store_true", help="the whole script on the CPU with tiny settings")
    p.add_argument("--dry-steps", type=int, default=2, help="--dry-run: steps of each loop (default 2)")
    p.add_argument("--device", default="cuda", help="where to train (default cuda; --dry-run: cpu)")
    p.add_argument("--budget-s", type=float, default=540, help="wall-clock budget of the whole run, seconds")
    p.add_argument("--eval-reserve-s", type=float, default=150,
                   help="seconds of the budget kept from training for export and evaluations (default 150)")
    p.add_argument("--eval-min-s", type=float, default=30, help="start the evaluations only with this much left")
    p.add_argument("--work-dir", default=None, help="checkpoints, pool and export (default: a fresh temporary folder)")
    p.add_argument("--resume", action="store_true", help="continue every loop from its checkpoint in --work-dir")
    p.add_argument("--judge-from", default=str(ROOT / "weights" / "shapes"),
                   help="the model folder whose judge/ and recommended_settings.json the export gets (read only)")
    p.add_argument("--bundle-checkpoints", nargs="*", choices=["vae", "clip", "unet"], default=["unet"],
                   help="checkpoints packed with the export for a CPU resume (default: unet; none: no value)")
    p.add_argument("--seed", type=int, default=0)
    # The v1 recipe (weights/shapes/README.md, "Training"): steps and batch of each loop.
    p.add_argument("--vae-steps", type=int, default=4000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--clip-steps", type=int, default=800)
    p.add_argument("--clip-batch", type=int, default=128)
    p.add_argument("--unet-steps", type=int, default=7000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-pool", type=int, default=48000, help="scenes in the UNet's latent pool")
    p.add_argument("--evals", nargs="*", choices=EVALS, default=list(EVALS), help="which evaluations (default all)")
    p.add_argument("--n", type=int, default=200, help="evaluation cases (text-to-image, DiffEdit, two objects)")
    p.add_argument("--seeds", type=int, default=10, help="README example: seeds 0 .. SEEDS-1")
    # The subprocess mode: one evaluation.
    p.add_argument("--eval", choices=EVALS, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--eval-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--eval-maps", type=int, default=None, help=argparse.SUPPRESS)
    return p, p.parse_args(argv)


def main(argv=None) -> int:
    p, a = parse(argv)
    if a.eval:  # subprocess mode
        if a.threads:
            torch.set_num_threads(a.threads)
        result = run_evaluation(a.eval, a.model, a.n, a.seeds, a.device, a.eval_steps, a.eval_maps)
        Path(a.json).write_text(json.dumps(result, indent=2, default=str))
        return 0
    if a.out_dir is None:
        p.error("OUT_DIR is required")

    from minidiff.training.shapes.loop import training_device
    from minidiff.validation import check_positive_int

    t_start = time.time()
    deadline = t_start + a.budget_s
    if a.dry_run:
        s = a.dry_steps
        a.device, a.n, a.seeds = "cpu", 2, 1
        a.vae_steps = a.clip_steps = a.unet_steps = s
        a.vae_batch, a.clip_batch, a.unet_batch, a.unet_pool = 2, 4, 2, 8
    for flag in ("vae_steps", "vae_batch", "clip_steps", "clip_batch", "unet_steps", "unet_batch", "unet_pool",
                 "n", "seeds"):
        check_positive_int(f"--{flag.replace('_', '-')}", getattr(a, flag))
    device = training_device(a.device)  # one sentence and no work when this machine lacks it
    out = Path(a.out_dir)
    weights = (ROOT / "weights").resolve()
    for folder in [out] + ([Path(a.work_dir)] if a.work_dir else []):
        if folder.resolve() == weights or weights in folder.resolve().parents:
            raise InputError(f"{str(folder)!r} is inside weights/: write the run into a fresh folder elsewhere.")
    judge_from = Path(a.judge_from)
    if not (judge_from / "judge").is_dir():
        raise InputError(f"no judge/ in {str(judge_from)!r}: --judge-from names the model folder whose judge scores.")
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="gpu_train_shapes_"))
    ckpt = work / "ckpt"
    if not a.resume and list(ckpt.glob("*.pt")):
        raise InputError(f"{str(ckpt)!r} already holds checkpoints: pass --resume to continue them, "
                         f"or a fresh --work-dir.")
    out.mkdir(parents=True, exist_ok=True)
    ckpt.mkdir(parents=True, exist_ok=True)
    logfile = open(out / "gpu_train_shapes.log", "a" if a.resume else "w")
    sys.stdout, sys.stderr = Tee(sys.__stdout__, logfile), Tee(sys.__stderr__, logfile)

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import describe_machine

    header = describe_machine(device.type)
    if device.type == "cuda":
        header += (f"\n{torch.cuda.get_device_name(device)}; cudnn.benchmark on, cudnn.allow_tf32 "
                   f"{torch.backends.cudnn.allow_tf32}, matmul precision {torch.get_float32_matmul_precision()}")
    report = Report(out, header, {k: v for k, v in vars(a).items() if k not in ("eval", "model", "json")})
    print(header)
    log(("DRY RUN on the CPU, tiny settings; " if a.dry_run else "")
        + f"budget {a.budget_s:.0f} s; work folder {work} (keep it for --resume)")
    log(f"recipe: vae {a.vae_steps} x {a.vae_batch}, clip {a.clip_steps} x {a.clip_batch}, "
        f"unet {a.unet_steps} x {a.unet_batch} on a pool of {a.unet_pool}; evaluations {a.evals}")

    trained = train_family(a, ckpt, device, deadline, report)
    folder = work / "shapes"
    if trained:
        t0 = time.time()
        try:
            export(ckpt, folder, judge_from)
            packed = pack_results(out, ckpt, folder, a.bundle_checkpoints)
            report.stage("export", status="ok", wall_s=time.time() - t0, **packed,
                         detail=f"{len(packed['parts'])} part(s), {packed['bytes'] / 2**20:.1f} MiB; checkpoints "
                                f"{packed['checkpoints'] or 'none'}")
            log(f"export: {report.data['stages']['export']['detail']}")
        except Exception as err:  # noqa: BLE001
            report.stage("export", status="failed", wall_s=time.time() - t0, detail=f"{type(err).__name__}: {err}")
            log(f"export failed:\n{traceback.format_exc()}")
            trained = False
    else:
        report.stage("export", status="skipped-prerequisite-failed", detail="a component is missing")
    if trained and a.evals:
        run_evaluations(a, folder, work, device, deadline, report)
    elif a.evals:
        for name in a.evals:
            report.evaluation(name, status="skipped-prerequisite-failed", detail="no exported model")
    report.write()
    log(f"done in {time.time() - t_start:.0f} s of a {a.budget_s:.0f} s budget")
    print(report.table())
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    logfile.close()
    statuses = [r["status"] for r in list(report.data["stages"].values()) + list(report.data["evaluations"].values())]
    return 0 if all(s in ("ok", "stopped-for-time", "skipped-for-time", "timed-out") for s in statuses) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InputError as err:
        print(f"benchmarks/gpu_train_shapes.py: error: {err}", file=sys.stderr)
        sys.exit(2)
