"""Noise schedules and samplers: DDPM, DDIM, DDIM inversion and UnCLIP (see each file's header)."""

from minidiff.schedulers.base import Scheduler, SchedulerConfig, SchedulerOutput
from minidiff.schedulers.ddim import DDIMInverseScheduler, DDIMScheduler
from minidiff.schedulers.ddpm import DDPMScheduler
from minidiff.schedulers.unclip import UnCLIPScheduler

__all__ = [
    "DDIMInverseScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "UnCLIPScheduler",
]
