"""The loop `train-prior` and `train-decoder` share: optimizer steps, EMA, checkpoints, resume.

What differs between the two trainers is one micro-batch's loss (the prior predicts a clean
image embedding, the decoder UNet the noise on a MoVQ latent). Everything around it is here,
once:

    for step in range(start, max_train_steps):
        for _ in range(gradient_accumulation_steps):
            loss = micro_batch(generator) / gradient_accumulation_steps    (the trainer's own)
            loss.backward()                     (scaled by a GradScaler with fp16 autocast)
        clip the gradient norm to max_grad_norm; AdamW step; learning-rate schedule step
        EMA: ema <- ema + (1 - decay) (model - ema), decay = min(ema_decay, (1 + s) / (10 + s))
        every checkpointing_steps, at the end, and when stopped early: checkpoint-<step>/

AdamW with diffusers' script defaults and its learning-rate schedules (`lr_factor`). All the
randomness of the data (batches, timesteps, noise, dropout) comes from one CPU torch.Generator
that the micro-batch function draws from and that the checkpoint saves, so stopping and resuming
gives the uninterrupted run's weights bit for bit (on the CPU). Checkpoints are
checkpoints.py's folders: atomic, `checkpoints_total_limit`, "latest", corrupt ones refused.
A loss log (output_dir/loss_log.json) is written with every checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from minidiff.errors import InputError
from minidiff.loading import write_json
from minidiff.validation import check_choice, check_number, check_positive_int
from minidiff.training.checkpoints import (
    checkpoint_steps,
    load_checkpoint,
    save_checkpoint,
    to_cpu,
)

LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
MIXED_PRECISION = ("no", "fp16", "bf16")


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of the peak, diffusers'
    get_scheduler names: constant (no warmup), constant_with_warmup, linear and cosine (warmup,
    then down to 0 at `total`)."""
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup  # step 0 already takes a small step (LambdaLR after one .step())
    if schedule == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def add_loop_arguments(arg, lr_warmup_steps: int = 0) -> None:
    """The command-line arguments of the loop, shared by train-prior and train-decoder (diffusers'
    scripts' names and defaults; the decoder script warms up for 500 steps, the prior's not).
    `arg(name, **kw)` adds one argument (the callers add --snake_case and --kebab-case)."""
    arg("train_batch_size", type=int, default=1)
    arg("max_train_steps", type=int, default=1000)
    arg("learning_rate", type=float, default=1e-4)
    arg("lr_scheduler", default="constant", choices=list(LR_SCHEDULES))
    arg("lr_warmup_steps", type=int, default=lr_warmup_steps)
    arg("adam_beta1", type=float, default=0.9)
    arg("adam_beta2", type=float, default=0.999)
    arg("adam_weight_decay", type=float, default=0.0)
    arg("adam_epsilon", type=float, default=1e-8)
    arg("max_grad_norm", type=float, default=1.0)
    arg("snr_gamma", type=float, default=None, help="Min-SNR gamma (5.0 recommended); default: plain MSE")
    arg("gradient_accumulation_steps", type=int, default=1)
    arg("mixed_precision", default="no", choices=list(MIXED_PRECISION))
    arg("checkpointing_steps", type=int, default=500)
    arg("checkpoints_total_limit", type=int, default=None)
    arg("resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder')
    arg("use_ema", action="store_true")
    arg("ema_decay", type=float, default=0.9999, help="with --use_ema: the EMA decay (default 0.9999)")
    arg("seed", type=int, default=0)
    arg("device", default="cpu")
    arg("max_minutes", type=float, default=None, help="stop with a checkpoint after this much wall time")


def check_loop_arguments(*, train_batch_size, max_train_steps, gradient_accumulation_steps, checkpointing_steps,
                         checkpoints_total_limit, learning_rate, lr_warmup_steps, max_grad_norm, snr_gamma,
                         lr_scheduler, mixed_precision, device) -> torch.device:
    """The loop's arguments checked before any work (one sentence each); returns the device."""
    for name, value in (("--train_batch_size", train_batch_size), ("--max_train_steps", max_train_steps),
                        ("--gradient_accumulation_steps", gradient_accumulation_steps),
                        ("--checkpointing_steps", checkpointing_steps)):
        check_positive_int(name, value)
    if checkpoints_total_limit is not None:
        check_positive_int("--checkpoints_total_limit", checkpoints_total_limit)
    check_number("--learning_rate", learning_rate, low=0, low_open=True, why="the peak learning rate")
    check_number("--lr_warmup_steps", lr_warmup_steps, low=0, why="steps of warmup")
    check_number("--max_grad_norm", max_grad_norm, low=0, low_open=True, why="the gradient clipping norm")
    if snr_gamma is not None:
        check_number("--snr_gamma", snr_gamma, low=0, low_open=True, why="Min-SNR's gamma")
    check_choice("--lr_scheduler", lr_scheduler, LR_SCHEDULES)
    check_choice("--mixed_precision", mixed_precision, MIXED_PRECISION)
    device = torch.device(device)
    if mixed_precision == "fp16" and device.type != "cuda":
        raise InputError("--mixed_precision fp16 needs a CUDA device (fp16 autocast with loss scaling); use bf16 on a CPU.")
    return device


def check_output_dir(output_dir: Path, resume: str | None) -> None:
    """Nothing a user owns is overwritten: a new run needs a folder without a finished pipeline
    or another run's checkpoints."""
    if output_dir.is_file():
        raise InputError(f"--output_dir {str(output_dir)!r} is a file; give a folder.")
    if resume is None and output_dir.is_dir():
        if checkpoint_steps(output_dir):
            raise InputError(f"--output_dir {str(output_dir)!r} holds checkpoints of an earlier run; pass "
                             f"--resume_from_checkpoint latest to continue it, or choose another folder.")
        if (output_dir / "model_index.json").exists():
            raise InputError(f"--output_dir {str(output_dir)!r} already holds a trained pipeline; choose another folder.")


class Trainer:
    """One model's optimisation: `Trainer(...).run(micro_batch)` -> summary dict.

    `name` is the model's key in the checkpoint ("prior", "unet"). `kept` is what validation and
    the exported folder use: the EMA when `use_ema`, else the model itself."""

    def __init__(self, name: str, model: nn.Module, output_dir: Path, *, max_train_steps: int,
                 learning_rate: float, lr_scheduler: str = "constant", lr_warmup_steps: int = 0,
                 adam_beta1: float = 0.9, adam_beta2: float = 0.999, adam_weight_decay: float = 0.0,
                 adam_epsilon: float = 1e-8, max_grad_norm: float = 1.0, gradient_accumulation_steps: int = 1,
                 mixed_precision: str = "no", checkpointing_steps: int = 500,
                 checkpoints_total_limit: int | None = None, use_ema: bool = False, ema_decay: float = 0.9999,
                 seed: int = 0, device: torch.device = torch.device("cpu"), desc: str = "train",
                 progress: bool = True):
        self.name, self.model, self.output_dir = name, model, Path(output_dir)
        self.max_train_steps, self.max_grad_norm = max_train_steps, max_grad_norm
        self.accumulation, self.checkpointing_steps = gradient_accumulation_steps, checkpointing_steps
        self.total_limit, self.ema_decay, self.device = checkpoints_total_limit, ema_decay, device
        self.desc, self.progress = desc, progress
        self.ema = copy.deepcopy(model).requires_grad_(False).eval() if use_ema else None
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.trainable, lr=learning_rate, betas=(adam_beta1, adam_beta2),
                                     eps=adam_epsilon, weight_decay=adam_weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(lr_scheduler, s, int(lr_warmup_steps), max_train_steps))
        self.generator = torch.Generator().manual_seed(seed)  # all of the data's randomness
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)
        self.scaler = torch.amp.GradScaler("cuda") if mixed_precision == "fp16" else None
        self.history: list[float] = []
        self.step = 0

    @property
    def kept(self) -> nn.Module:
        return self.ema if self.ema is not None else self.model

    def autocast(self):
        """The mixed-precision context a micro-batch runs its model under."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    # -- checkpoints -----------------------------------------------------------------------------

    def resume(self, folder: Path) -> None:
        state = load_checkpoint(folder)
        self.model.load_state_dict(state[self.name])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["lr_scheduler"])
        self.generator.set_state(state["generator"])
        self.history, self.step = state["history"], state["step"]

    def checkpoint(self) -> None:
        state = {"step": self.step, self.name: self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "lr_scheduler": self.schedule.state_dict(), "generator": self.generator.get_state(),
                 "history": self.history}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        save_checkpoint(self.output_dir, self.step, to_cpu(state), self.total_limit)
        write_json({"step": self.step, "loss": self.history}, self.output_dir / "loss_log.json")

    # -- the loop --------------------------------------------------------------------------------

    def run(self, micro_batch: Callable[[torch.Generator], torch.Tensor], *, max_minutes: float | None = None,
            stop_after: int | None = None, validate: Callable[[], dict] | None = None,
            validation_steps: int | None = None) -> dict:
        """Optimise until max_train_steps (or `max_minutes` of wall time, or `stop_after` steps of
        this call: then with a checkpoint, as a killed run would leave). `micro_batch(g)` returns
        one micro-batch's mean loss; `validate()` (every `validation_steps`) a dict to print."""
        t0, first = time.time(), self.step
        bar = tqdm(total=self.max_train_steps, initial=self.step, desc=self.desc, disable=not self.progress)
        self.model.train()
        while self.step < self.max_train_steps:
            total = 0.0
            for _ in range(self.accumulation):
                loss = micro_batch(self.generator) / self.accumulation
                (self.scaler.scale(loss) if self.scaler else loss).backward()
                total += loss.item()
            if self.scaler:
                self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
            self.scaler.step(self.opt) if self.scaler else self.opt.step()
            if self.scaler:
                self.scaler.update()
            self.schedule.step()
            self.opt.zero_grad(set_to_none=True)
            if self.ema is not None:  # EMA with the usual warmup (diffusers' EMAModel without use_ema_warmup)
                decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))
                with torch.no_grad():
                    for p_ema, p in zip(self.ema.parameters(), self.model.parameters()):
                        p_ema.lerp_(p, 1 - decay)
            self.step += 1
            self.history.append(total)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{self.schedule.get_last_lr()[0]:.2e}")
            out_of_time = max_minutes is not None and time.time() - t0 > 60 * max_minutes
            stopping = out_of_time or (stop_after is not None and self.step - first >= stop_after)
            if self.step % self.checkpointing_steps == 0 or self.step == self.max_train_steps or stopping:
                self.checkpoint()
            if validate is not None and validation_steps and self.step % validation_steps == 0 \
                    and self.step < self.max_train_steps:
                tqdm.write(json.dumps({"step": self.step, **validate()}))
            if stopping:
                break
        bar.close()
        recent = self.history[-100:]
        return {"step": self.step, "max_train_steps": self.max_train_steps, "seconds": time.time() - t0,
                "loss_last_100": sum(recent) / max(1, len(recent)), "finished": self.step >= self.max_train_steps}


def save_pipeline(output_dir: Path, pipe) -> None:
    """output_dir as the pipeline's folder (diffusers' layout), written next to it first and moved
    in part by part (model_index.json, one folder per component) when complete; the run's
    checkpoints and logs beside them stay."""
    import shutil
    import tempfile

    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pipeline.", dir=output_dir) as tmp:
        staged = Path(tmp) / "pipeline"
        pipe.save_pretrained(staged)
        for part in sorted(staged.iterdir()):
            target = output_dir / part.name
            if target.is_dir():
                shutil.rmtree(target)
            part.replace(target)
