"""Group offload: groups of consecutive blocks visit the accelerator together, optionally
prefetched on a side stream while the previous group computes.

    apply_group_offloading(module_or_pipe, device, num_blocks_per_group, use_stream=False)

Groups of `num_blocks_per_group` consecutive blocks (the UNet's down / mid / up blocks, the VAE's,
CLIP's encoder layers) move together for their forward; the small modules outside the blocks
(conv_in, embeddings, norms) move one by one as in sequential offload (sequential.py). Device
memory for weights: the largest group (two with prefetch). Transfers: every group once per UNet
step.

Prefetch (use_stream=True on CUDA): the next group is copied from pinned CPU memory on a side
stream while the current one computes, so the copy hides behind compute and at most two groups
are on the device. The compute stream waits for the copy with an event (unit.py's wait_ready).
On device="cpu" the same prefetch schedule runs with synchronous copies (there is no copy engine
to overlap with): a rehearsal for tests.

References: diffusers' hooks/group_offloading.py (apply_group_offloading, ModuleGroup); PyTorch
docs on CUDA streams, events and pinned memory.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from minidiff.errors import InputError
from minidiff.memory.offload.install import (
    OffloadHandle,
    join,
    offload_targets,
    to_device,
)
from minidiff.memory.offload.sequential import add_leaf_units
from minidiff.memory.offload.unit import Unit, has_weights


def block_runs(root: nn.Module) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
    """The model's blocks, as runs of consecutive blocks: search breadth-first for the shallowest
    level that has a ModuleList (or Sequential) with weights. Each such list gives one run (its
    children: the UNet's down_blocks.0, .1, ...; CLIP's encoder.layers.0, ...), and each other
    module at that level that has weights and children gives a run of its own (the UNet's
    mid_block and time_embedding, the VAE's mid blocks). Leaves at that level and everything above
    it (conv_in, norms, quant_conv) are not blocks."""
    level = [("", root)]
    while level:
        if any(isinstance(m, (nn.ModuleList, nn.Sequential)) and has_weights(m) for _, m in level):
            runs = []
            for name, m in level:
                if isinstance(m, (nn.ModuleList, nn.Sequential)):
                    blocks = [(join(name, k), c) for k, c in m.named_children() if has_weights(c)]
                    if blocks:
                        runs.append((name, blocks))
                elif has_weights(m) and any(True for _ in m.children()):
                    runs.append((name, [(name, m)]))
            return runs
        level = [(join(name, k), c) for name, m in level for k, c in m.named_children()]
    return []


class _GroupSchedule:
    """Onloads a group when one of its blocks starts and offloads it after its last block.

    Prefetch: the schedule learns, for each group, which group ran after it last time (in a
    diffusion loop: the next block, and after the last up block the first group of the next
    step). When a group starts, its successor is copied on the side stream. Before that, every
    other resident group is sent home, so at most two groups (current + prefetched) are on the
    device, and a wrong guess (a group whose successor changed) costs one wasted copy, never
    correctness: a group that is not resident when it starts is onloaded synchronously."""

    def __init__(self, prefetch: bool, stream: torch.cuda.Stream | None):
        self.prefetch, self.stream = prefetch, stream
        self.groups: list[Unit] = []
        self.current: Unit | None = None
        self.previous: Unit | None = None
        self.successor: dict[int, Unit] = {}

    @torch.compiler.disable
    def enter(self, unit: Unit, module, args, kwargs):
        if self.current is not unit:
            if self.previous is not None and self.previous is not unit:
                self.successor[id(self.previous)] = unit  # learn the execution order
            self.current = self.previous = unit
            for other in self.groups:
                if other is not unit and other.resident:
                    other.offload()  # a stale prefetch, or a group whose last block did not run
            if unit.resident:
                unit.wait_ready()  # prefetched: compute waits for the side-stream copy (GPU side)
            else:
                unit.onload()  # CPU -> device, synchronously on the compute stream
            nxt = self.successor.get(id(unit))
            if self.prefetch and nxt is not None and nxt is not unit and not nxt.resident:
                # CPU (pinned) -> device on the side stream, overlapping with this group's compute.
                # On the CPU rehearsal (stream None) the copy is synchronous: same schedule, no overlap.
                nxt.onload(stream=self.stream, prefetch=True)
        return to_device(args, kwargs, unit.device)

    @torch.compiler.disable
    def exit(self, unit: Unit, last: bool, module, args, output):
        if last:
            unit.offload()  # the group's last block is done: device copies dropped
            self.current = None
        return None


def _group_name(run_name: str, blocks: list, start: int, size: int) -> str:
    """"mid_block" for a lone block, "down_blocks[1]" for one block of a run, "up_blocks[0-2]"."""
    if len(blocks) == 1 and blocks[0][0] == run_name:
        return run_name
    last = start + size - 1
    return f"{run_name}[{start}]" if start == last else f"{run_name}[{start}-{last}]"


def _add_groups(handle: OffloadHandle, schedule: _GroupSchedule, cname: str, comp: nn.Module, runs,
                num_blocks_per_group: int, pin: bool) -> None:
    """One group unit per `num_blocks_per_group` consecutive blocks of each run, hooked on every
    block of the group; per-module (leaf) units for the rest of the component."""
    in_blocks: set[int] = set()
    for run_name, blocks in runs:
        for start in range(0, len(blocks), num_blocks_per_group):
            mods = [m for _, m in blocks[start:start + num_blocks_per_group]]
            gname = _group_name(run_name, blocks, start, len(mods))
            unit = handle.add_unit(Unit(join(cname, gname), "group", mods, handle.device, pin=pin))
            schedule.groups.append(unit)
            for m in mods:
                in_blocks.add(id(m))
                handle.hook(m, pre=functools.partial(schedule.enter, unit),
                            post=functools.partial(schedule.exit, unit, m is mods[-1]))
    add_leaf_units(handle, cname, comp, skip=frozenset(in_blocks))


def apply_group_offloading(target, device="cuda", num_blocks_per_group: int = 1,
                           use_stream: bool = False) -> OffloadHandle:
    """Offload groups of `num_blocks_per_group` consecutive blocks together (see block_runs for
    what a block is); the modules outside the blocks get sequential (per-module) hooks.
    `target`: one nn.Module, or a pipeline (every component; the pipeline's loop then runs on
    `device`). use_stream=True: prefetch the next group while the current one computes, from
    pinned CPU memory on a side CUDA stream; on device='cpu' the same prefetch schedule runs with
    synchronous copies (a rehearsal for tests: nothing can overlap)."""
    if not isinstance(num_blocks_per_group, int) or num_blocks_per_group < 1:
        raise InputError(f"num_blocks_per_group must be a positive integer, got {num_blocks_per_group!r}.")
    components, pipe, device = offload_targets(target, device)
    if use_stream and device.type not in ("cuda", "cpu"):
        raise InputError(f"use_stream=True needs a CUDA device (a side stream and pinned memory); got {device}.")
    all_runs = [block_runs(comp) for _, comp in components]
    for (_, comp), runs in zip(components, all_runs):
        if not runs:
            raise InputError(f"Found no blocks in {type(comp).__name__}: group offloading needs a ModuleList of "
                             "blocks (like the UNet's down_blocks or CLIP's encoder.layers).")
    stream = torch.cuda.Stream(device) if use_stream and device.type == "cuda" else None
    handle = OffloadHandle("group", device)
    # One schedule for all components: the learned order runs across them (the last UNet step
    # prefetches the VAE decoder's first group), and the two-groups bound holds for the pipeline.
    schedule = _GroupSchedule(prefetch=use_stream, stream=stream)
    with handle.installing(components, pipe):
        for (cname, comp), runs in zip(components, all_runs):
            _add_groups(handle, schedule, cname, comp, runs, num_blocks_per_group, pin=stream is not None)
    return handle
