"""Noise schedules and samplers: DDPM, DDIM and DDIM inversion (see each file's header)."""

from minidiff.schedulers.base import Scheduler, SchedulerConfig, SchedulerOutput
from minidiff.schedulers.ddim import DDIMInverseScheduler, DDIMScheduler
from minidiff.schedulers.ddpm import DDPMScheduler

__all__ = [
    "DDIMInverseScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
]
