"""Every GPU check and benchmark of minidiff, in one run of about 8 minutes on one NVIDIA H200.

    python benchmarks/gpu_suite.py $OUT/gpu                 # on the device: run the steps below
    python benchmarks/gpu_suite.py $OUT/gpu --budget-s 600  # a longer overall budget
    python benchmarks/gpu_suite.py $OUT/gpu --groups 4 5 6  # rerun only some groups
    python benchmarks/gpu_suite.py /tmp/gpu_dry --dry-run   # on a CPU: check this plan, run nothing

Why one script: device time is scarce (minutes per task), so everything that needs a GPU is
prepared here, checked on a CPU with --dry-run, and run in one go. The steps run in order of
importance, each as its own subprocess (the same Python) with its own timeout, and all of them
share one overall budget (--budget-s, default 480 s). A step that would start with less than its
minimum left is recorded as skipped-for-time; a running step is stopped at min(its own cap, the
budget left). A failed step never stops the later ones. The caps (see `plan` below) add up to
far more than 480 s: they bound a step that hangs or compiles for too long, while the budget decides
how far down the list a run gets. The first groups matter most; a later run can pick up the rest
with --groups. A check step whose prep step was not ok is skipped (skipped-prerequisite-failed).

    1. kernel tests   pytest tests/test_flash_attention.py on the compiled Triton kernel
                      (TRITON_INTERPRET removed from the environment): forward and dq/dk/dv
                      against float64, fp32 + fp16 cases, and test_bf16_on_gpu (bf16 is skipped
                      only under the interpreter). No other test file has a CUDA path:
                      test_offload.py and test_nf4.py run on the CPU only, so they are not run.
    2. attention      benchmarks/attention.py at the SD 1.5 and SD 2.x shapes (512^2 and 768^2),
                      fwd + bwd, fp16 + bf16, vs SDPA flash / efficient / math, with its
                      correctness check; then --sweep of the kernel's block sizes, restricted to
                      SD 1.5 at 512^2 in fp16 (the full grid takes far longer than the budget; the
                      rows that finish before the cap are kept, widest-latency shape first).
    3. check          `minidiff check` on full-size SD 1.5 and SD 2.1 (768-v) checkpoints with
                      random weights, --device cuda, float16 then bfloat16, at each model's own
                      resolution (latents 64 / 96, images 512 / 768). `minidiff tiny-random` only
                      writes tiny configs, so a prep step (this script with
                      --write-random-checkpoint) builds each folder: diffusers / transformers
                      models from the official configs in minidiff/data/configs/, random weights
                      (seed 0, built on the GPU), saved in float16 in the diffusers layout with the
                      CLIP tokenizer files, into a temporary folder outside OUT_DIR (removed at the
                      end: a few GB that should not travel back with the results).
    4. offload        benchmarks/memory.py --only offload: full SD 1.5 UNet, fp16, 512^2 latents;
                      model / sequential / group offload, minidiff vs accelerate / diffusers,
                      time per forward and max_memory_allocated per mode.
    5. NF4            benchmarks/memory.py --only nf4: minidiff NF4 vs bitsandbytes Linear4bit.
    6. end to end     benchmarks/unet_step.py (one UNet forward, fp16) and benchmarks/diffedit.py
                      (mask + invert + edit, fp16, 512^2), minidiff vs diffusers.

What comes back in OUT_DIR:
    suite.log      the machine header, then for every step its command, exit code, wall seconds,
                   stdout and stderr
    NN_name.txt    each step's stdout (its table); NN_name.err its stderr
    summary.md     each step with its status (ok / failed / timed-out / skipped-for-time /
                   skipped-prerequisite-failed) and wall time; rewritten after every step, so a
                   run cut short still leaves one. A step "ok" exited 0 AND printed what proves it
                   ran (e.g. attention.py exits 0 with "has NOT run" when Triton is missing).

Exit status: 0 when every step that ran was ok, 1 otherwise, 2 without CUDA (not in --dry-run).

--dry-run runs no step. It checks that every file a step names exists, that every `-m` module is
importable, and that each command parses: it runs the command with `--help` appended (argparse
validates the values of the options before it reaches `--help`; pytest ignores the rest) and
checks that every flag the command passes appears in that help text. It writes the planned
commands into summary.md with status "planned" and exits 0, or 1 with the problems found.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "benchmarks/gpu_suite.py"  # this file, relative to ROOT (every step runs in ROOT)

GROUPS = {1: "kernel tests", 2: "attention benchmark", 3: "minidiff check, full size", 4: "offload",
          5: "NF4", 6: "UNet step and DiffEdit"}


@dataclass
class Step:
    name: str  # file stem after the step number, e.g. "pytest_kernel" -> 01_pytest_kernel.txt
    group: int  # key of GROUPS
    args: list[str]  # the command after `python`
    cap_s: int  # its own timeout
    expect: str  # a regex its stdout must contain for "ok": proof that it really ran
    min_s: int = 30  # below this much budget left it is not started
    needs: str | None = None  # the name of a step that must have been ok first


@dataclass
class Result:
    status: str  # ok / failed / timed-out / skipped-for-time / skipped-prerequisite-failed / pending;
    #              dry run: planned / invalid
    wall_s: float = 0.0
    rc: int | None = None
    note: str = ""
    problems: list[str] = field(default_factory=list)  # from the dry-run's validation


def plan(work: Path) -> list[Step]:
    """The steps, in order of importance. `work` holds the random checkpoints (outside OUT_DIR)."""
    sd15, sd21 = work / "sd15-random", work / "sd21-random"

    def check(folder: Path, model: str, dtype: str, latent: int, image: int, prep: str) -> Step:
        return Step(f"check_{model}_{dtype}", 3,
                    ["-m", "minidiff.cli", "check", str(folder), "--device", "cuda", "--dtype", dtype,
                     "--latent-size", str(latent), "--image-size", str(image)],
                    cap_s=75, expect=r"checks within tolerance", needs=prep)

    return [
        Step("pytest_kernel", 1,
             ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10", "tests/test_flash_attention.py"],
             cap_s=150, expect=r"\d+ passed"),
        Step("attention", 2,
             ["benchmarks/attention.py", "--models", "SD 1.5", "SD 2.x", "--images", "512", "768",
              "--dtypes", "float16", "bfloat16", "--modes", "fwd", "bwd", "--warmup", "3", "--repeats", "10"],
             cap_s=100, expect=r"TFLOP/s"),
        Step("attention_sweep", 2,
             ["benchmarks/attention.py", "--sweep", "--models", "SD 1.5", "--images", "512", "--dtypes", "float16",
              "--modes", "fwd", "--providers", "triton", "--no-check", "--warmup", "1", "--repeats", "5"],
             cap_s=60, expect=r"Block-size sweep"),
        Step("prep_sd15", 3, [SCRIPT, "--write-random-checkpoint", "minidiff/data/configs/stable-diffusion-v1-5", str(sd15)],
             cap_s=90, min_s=20, expect=r"wrote"),
        check(sd15, "sd15", "float16", 64, 512, "prep_sd15"),
        check(sd15, "sd15", "bfloat16", 64, 512, "prep_sd15"),
        Step("prep_sd21", 3, [SCRIPT, "--write-random-checkpoint", "minidiff/data/configs/stable-diffusion-2-1", str(sd21)],
             cap_s=90, min_s=20, expect=r"wrote"),
        check(sd21, "sd21", "float16", 96, 768, "prep_sd21"),
        check(sd21, "sd21", "bfloat16", 96, 768, "prep_sd21"),
        Step("memory_offload", 4,
             ["benchmarks/memory.py", "--only", "offload", "--device", "cuda", "--dtype", "float16", "--latent", "64",
              "--repeats", "3"],
             cap_s=120, expect=r"\| model \|"),
        Step("memory_nf4", 5,
             ["benchmarks/memory.py", "--only", "nf4", "--device", "cuda", "--dtype", "float16", "--latent", "64",
              "--repeats", "3"],
             cap_s=90, expect=r"\| NF4 \(Linear layers\) \|"),
        Step("unet_step", 6,
             ["benchmarks/unet_step.py", "--device", "cuda", "--sizes", "64", "96", "--dtypes", "float16",
              "--batch", "2", "--repeats", "5"],
             cap_s=60, min_s=20, expect=r"\| 64x64 \| float16 \|"),
        Step("diffedit", 6,
             ["benchmarks/diffedit.py", "--device", "cuda", "--dtype", "float16", "--size", "512", "--steps", "20",
              "--maps", "10", "--repeats", "1"],
             cap_s=120, expect=r"\*\*total\*\*"),
    ]


def file_name(index: int, step: Step) -> str:
    return f"{index:02d}_{step.name}"


def step_env() -> dict:
    """The environment of every step: the compiled kernels (no Triton interpreter), output
    unbuffered (a step stopped at its timeout keeps what it printed), no network, minidiff
    importable from this checkout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def show(args: list[str]) -> str:
    return shlex.join(["python", *args])


# ----------------------------------------------------------------------------------------------
# Dry run: is every step well-formed?


def flags_of(args: list[str]) -> list[str]:
    """The option flags a command passes (`--durations=10` -> `--durations`), without the
    interpreter's own `-m` in front of a module name (or `-c` and its program)."""
    if args[:1] == ["-c"]:
        return []
    tokens = args[2:] if args[:1] == ["-m"] else args
    return [t.split("=", 1)[0] for t in tokens if t.startswith("-") and not re.fullmatch(r"-\d+(\.\d+)?", t)]


def target_of(args: list[str]) -> list[str]:
    """What a command runs: `script.py`, `-m module` or `-m module subcommand`."""
    if args[:1] != ["-m"]:
        return args[:1]
    return args[:3] if len(args) > 2 and not args[2].startswith("-") else args[:2]


def repo_paths_of(args: list[str]) -> list[str]:
    """The arguments that name something inside this repository (they must exist)."""
    return [a for a in args if a.endswith(".py") or a.split("/", 1)[0] in ("tests", "benchmarks", "weights", "minidiff")]


def validate(step: Step, timeout_s: float = 120) -> list[str]:
    """What is wrong with a step's command, found without running it: [] when nothing is."""
    import importlib.util

    problems = [f"{p}: no such file or folder" for p in repo_paths_of(step.args) if not (ROOT / p).exists()]
    if step.args[:1] == ["-m"]:
        module = step.args[1]
        if importlib.util.find_spec(module) is None:
            problems.append(f"python -m {module}: no such module")
    if problems:
        return problems
    # argparse checks each option's value (type, choices) as it meets it, so everything before
    # the appended --help is validated; unknown flags are only reported after it, hence the
    # check against the help text below.
    try:
        run = subprocess.run([sys.executable, *step.args, "--help"], cwd=ROOT, env=step_env(),
                             capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [f"`{show(step.args)} --help` did not finish in {timeout_s:.0f} s"]
    if run.returncode != 0:
        tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
        return [f"`{show(step.args)} --help` exited {run.returncode}: " + " / ".join(tail)]
    for flag in flags_of(step.args):
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", run.stdout):
            problems.append(f"flag {flag} is not in the help of `{show(target_of(step.args))}`")
    return problems


# ----------------------------------------------------------------------------------------------
# Running the steps


def stop(proc: subprocess.Popen) -> None:
    """Kill a step's process group: the step and anything it started (e.g. compile workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it had just finished
        pass
    proc.wait()


def run_step(step: Step, out_dir: Path, index: int, timeout_s: float) -> Result:
    """Run one step as a subprocess in its own process group; stdout and stderr go straight to
    files, so that a step stopped at its timeout keeps what it had printed."""
    stem = file_name(index, step)
    t0 = time.perf_counter()
    with open(out_dir / f"{stem}.txt", "w") as out, open(out_dir / f"{stem}.err", "w") as err:
        proc = subprocess.Popen([sys.executable, *step.args], cwd=ROOT, env=step_env(), stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop(proc)
            return Result("timed-out", time.perf_counter() - t0, None, f"stopped after {timeout_s:.0f} s")
        except BaseException:  # the suite itself interrupted: leave no step running on the GPU
            stop(proc)
            raise
    wall = time.perf_counter() - t0
    if rc != 0:
        return Result("failed", wall, rc)
    if not re.search(step.expect, (out_dir / f"{stem}.txt").read_text(errors="replace")):
        return Result("failed", wall, rc, f"exit 0, but its output lacks /{step.expect}/: it did not really run")
    return Result("ok", wall, rc)


def log_step(log, index: int, step: Step, result: Result, out_dir: Path, timeout_s: float | None) -> None:
    log.write(f"\n{'=' * 100}\n{file_name(index, step)} (group {step.group}: {GROUPS[step.group]})\n")
    log.write(f"$ {shlex.join([sys.executable, *step.args])}\n")
    if timeout_s is not None:
        log.write(f"timeout {timeout_s:.0f} s (cap {step.cap_s} s)\n")
    ran = result.status in ("ok", "failed", "timed-out")
    log.write(f"status {result.status}" + (f"; exit code {result.rc}; wall {result.wall_s:.1f} s" if ran else "")
              + (f"; {result.note}" if result.note else "") + "\n")
    for problem in result.problems:
        log.write(f"problem: {problem}\n")
    for suffix, what in ((".txt", "stdout"), (".err", "stderr")):
        path = out_dir / f"{file_name(index, step)}{suffix}"
        if path.exists():
            log.write(f"--- {what} ---\n{path.read_text(errors='replace')}")
    log.flush()


def write_summary(out_dir: Path, header: str, steps: list[Step], results: list[Result], note: str) -> None:
    lines = ["# minidiff GPU suite", "", header, "", note, "",
             "| # | group | step | status | wall s | exit | command |", "|---|---|---|---|---|---|---|"]
    for i, (step, r) in enumerate(zip(steps, results), 1):
        wall = f"{r.wall_s:.1f}" if r.status in ("ok", "failed", "timed-out") else "-"
        lines.append(f"| {i:02d} | {step.group} {GROUPS[step.group]} | {step.name} | {r.status} | {wall} | "
                     f"{'-' if r.rc is None else r.rc} | `{show(step.args)}` |")
    details = [(i, s, r) for i, (s, r) in enumerate(zip(steps, results), 1) if r.note or r.problems]
    if details:
        lines += ["", "## Notes", ""]
    for i, step, r in details:
        for text in ([r.note] if r.note else []) + r.problems:
            lines.append(f"- {file_name(i, step)}: {text}")
    failed = [(i, s) for i, (s, r) in enumerate(zip(steps, results), 1) if r.status in ("failed", "timed-out")]
    for i, step in failed:  # the end of what a failed step printed, to read without opening the log
        tail = []
        for suffix in (".err", ".txt"):
            path = out_dir / f"{file_name(i, step)}{suffix}"
            if path.exists() and not tail:
                tail = path.read_text(errors="replace").rstrip().splitlines()[-12:]
        lines += ["", f"### {file_name(i, step)}: last lines", "", "```", *tail, "```"]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")


def run_suite(steps: list[Step], out_dir: Path, budget_s: float, dry_run: bool, header: str) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [Result("pending") for _ in steps]
    with open(out_dir / "suite.log", "w") as log:
        log.write(f"{header}\npython {sys.executable}; cwd {ROOT}; "
                  + ("DRY RUN: validating the commands, running none\n" if dry_run else f"budget {budget_s:.0f} s\n"))
        if dry_run:
            with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
                found = list(pool.map(validate, steps))
            for i, (step, problems) in enumerate(zip(steps, found), 1):
                results[i - 1] = Result("planned" if not problems else "invalid", problems=problems)
                log_step(log, i, step, results[i - 1], out_dir, None)
            bad = sum(bool(p) for p in found)
            note = (f"Dry run: {len(steps)} steps planned, none run; "
                    + ("every command validated against its --help." if not bad else f"{bad} step(s) INVALID."))
            write_summary(out_dir, header, steps, results, note)
            log.write(f"\n{note}\n")
            print(note)
            return 1 if bad else 0

        deadline = time.monotonic() + budget_s
        for i, step in enumerate(steps, 1):
            left = deadline - time.monotonic()
            names = [s.name for s in steps]
            if step.needs and (step.needs not in names or results[names.index(step.needs)].status != "ok"):
                results[i - 1] = Result("skipped-prerequisite-failed", note=f"needs {step.needs}, which was not ok")
                timeout = None
            elif left < step.min_s:
                results[i - 1] = Result("skipped-for-time", note=f"{left:.0f} s of budget left, needs at least {step.min_s} s")
                timeout = None
            else:
                timeout = min(step.cap_s, left)
                print(f"[{i:02d}/{len(steps)}] {step.name} (timeout {timeout:.0f} s): {show(step.args)}", flush=True)
                results[i - 1] = run_step(step, out_dir, i, timeout)
                print(f"        {results[i - 1].status} in {results[i - 1].wall_s:.1f} s", flush=True)
            log_step(log, i, step, results[i - 1], out_dir, timeout)
            write_summary(out_dir, header, steps, results, f"Budget {budget_s:.0f} s; running.")
        used = budget_s - max(0.0, deadline - time.monotonic())
        counts = {s: sum(r.status == s for r in results) for s in dict.fromkeys(r.status for r in results)}
        note = f"Budget {budget_s:.0f} s, {used:.0f} s used. " + ", ".join(f"{n} {s}" for s, n in counts.items()) + "."
        write_summary(out_dir, header, steps, results, note)
        log.write(f"\n{note}\n")
        print(note)
    return 0 if all(r.status in ("ok", "skipped-for-time") for r in results) else 1


# ----------------------------------------------------------------------------------------------
# Prep step: a full-size checkpoint folder with random weights


def write_random_checkpoint(config_dir: Path, dest: Path) -> None:
    """UNet, VAE and CLIP text encoder built by diffusers / transformers from the official configs
    in `config_dir` (minidiff/data/configs/<model>), random weights (seed 0), saved in float16 in the
    diffusers layout, with the CLIP tokenizer (vocab and merges from minidiff/data/clip-tokenizer, the
    model's own special tokens, e.g. SD 2's "!" padding), scheduler config and model_index.json."""
    import diffusers
    import torch
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of ~1.3 G parameters: fast on a GPU
    dest.mkdir(parents=True, exist_ok=True)
    read = lambda name: json.loads((config_dir / name).read_text())  # noqa: E731
    torch.manual_seed(0)
    with torch.device(device):
        models = {
            "unet": diffusers.UNet2DConditionModel.from_config(read("unet/config.json")),
            "vae": diffusers.AutoencoderKL.from_config(read("vae/config.json")),
            "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(config_dir / "text_encoder")),
        }
    for name, model in models.items():
        model.to(torch.float16).save_pretrained(dest / name)
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    (dest / "tokenizer").mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ROOT / "minidiff/data/clip-tokenizer" / name, dest / "tokenizer")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(config_dir / "tokenizer" / name, dest / "tokenizer")
    (dest / "scheduler").mkdir(exist_ok=True)
    shutil.copy(config_dir / "scheduler/scheduler_config.json", dest / "scheduler")
    shutil.copy(config_dir / "model_index.json", dest)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"wrote a random {config_dir.name} checkpoint (float16, built on {device}) to {dest}: "
          f"{size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s")


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", help="folder for suite.log, summary.md and each step's output")
    parser.add_argument("--dry-run", action="store_true", help="validate every step's command; run none (CPU)")
    parser.add_argument("--budget-s", type=float, default=480, help="overall budget of all steps, seconds")
    parser.add_argument("--groups", type=int, nargs="+", choices=sorted(GROUPS), help="run only these groups (1-6); write into another OUT_DIR, the files are numbered 01.. again")
    parser.add_argument("--work-dir", default=None,
                        help="where the random checkpoints are written (default: a temporary folder, removed at the end)")
    parser.add_argument("--write-random-checkpoint", nargs=2, metavar=("CONFIG_DIR", "DEST"),
                        help="the prep step alone: write a random full-size checkpoint from CONFIG_DIR into DEST")
    args = parser.parse_args(argv)

    if args.write_random_checkpoint:
        config_dir, dest = args.write_random_checkpoint
        write_random_checkpoint((ROOT / config_dir) if not Path(config_dir).is_absolute() else Path(config_dir), Path(dest))
        return 0
    if args.out_dir is None:
        parser.error("OUT_DIR is required")

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import describe_machine

    cuda = torch.cuda.is_available()
    if not args.dry_run and not cuda:
        print("benchmarks/gpu_suite.py needs a CUDA GPU and this machine has none; use --dry-run to check the plan on a CPU.")
        return 2
    header = describe_machine("cuda" if cuda else "cpu")
    print(header)
    temporary = args.work_dir is None
    work = Path(args.work_dir or Path(tempfile.gettempdir()) / f"minidiff_gpu_suite_{os.getpid()}")
    steps = [s for s in plan(work) if args.groups is None or s.group in args.groups]
    try:
        return run_suite(steps, Path(args.out_dir), args.budget_s, args.dry_run, header)
    finally:
        if temporary and work.exists():
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
