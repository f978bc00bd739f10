"""Training checkpoints as diffusers' training scripts lay them out, written so a crash never costs
the last good one.

    output_dir/
        checkpoint-500/
            state.pt        everything a resume needs: step, model(s), optimizer, lr schedule,
                            the random generators, the data position (one torch.save'd dict)
            complete.json   {"step": 500, "bytes": ..., "sha256": ...}: written last; a folder
                            without it, or whose state.pt does not match it, is not a checkpoint
        checkpoint-1000/
        ...

Writing (`save_checkpoint`): everything goes into a hidden temporary folder next to the
checkpoints, is flushed to disk, and only then renamed to `checkpoint-<step>` (a rename within
one file system is atomic). Old checkpoints beyond `total_limit` are deleted *after* the new one
is in place, so at every moment the newest complete checkpoint on disk is a good one.

Reading (`load_checkpoint`): "latest" picks the highest step among the `checkpoint-*` folders;
a folder that is partial or whose state.pt fails its recorded size or SHA-256 is refused with one
sentence that names it (and the older good checkpoint to resume from instead), never silently
skipped: a user who asked for the latest state should know it was lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from minidiff.errors import InputError

STATE = "state.pt"
COMPLETE = "complete.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def to_cpu(obj):
    """A copy of a (nested) state dict with every tensor on the CPU; CPU tensors are not copied.
    Checkpoints hold CPU tensors only, so a run resumes on any device."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_steps(output_dir) -> dict[int, Path]:
    """{step: folder} of every folder named checkpoint-<step> in output_dir (complete or not)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return {}
    found = {}
    for entry in output_dir.iterdir():
        m = _NAME.match(entry.name)
        if m and entry.is_dir():
            found[int(m.group(1))] = entry
    return dict(sorted(found.items()))


def check_checkpoint(folder: Path) -> str | None:
    """None if `folder` is a complete checkpoint, else the reason it is not (one phrase)."""
    state, complete = folder / STATE, folder / COMPLETE
    if not complete.is_file():
        return f"has no {COMPLETE} (it was not finished)"
    try:
        record = json.loads(complete.read_text())
    except (OSError, json.JSONDecodeError):
        return f"has an unreadable {COMPLETE}"
    if not state.is_file():
        return f"has no {STATE}"
    if state.stat().st_size != record.get("bytes"):
        return f"has a {STATE} of {state.stat().st_size} bytes where {record.get('bytes')} were written"
    if _sha256(state) != record.get("sha256"):
        return f"has a {STATE} whose SHA-256 does not match the one recorded when it was written"
    return None


def save_checkpoint(output_dir, step: int, state: dict, total_limit: int | None = None) -> Path:
    """Write `state` as output_dir/checkpoint-<step> (atomically), then keep only the newest
    `total_limit` checkpoints (None: keep all). Returns the checkpoint folder."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=output_dir))
    try:
        with open(tmp / STATE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        record = {"step": step, "bytes": (tmp / STATE).stat().st_size, "sha256": _sha256(tmp / STATE)}
        (tmp / COMPLETE).write_text(json.dumps(record) + "\n")
        if final.exists():  # the same step saved again (a resumed run): swap, then drop the old one
            old = output_dir / f".checkpoint-{step}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if total_limit is not None:
        steps = [s for s, folder in checkpoint_steps(output_dir).items() if check_checkpoint(folder) is None]
        for s in steps[:-total_limit] if total_limit > 0 else []:
            shutil.rmtree(output_dir / f"checkpoint-{s}")
    return final


def resolve_checkpoint(output_dir, which: str) -> Path:
    """The checkpoint folder that `--resume_from_checkpoint which` names: "latest" (the highest
    step in output_dir), a folder name inside output_dir, or a path. Refused with a sentence when
    it is missing, partial or corrupt."""
    output_dir = Path(output_dir)
    if which == "latest":
        found = checkpoint_steps(output_dir)
        if not found:
            raise InputError(f"--resume_from_checkpoint latest: {str(output_dir)!r} holds no checkpoint-<step> folder "
                             f"to resume from.")
        folder = found[max(found)]
    else:
        folder = Path(which) if Path(which).is_dir() else output_dir / which
        if not folder.is_dir():
            raise InputError(f"--resume_from_checkpoint {which}: no such checkpoint folder.")
    problem = check_checkpoint(folder)
    if problem is not None:
        good = [s for s, f in checkpoint_steps(folder.parent).items() if f != folder and check_checkpoint(f) is None]
        hint = (f"; the newest good one is checkpoint-{max(good)} (pass --resume_from_checkpoint checkpoint-{max(good)})"
                if good else "; there is no good one to resume from instead")
        raise InputError(f"Checkpoint {str(folder)!r} {problem}, so it cannot be resumed{hint}.")
    return folder


def load_checkpoint(folder) -> dict:
    """The state dict saved in a checkpoint folder (checked by resolve_checkpoint first)."""
    return torch.load(Path(folder) / STATE, map_location="cpu", weights_only=True)  # tensors and plain data only
