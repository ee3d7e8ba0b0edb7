"""Data parallelism on Jittor's MPI: `mpirun -np N python -m jdiffusion_lora.cli train ...`.

Jittor does the communication (`jt.in_mpi`, `jt.rank`, `jt.world_size`, `Var.mpi_all_reduce`,
`Var.mpi_broadcast`; NCCL on GPUs); this file holds what the trainer adds on top:

- the global batch (train_batch_size x accumulation x world) is split by sample index: rank r does the
  micro-batches r*k .. r*k+k-1 of a single process with k*world micro-batches, so N ranks reproduce one
  process with the same global batch (up to float summation order);
- one flat all-reduce per optimizer step of every LoRA gradient, the micro-batch losses and a
  non-finite flag per rank (`reduce_step`), before clipping;
- rank 0 is the only writer (`is_writer`); the others only read `output_dir`;
- every collective runs under a watchdog: a rank that dies or hangs stops the others with a clear
  message after `timeout` seconds instead of leaving them blocked forever;
- a config hash compared across ranks at start (`check_same_config`).

Outside MPI every function here is a no-op or trivially local, so a single process runs as before.
Never call a collective inside `if is_writer()` only: the other ranks would never join it (deadlock).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .._runtime import jt

DEFAULT_TIMEOUT = float(os.environ.get("JDIFFUSION_DDP_TIMEOUT", "600"))


def rank() -> int:
    return int(jt.rank) if jt.in_mpi else 0


def world_size() -> int:
    return int(jt.world_size) if jt.in_mpi else 1


def active() -> bool:
    """True under mpirun with more than one rank."""
    return world_size() > 1


def is_writer() -> bool:
    """Only rank 0 writes files under output_dir (LoRA, checkpoints, logs, samples)."""
    return rank() == 0


def describe() -> str:
    return f"rank {rank()} of {world_size()}"


# ----------------------------------------------------------------------------- watchdog

# A rank blocked in an MPI call holds the GIL (Jittor does not release it), so no thread or signal handler of
# this process can run: the watchdog is a small process of its own (no Jittor), armed and disarmed through a
# pipe around each collective. When a collective overruns it prints who is stuck and kills this rank, which
# makes mpirun stop every rank. It ends by itself when this process exits (end of the pipe).
_WATCHDOG = r"""
import os, select, signal, sys, time
parent, label = int(sys.argv[1]), sys.argv[2]
fd, buf, deadline, limit, what = sys.stdin.fileno(), b"", None, 0.0, ""
while True:
    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
    if select.select([fd], [], [], wait)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        *lines, buf = (buf + chunk).split(b"\n")
        for line in lines:
            cmd, _, rest = line.decode().partition(" ")
            if cmd == "arm":
                t, _, what = rest.partition(" ")
                limit, deadline = float(t), time.monotonic() + float(t)
            else:
                deadline = None
    elif deadline is not None:
        sys.stderr.write(f"\nerror: {label}: {what} did not complete within {limit:.0f} s: another rank has died "
                         f"or hangs. Stopping this rank; resume from the latest checkpoint with --resume latest "
                         f"(set the limit with JDIFFUSION_DDP_TIMEOUT).\n")
        sys.stderr.flush()
        os.kill(parent, signal.SIGKILL)
        break
"""
_watchdog_process = None


def _watchdog_send(line: str) -> None:
    global _watchdog_process
    if _watchdog_process is None:
        import subprocess
        _watchdog_process = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()),
                                              f"rank {rank()} of {world_size()}"], stdin=subprocess.PIPE)
    _watchdog_process.stdin.write((line.replace("\n", " ") + "\n").encode())
    _watchdog_process.stdin.flush()


@contextmanager
def watchdog(what: str, timeout: Optional[float] = None):
    """Run a collective; if it has not finished after `timeout` s (0: no limit), print who is stuck and
    kill this rank, which makes mpirun stop every rank (a hang becomes an error)."""
    timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    if not active() or timeout <= 0:
        yield
        return
    _watchdog_send(f"arm {timeout} {what}")
    try:
        yield
    finally:
        _watchdog_send("disarm")


def abort_on_error(message: str, code: int = 1) -> None:
    """Under MPI, a rank that fails must not call MPI_Finalize (it would wait for the others, which
    wait in a collective for it): print and leave at once; mpirun then stops the other ranks."""
    sys.stderr.write(f"error ({describe()}): {message}\n" if active() else f"error: {message}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    if active():
        os._exit(code)
    raise SystemExit(code)


# ----------------------------------------------------------------------------- collectives

def all_sum(array: np.ndarray, what: str, timeout: Optional[float] = None) -> np.ndarray:
    """Element-wise sum over ranks of a small float32/float64/int32 array (Jittor's CPU MPI types)."""
    if not active():
        return np.array(array)
    with watchdog(what, timeout):
        return jt.array(array).mpi_all_reduce("add").numpy()


def broadcast_array(array: np.ndarray, what: str, timeout: Optional[float] = None) -> np.ndarray:
    """Rank 0's copy of `array` (same shape and dtype on every rank)."""
    if not active():
        return np.array(array)
    with watchdog(what, timeout):
        return jt.array(array).mpi_broadcast(0).numpy()


def barrier(what: str, timeout: Optional[float] = None) -> None:
    all_sum(np.zeros(1, np.int32), what, timeout)


def broadcast_params(params: Sequence, timeout: Optional[float] = None) -> None:
    """Every rank starts from rank 0's LoRA weights (as Module.mpi_param_broadcast does)."""
    if not active():
        return
    with watchdog("broadcasting the LoRA weights from rank 0", timeout):
        for p in params:
            p.update(p.mpi_broadcast(0))
        jt.sync(list(params))


def nccl_active() -> bool:
    """Whether Jittor all-reduces on the GPUs with NCCL: it needs CUDA, its NCCL module, and no more local
    ranks than visible GPUs (else it falls back to MPI through host memory, nccl_wrapper.cc)."""
    from jittor import compile_extern
    if not jt.flags.use_cuda or getattr(compile_extern, "nccl_ops", None) is None:
        return False
    return int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1")) <= jt.core.get_device_count()


@dataclass
class StepReduction:
    grads: List                    # averaged over every micro-batch of every rank
    loss: float                    # mean micro-batch loss over all ranks
    bad_ranks: List[int]           # ranks that met a non-finite loss this step
    stop: bool                     # some rank was asked to stop (SIGINT/SIGTERM): all stop after this step
    seconds: float = 0.0           # time in the all-reduce (including waiting for the slowest rank)


def reduce_step(grads: List, losses: Sequence[float], bad: bool, stop: bool, step: int, dtype: str = "float32",
                timeout: Optional[float] = None) -> StepReduction:
    """One flat all-reduce per optimizer step: [all LoRA gradients | sum of losses | stop | NaN flag per rank].

    `grads` are this rank's gradients averaged over its own micro-batches; the result is the mean over
    ranks, i.e. the gradient of the whole global batch. `dtype` "float16" halves the bytes sent
    (GPUs only: Jittor's CPU MPI op reduces float32/float64/int32, its NCCL op has no bfloat16)."""
    n, r = world_size(), rank()
    if n == 1:
        return StepReduction(grads, float(np.mean(losses)), [0] if bad else [], stop)
    extras = np.zeros(2 + n, np.float32)
    extras[0] = float(np.sum(losses))
    extras[1] = 1.0 if stop else 0.0
    extras[2 + r] = 1.0 if bad else 0.0
    shapes = [g.shape for g in grads]
    t0 = time.perf_counter()
    flat = jt.concat([g.reshape(-1) for g in grads] + [jt.array(extras)])
    if dtype == "float16":
        if not nccl_active():
            raise ValueError("allreduce_dtype 'float16' needs NCCL (GPUs, each rank seeing every GPU of its machine: "
                             "JDIFFUSION_BIND=none); Jittor's MPI all-reduce takes float32, float64 and int32 only")
        flat = flat.float16().mpi_all_reduce("add").float32()
    elif dtype == "float32":
        flat = flat.mpi_all_reduce("add")
    else:
        raise ValueError(f"allreduce_dtype must be float32 or float16, got {dtype!r}")
    with watchdog(f"the gradient all-reduce of step {step + 1}", timeout):
        jt.sync([flat])
        total = flat[-(2 + n):].numpy().astype(np.float64)
    seconds = time.perf_counter() - t0
    flat = flat * (1.0 / n)
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(flat[start:start + size].reshape(shape))
        start += size
    jt.sync(out)
    count = len(losses) * n
    return StepReduction(out, float(total[0]) / count, [i for i in range(n) if total[2 + i] > 0], total[1] > 0,
                         seconds)


# ----------------------------------------------------------------------------- consistency checks

def config_fingerprint(config: dict) -> np.ndarray:
    """One int32 per key: sha256 of the key's JSON value (compared across ranks)."""
    out = []
    for key in sorted(config):
        blob = json.dumps([key, config[key]], sort_keys=True, default=str).encode()
        out.append(int.from_bytes(hashlib.sha256(blob).digest()[:4], "little") & 0x7FFFFFFF)
    return np.array(out, np.int32)


def check_same_config(config: dict, timeout: Optional[float] = None) -> None:
    """Every rank must run the same config (same files, same options): compare per-key hashes with
    rank 0's; every rank learns which ranks differ and all stop with the same error."""
    if not active():
        return
    n, r = world_size(), rank()
    mine = config_fingerprint(config)
    count = all_sum(np.array([len(mine)] + [0] * n, np.int32), "comparing configs")
    size_ok = int(count[0]) == len(mine) * n
    theirs = broadcast_array(mine, "comparing configs", timeout) if size_ok else mine
    keys = sorted(config)
    differ = [k for k, a, b in zip(keys, mine, theirs) if a != b] if size_ok else ["(the set of keys)"]
    flags = np.zeros(n, np.int32)
    flags[r] = 1 if differ else 0
    flags = all_sum(flags, "comparing configs", timeout)
    bad = [i for i in range(n) if flags[i]]
    if bad:
        detail = f"; this rank differs in: {', '.join(differ)}" if differ else ""
        raise ValueError(f"the ranks run different configs: rank(s) {bad} differ from rank 0 (a different "
                         f"config file, command line or data on that machine?){detail}")


def split_batch(train_batch_size: int, accumulation: int, global_batch_size: int, world: int
                ) -> Tuple[int, int]:
    """(accumulation steps per rank, global batch) for this world size.

    global_batch_size 0 means train_batch_size x accumulation x world. Otherwise it is fixed and the
    accumulation per rank follows from it, so one config gives the same run under any world size."""
    if global_batch_size <= 0:
        return accumulation, train_batch_size * accumulation * world
    if world > global_batch_size:
        raise ValueError(f"world size {world} is larger than the global batch {global_batch_size}: some ranks "
                         f"would have no sample; run fewer processes or raise global_batch_size")
    per_rank, rest = divmod(global_batch_size, train_batch_size * world)
    if rest or per_rank < 1:
        raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of train_batch_size x world "
                         f"size = {train_batch_size} x {world}; choose a global batch that {world} rank(s) "
                         f"can share equally")
    return per_rank, global_batch_size

