"""benchmarks/gpu_suite.py on a CPU: its --dry-run (every step's command exists and parses), the
validation catching a flag the target script lacks, and the runner's budget, timeout and
prerequisite rules on steps that need no GPU."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
GROUP_ORDER = ["kernel tests", "attention benchmark", "minidiff check, full size", "offload", "NF4",
               "UNet step and DiffEdit"]


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["gpu_suite"]


def test_dry_run_plans_all_six_groups_in_order(tmp_path):
    out = tmp_path / "gpu"
    run = subprocess.run([sys.executable, str(SUITE), str(out), "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"dry run failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    assert (out / "suite.log").stat().st_size > 0
    summary = (out / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| 0") or line.startswith("| 1")]
    assert len(rows) >= 6 and all("| planned |" in row for row in rows), summary
    # The groups, in the order of importance, each with at least one step.
    positions = [summary.find(f"| {i} {name} |") for i, name in enumerate(GROUP_ORDER, 1)]
    assert all(p >= 0 for p in positions), (positions, summary)
    assert positions == sorted(positions), summary
    for needed in ("tests/test_flash_attention.py", "benchmarks/attention.py --sweep", "minidiff.cli check",
                   "--dtype bfloat16", "--only offload --device cuda", "--only nf4 --device cuda",
                   "benchmarks/unet_step.py", "benchmarks/diffedit.py"):
        assert needed in summary, needed
    assert "device: cpu" in summary  # the machine header


def test_validation_reports_a_flag_the_script_lacks(suite, tmp_path):
    bad = suite.Step("bad", 2, ["benchmarks/attention.py", "--images", "512", "--no-such-flag"], cap_s=10, expect="x")
    good = suite.Step("good", 1, ["-c", "print('done')"], cap_s=10, expect="done")
    assert suite.run_suite([good, bad], tmp_path, budget_s=60, dry_run=True, header="device: test") == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "| good | planned |" in summary and "| bad | invalid |" in summary, summary
    problems = [line for line in summary.splitlines() if line.startswith("- 02_bad:")]
    assert len(problems) == 1 and "--no-such-flag" in problems[0], summary
    # A value that argparse refuses (not in --dtypes' choices) and a missing script are caught too.
    assert suite.validate(suite.Step("bad", 2, ["benchmarks/attention.py", "--dtypes", "int8"], 10, "x"))
    assert "no such file" in suite.validate(suite.Step("bad", 2, ["benchmarks/nope.py"], 10, "x"))[0]
    # The good version of the same command passes.
    assert suite.validate(suite.Step("ok", 2, ["benchmarks/attention.py", "--images", "512"], 10, "x")) == []


def test_budget_timeouts_and_prerequisites(suite, tmp_path):
    py = lambda code: ["-c", code]  # noqa: E731
    steps = [
        suite.Step("quick", 1, py("print('done')"), cap_s=30, min_s=1, expect="done"),
        suite.Step("silent", 1, py("pass"), cap_s=30, min_s=1, expect="done"),  # exit 0 without its proof
        suite.Step("crash", 2, py("raise SystemExit(3)"), cap_s=30, min_s=1, expect="done"),
        suite.Step("prep", 3, py("raise SystemExit(1)"), cap_s=30, min_s=1, expect="done"),
        suite.Step("after_prep", 3, py("print('done')"), cap_s=30, min_s=1, expect="done", needs="prep"),
        suite.Step("slow", 4, py("import time; print('started', flush=True); time.sleep(60)"),
                   cap_s=2, min_s=1, expect="done"),
        suite.Step("no_time_left", 5, py("print('done')"), cap_s=30, min_s=600, expect="done"),
    ]
    rc = suite.run_suite(steps, tmp_path, budget_s=120, dry_run=False, header="device: test")
    assert rc == 1
    summary = (tmp_path / "summary.md").read_text()
    expected = {"quick": "ok", "silent": "failed", "crash": "failed", "prep": "failed",
                "after_prep": "skipped-prerequisite-failed", "slow": "timed-out", "no_time_left": "skipped-for-time"}
    for name, status in expected.items():
        assert f"| {name} | {status} |" in summary, (name, summary)
    assert (tmp_path / "06_slow.txt").read_text() == "started\n"  # output before the timeout is kept
    log = (tmp_path / "suite.log").read_text()
    assert "SystemExit(3)" in log and "exit code 3" in log
