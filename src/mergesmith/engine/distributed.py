"""`merge --ray`: the output's shards written by workers (Ray actors) into the driver's folder.

The driver plans (headers only: it holds no weights), holds the output folder and its lock,
hands each unfinished shard to a worker, and records each shard in the manifest as it comes
back, so that `--resume` after any failure redoes only the shards not recorded. Then it writes
the index, config, tokenizer and card and renames the folder into place, as a local merge does.
A worker builds the same plan from the same recipe and writes whole shards with the engine's
own stream, so the bytes are a local merge's, whichever worker wrote which shard.

Workers on other machines need the models and the output on a filesystem shared with the
driver: a worker that sees other inputs (paths, sizes, times) or no output folder refuses.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mergesmith.engine.plan import Plan, build_plan
from mergesmith.engine.run import stream
from mergesmith.errors import MergesmithError, OutputError
from mergesmith.io import OutputFolder
from mergesmith.io.output import ShardView
from mergesmith.parallel import make_executor
from mergesmith.recipe import Recipe

SHARED_HINT = "merge --ray across machines needs the models and the output on a filesystem " \
              "every Ray node shares, at the same paths"


@dataclass(frozen=True)
class ShardJob:
    """What a worker needs to plan the driver's merge again and write its shards."""

    recipe: Recipe
    plan_options: dict[str, Any]  # build_plan's keywords, as the driver planned
    device: str
    chunk_bytes: int
    partial: str  # the driver's `.partial` folder
    fingerprint: str
    cwd: str  # relative model paths resolve as in the driver
    env: dict[str, str]  # the hub cache and mergesmith's own settings


def refuse(the_plan: Plan, side_methods, device: torch.device) -> None:
    """What --ray does not do yet, refused before anything is written."""
    if device.type != "cpu":
        raise MergesmithError(f"merge --ray computes on the workers' CPUs, not on {device}",
                              hint="drop --device, or merge on the GPU without --ray")
    if the_plan.program is not None:
        raise MergesmithError(f"--ray spreads recipe merges; {the_plan.program.title} is built "
                              "on one machine", hint="run it without --ray")
    if the_plan.method.name in side_methods:
        raise MergesmithError(f"merge --ray: {the_plan.method.name} writes side outputs beside "
                              "the weights, which --ray does not spread over workers",
                              hint="merge it without --ray")


def shard_job(the_plan: Plan, output: OutputFolder, plan_options: dict[str, Any],
              device: torch.device, chunk_bytes: int) -> ShardJob:
    env = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "MERGESMITH_"))}
    return ShardJob(the_plan.recipe, {**plan_options, "seed": the_plan.seed}, str(device),
                    chunk_bytes, str(output.partial), output.fingerprint, os.getcwd(), env)


class ShardWorker:
    """One per Ray actor: plans once, then writes whole shards (by file name) on request."""

    def __init__(self, job: ShardJob):
        from mergesmith.engine.api import fingerprint

        host = socket.gethostname()
        if not Path(job.cwd).is_dir():
            raise OutputError(f"the worker on {host} has no folder {job.cwd} (the driver's "
                              "working folder)", hint=SHARED_HINT)
        os.chdir(job.cwd)
        os.environ.update(job.env)
        self.job = job
        self.device = torch.device(job.device)
        self.plan = build_plan(job.recipe, **job.plan_options)
        if fingerprint(self.plan, job.chunk_bytes, self.device) != job.fingerprint:
            raise OutputError(f"the worker on {host} sees other inputs than the driver "
                              "(model paths, sizes or modification times)", hint=SHARED_HINT)
        if not Path(job.partial).is_dir():
            raise OutputError(f"the worker on {host} cannot see the output folder "
                              f"{job.partial}", hint=SHARED_HINT)

    def __call__(self, filename: str) -> int:
        view = ShardView(Path(self.job.partial), [filename])
        stream(self.plan, view, device=self.device, chunk_bytes=self.job.chunk_bytes)
        return view.done[filename]


def stream_on_workers(the_plan: Plan, output: OutputFolder, *, job: ShardJob, workers: int,
                      address: str | None, progress=None, **_: Any) -> None:
    """engine/run.py `stream`'s part, by workers: every shard not already finished."""
    pending = [s for s in the_plan.shards if not output.is_done(s.filename, s.size)]
    if progress:
        done = [s for s in the_plan.shards if s not in pending]
        progress.advance(sum(s.data_bytes for s in done), sum(len(s.tensors) for s in done))
    if not pending:
        return

    def record(index: int, size: int) -> None:
        shard = pending[index]
        output.mark_done(shard.filename, size)
        if progress:
            progress.advance(shard.data_bytes, len(shard.tensors), shard.filename)

    executor = make_executor(partial(ShardWorker, job), min(workers, len(pending)), address)
    try:
        executor.run([s.filename for s in pending], on_result=record)
    finally:
        executor.close()
