"""What the three shapes-world training loops share: resume, learning rate, checkpoints, time budget, device.

Each loop (train_vae.py, train_clip.py, train_unet.py) keeps its own data, forward pass and loss
in plain sight and hands the rest to one `TrainingRun`:

    run = TrainingRun("vae", ckpt_dir, {"model": vae}, opt, g, steps, lr, warmup, ckpt_every, resume=...)
    batches = scene_batches(seed, B, start=run.start * B)   # scene i has its own generator: the
    for step in run:                                        # step count is all a resume needs
        loss = ...                                          # the loop's own forward pass
        run.optimize(step, loss, max_grad_norm=1.0)         # lr schedule, backward, clip, AdamW step
        if run.end_step(step, loss.item(), loss=...):       # history, checkpoint, time budget
            break
    run.finish()                                            # <ckpt_dir>/<name>_history.json

A checkpoint `<ckpt_dir>/<name>.pt` holds every module's state dict under its key, the optimizer,
the step, the loss history and (for loops that draw random numbers) the torch generator's state.
It is written every `ckpt_every` steps and when the run stops (last step or `max_minutes` spent):
first to a temporary file, then os.replace, so a run killed mid-write never leaves a half-written
checkpoint. `resume=True` continues from it: model, optimizer, generator and data position are all
restored, so 2 steps + resume to 3 gives the same weights as 3 steps in one go.

Devices (`device="cuda"` in each loop; `training_device` checks the name first): the models and
the optimizer state live on the device, and so do the batches, but every random number is still
drawn by a CPU torch.Generator and moved there afterwards. A run's random draws are then the same
on every machine, and the CPU path is exactly what it was before devices existed. Checkpoints hold
CPU tensors only (`to_cpu`), so a run started on a GPU resumes on a CPU and the other way round
(load_state_dict copies onto wherever the model is). GPU arithmetic rounds differently (other
kernels, other summation orders), so a GPU run is reproducible in its statistics, not bit for bit.

References: Loshchilov & Hutter 2017 (SGDR: cosine learning-rate decay), 2019 (AdamW).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from minidiff.training.checkpoints import to_cpu
from minidiff.validation import check_device


def training_device(device) -> torch.device:
    """The device a loop trains on, checked before any work starts: cpu or cuda."""
    return check_device(device, allowed=("cpu", "cuda"))


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save to `path.tmp`, then os.replace: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


def lr_at(step: int, lr: float, warmup: int, total: int | None = None, floor: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then (when `total` is given) a cosine decay from lr to
    floor * lr at step `total` (SGDR, Loshchilov & Hutter 2017, without restarts)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if total is None or total <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / (total - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class TrainingRun:
    """One run of one loop: iterate it for the steps still to do, `optimize` and `end_step` each."""

    def __init__(self, name: str, ckpt_dir, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                 generator: torch.Generator | None, steps: int, lr: float, warmup: int, ckpt_every: int,
                 resume: bool = False, max_minutes: float | None = None, progress: bool = True):
        self.name, self.path = name, Path(ckpt_dir) / f"{name}.pt"
        self.modules, self.optimizer, self.generator = modules, optimizer, generator
        self.steps, self.lr, self.warmup, self.ckpt_every = steps, lr, warmup, ckpt_every
        self.max_minutes, self.progress = max_minutes, progress
        self.history: list = []  # [[step, loss, seconds since start], ...]
        self.start = self._resume() if resume else 0  # the first step still to do

    def _resume(self) -> int:
        state = load_checkpoint(self.path)
        if state is None:
            print(f"[{self.name}] no checkpoint at {self.path}; starting from step 0")
            return 0
        for key, module in self.modules.items():
            module.load_state_dict(state[key])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.generator is not None:
            self.generator.set_state(state["rng"])
        self.history[:] = state.get("history", [])
        print(f"[{self.name}] resumed from {self.path} at step {state['step']}")
        return state["step"]

    def __iter__(self):
        """The steps start, ..., steps - 1 behind a tqdm bar; the time budget starts now."""
        self.t_start = time.time()
        self.bar = tqdm(range(self.start, self.steps), desc=self.name, disable=not self.progress,
                        initial=self.start, total=self.steps)
        return iter(self.bar)

    def optimize(self, step: int, loss: torch.Tensor, max_grad_norm: float | None = None) -> None:
        """Set this step's learning rate (`lr_at`), backpropagate, clip the gradient norm, step."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.lr, self.warmup, self.steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], max_grad_norm)
        self.optimizer.step()

    def end_step(self, step: int, value: float, **postfix: str) -> bool:
        """Log `value` (the loss the history records) and `postfix` (the bar's); write a checkpoint
        every `ckpt_every` steps and when the run stops. True when it stops: last step or time spent."""
        self.bar.set_postfix(**postfix)
        seconds = time.time() - self.t_start
        self.history.append([step + 1, round(value, 5), round(seconds, 1)])
        done = step + 1 == self.steps or (self.max_minutes is not None and seconds > 60 * self.max_minutes)
        if (step + 1) % self.ckpt_every == 0 or done:
            self._save(step + 1)
        return done

    def _save(self, step: int) -> None:
        # On the CPU whatever device trained (to_cpu), so that any machine can resume the run.
        state = {key: to_cpu(module.state_dict()) for key, module in self.modules.items()}
        state.update(optimizer=to_cpu(self.optimizer.state_dict()), step=step, history=self.history)
        if self.generator is not None:
            state["rng"] = self.generator.get_state()
        save_checkpoint(state, self.path)

    def finish(self) -> None:
        """The loss curve as `<ckpt_dir>/<name>_history.json`: [[step, loss, seconds since start], ...]."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.path.parent / f"{self.name}_history.json").write_text(json.dumps(self.history))
