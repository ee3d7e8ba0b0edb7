"""Run a generation job in one process or sharded over W worker processes.

Workers: one per GPU when GPUs exist (each sees only its own through CUDA_VISIBLE_DEVICES), otherwise
CPU processes. Each worker loads the pipeline and the LoRAs once, then asks the main process for
work. The unit of work is an item (one (style, prompt) pair); a worker is handed up to
`batch_size` items at a time. The main process knows which items every worker holds: when a
worker dies, the items it had not finished go back to the queue for the others; if every
worker dies, a rerun picks up what is missing (finished images are skipped). Since every image is
a function of its own seed and text only (see runner.py), the files are the same as the
single-process run's.

The main process draws one progress bar for all workers and writes `manifest.json` at the end.

Under `mpirun -np N` (`mpirun -np N python infer.py ...`) each rank is one worker: rank r makes items
r, r+N, r+2N, ... of the plan, and rank 0 writes `manifest.json` once every rank is done.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from tqdm.auto import tqdm

from ..weights import remove_stale_temp_files
from .manifest import fingerprint, write_manifest
from .plan import Item
from .runner import GenerateSettings, generate_items, job_description, load_job_pipeline, pending_items

# Test hook: "W:N[,W:N]" makes worker W exit abruptly after finishing N items (to test recovery).
CRASH_ENV = "JDIFFUSION_GENERATE_CRASH"


class WorkerError(ValueError):
    """Every worker failed before making an image (e.g. a LoRA that does not fit the model)."""


@dataclass
class JobResult:
    total: int                       # items in the plan
    skipped: int                     # already done before this run
    generated: int                   # made by this run
    missing: List[str] = field(default_factory=list)   # relpaths still missing (workers died)
    workers: int = 1
    seconds: float = 0.0
    manifest: str = ""


def gpu_count() -> int:
    from .._runtime import DEVICE, _cuda_device_count
    return _cuda_device_count() if DEVICE == "cuda" else 0


def run_job(items: Sequence[Item], settings: GenerateSettings, out_dir: str, workers: int = 1,
            overwrite: bool = False, progress: bool = True) -> JobResult:
    """Generate every item not already done under `out_dir`, with `workers` processes (1 = in this process)."""
    settings.check()
    from ..train import distributed as dist
    if dist.active():
        return _run_mpi_shard(items, settings, out_dir, overwrite, progress)
    remove_stale_temp_files(out_dir)   # what a killed run's atomic writes left behind (workers start after)
    t0 = time.time()
    job = job_description(settings)
    todo = pending_items(items, out_dir, job, overwrite)
    done_before = len(items) - len(todo)
    workers = max(1, min(int(workers), len(todo) or 1))
    bar = tqdm(total=len(items), initial=done_before, desc="generating", unit="img", disable=not progress)
    try:
        if not todo:
            generated = 0
        elif workers == 1:
            pipe = load_job_pipeline(settings)
            generated = generate_items(pipe, todo, settings, out_dir, job, on_done=lambda it: bar.update(1))
        else:
            generated = _run_workers(todo, settings, out_dir, job, workers, bar)
    finally:
        bar.close()
    relpaths = [it.relpath for it in items]
    images = write_manifest(out_dir, {it.relpath: fingerprint(job, it.to_dict()) for it in items}, job)
    return JobResult(total=len(items), skipped=done_before, generated=generated,
                     missing=[r for r in relpaths if r not in images], workers=workers,
                     seconds=time.time() - t0, manifest=os.path.join(out_dir, "manifest.json"))


def _run_mpi_shard(items: Sequence[Item], settings: GenerateSettings, out_dir: str, overwrite: bool,
                   progress: bool) -> JobResult:
    """This rank's share of the items (every N-th); rank 0 writes the manifest after all ranks finish."""
    import numpy as np
    from ..train import distributed as dist
    t0 = time.time()
    rank, world = dist.rank(), dist.world_size()
    job = job_description(settings)
    if dist.is_writer():
        remove_stale_temp_files(out_dir)
    dist.barrier("waiting for rank 0 to clear stale temporary files", timeout=0)
    mine = list(items[rank::world])
    todo = pending_items(mine, out_dir, job, overwrite)
    generated = 0
    if todo:
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"generating (rank {rank}/{world})",
                   unit="img", disable=not progress or rank != 0)
        try:
            generated = generate_items(load_job_pipeline(settings), todo, settings, out_dir, job, worker=f"rank{rank}",
                                       on_done=lambda it: bar.update(1))
        finally:
            bar.close()
    # No time limit: the ranks' shares can take very different times (a dead rank stops the job anyway).
    counts = dist.all_sum(np.array([len(mine) - len(todo), generated], np.int32), "waiting for every rank's "
                          "images", timeout=0)
    relpaths = [it.relpath for it in items]
    manifest = os.path.join(out_dir, "manifest.json")
    if dist.is_writer():
        images = write_manifest(out_dir, {it.relpath: fingerprint(job, it.to_dict()) for it in items}, job)
    else:
        images = {r for r in relpaths if os.path.isfile(os.path.join(out_dir, r))}
    return JobResult(total=len(items), skipped=int(counts[0]), generated=int(counts[1]),
                     missing=[r for r in relpaths if r not in images], workers=world,
                     seconds=time.time() - t0, manifest=manifest)


# ----------------------------------------------------------------------------- workers

def _worker_main(wid: int, settings_dict: dict, out_dir: str, job: dict, tasks, results) -> None:
    """Worker process: load once, then take item groups until told to stop (None)."""
    try:
        import jdiffusion_lora  # noqa: F401  (sets Jittor's environment first)
        settings = GenerateSettings.from_dict(settings_dict)
        crashes = dict(c.split(":") for c in os.environ.get(CRASH_ENV, "").split(",") if ":" in c)
        crash_after = int(crashes[str(wid)]) if str(wid) in crashes else None
        pipe = load_job_pipeline(settings)
        made = 0

        def done(it: Item) -> None:
            nonlocal made
            made += 1
            results.put(("done", wid, it.relpath))
            if crash_after is not None and made >= crash_after:
                time.sleep(0.2)  # let the queue's feeder thread flush before the abrupt exit
                os._exit(3)

        results.put(("ready", wid, None))
        while True:
            group = tasks.get()
            if group is None:
                break
            generate_items(pipe, [Item(**d) for d in group], settings, out_dir, job, worker=f"w{wid}", on_done=done)
            results.put(("ready", wid, None))
    except BaseException:
        results.put(("error", wid, traceback.format_exc()))
        raise SystemExit(1)


def _run_workers(todo: List[Item], settings: GenerateSettings, out_dir: str, job: dict, workers: int,
                 bar) -> int:
    ctx = mp.get_context("spawn")  # never fork a process that has Jittor loaded
    results = ctx.Queue()
    tasks = [ctx.Queue() for _ in range(workers)]
    gpus = gpu_count()
    procs: Dict[int, mp.Process] = {}
    for wid in range(workers):
        if gpus:  # respect a CUDA_VISIBLE_DEVICES the user set: worker w gets the w-th listed device
            visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            devices = visible or [str(i) for i in range(gpus)]
            env = {"CUDA_VISIBLE_DEVICES": devices[wid % len(devices)]}
        else:  # share the cores: OpenMP threads spinning in several processes slow everything down 10-50x
            threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, len(os.sched_getaffinity(0)) // workers))
            env = {"JDIFFUSION_DEVICE": "cpu", "OMP_NUM_THREADS": threads}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # a spawned child copies the environment at start()
        try:
            p = ctx.Process(target=_worker_main, name=f"generate-w{wid}", daemon=True,
                            args=(wid, settings.to_dict(), out_dir, job, tasks[wid], results))
            p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        procs[wid] = p

    pending = deque(todo)
    held: Dict[int, Dict[str, Item]] = {wid: {} for wid in procs}
    idle: List[int] = []
    alive = set(procs)
    generated = 0
    per_worker = {wid: 0 for wid in procs}
    errors: Dict[int, str] = {}

    def dispatch(wid: int) -> None:
        group = [pending.popleft() for _ in range(min(settings.batch_size, len(pending)))]
        held[wid] = {it.relpath: it for it in group}
        tasks[wid].put([it.to_dict() for it in group])

    try:
        while alive and (pending or any(held[w] for w in alive)):
            try:
                kind, wid, payload = results.get(timeout=0.5)
            except queue.Empty:
                kind = None
            if kind == "ready":
                if pending:
                    dispatch(wid)
                else:
                    idle.append(wid)
            elif kind == "done":
                if held[wid].pop(payload, None) is not None:
                    generated += 1
                    per_worker[wid] += 1
                    bar.set_postfix_str(" ".join(f"w{w}:{n}" + ("" if w in alive else "(dead)")
                                                 for w, n in sorted(per_worker.items())), refresh=False)
                    bar.update(1)
            elif kind == "error":
                errors[wid] = payload
                if per_worker[wid] or generated:
                    print(f"worker {wid} failed:\n{payload}", file=sys.stderr)
            for w in list(alive):  # a dead worker's unfinished items go back to the queue
                if not procs[w].is_alive():
                    alive.discard(w)
                    if w in idle:
                        idle.remove(w)
                    lost = list(held[w].values())
                    held[w] = {}
                    if procs[w].exitcode != 0 or lost:
                        print(f"worker {w} exited (code {procs[w].exitcode}); {len(lost)} unfinished item(s) "
                              f"handed to the other workers", file=sys.stderr)
                    pending.extendleft(reversed(lost))
            while pending and idle:
                dispatch(idle.pop(0))
    finally:
        for w in procs:
            if procs[w].is_alive():
                tasks[w].put(None)
        for p in procs.values():
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    if not generated and errors and len(errors) == len(procs):  # the same set-up error in every worker
        first = errors[min(errors)].strip().splitlines()
        raise WorkerError(f"all {len(procs)} workers failed before making an image: {first[-1]}")
    return generated
