"""Data parallelism on Jittor's MPI (train/distributed.py): `mpirun -np 2` on CPU, 1 thread per rank.

The MPI tests skip when OpenMPI (mpirun, mpicc) is missing; `.ci/run` installs it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from generate_fixtures import make_dataset, write_tiny_lora
from jdiffusion_lora import _runtime
from jdiffusion_lora.train import distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_mpi = pytest.mark.skipif(shutil.which("mpirun") is None or shutil.which("mpicc") is None,
                               reason="needs OpenMPI (apt-get install openmpi-bin libopenmpi-dev)")


def mpi_command(n: int, *args: str, per_rank=None):
    """`mpirun -np n args` (root and oversubscribe allowed); `per_rank`: one argument list per rank instead
    (MPMD: `-np 1 A : -np 1 B`)."""
    cmd = ["mpirun", "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    if per_rank:
        for i, a in enumerate(per_rank):
            cmd += ([":"] if i else []) + ["-np", "1", *a]
        return cmd
    return cmd + ["-np", str(n), *args]


def mpi_env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "JDIFFUSION_DEVICE": "cpu", **extra}


def mpirun(n: int, *args: str, env=None, timeout: int = 600, per_rank=None) -> subprocess.CompletedProcess:
    return subprocess.run(mpi_command(n, *args, per_rank=per_rank), env=mpi_env(**(env or {})), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- without MPI

def test_single_process_is_rank_0_of_1():
    assert (dist.rank(), dist.world_size(), dist.active(), dist.is_writer()) == (0, 1, False, True)
    assert dist.all_sum(np.array([3], np.int32), "x").tolist() == [3]
    dist.barrier("x")
    dist.check_same_config({"a": 1})


def test_global_batch_split_and_its_errors():
    assert dist.split_batch(1, 2, 0, 4) == (2, 8)              # 0: the batch grows with the world
    assert dist.split_batch(1, 1, 4, 2) == (2, 4)              # fixed: accumulation follows the world size
    assert dist.split_batch(2, 1, 4, 1) == (2, 4)
    with pytest.raises(ValueError, match="world size 4 is larger than the global batch 2"):
        dist.split_batch(1, 1, 2, 4)
    with pytest.raises(ValueError, match="global_batch_size 6 is not a multiple of train_batch_size x world size = 1 x 4"):
        dist.split_batch(1, 1, 6, 4)


def test_config_fingerprint_names_the_key_that_differs():
    a = dist.config_fingerprint({"lr": 1e-4, "styles": ["00"], "seed": 1})
    b = dist.config_fingerprint({"lr": 2e-4, "styles": ["00"], "seed": 1})
    assert a.dtype == np.int32 and (a != b).tolist() == [True, False, False]   # keys sorted: lr, seed, styles


def test_rank_binding_gpu_or_cpu_share():
    env = {"OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert _runtime.bind_local_rank(env) == "GPU 7" and env["CUDA_VISIBLE_DEVICES"] == "7"
    env = {"OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "CUDA_VISIBLE_DEVICES": "",
           "JDIFFUSION_DEVICE": "cpu"}
    cores = len(os.sched_getaffinity(0))
    assert _runtime.bind_local_rank(env).endswith("CPU thread(s)")
    assert env["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    env = {"OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMP_NUM_THREADS": "3", "CUDA_VISIBLE_DEVICES": ""}
    _runtime.bind_local_rank(env)
    assert env["OMP_NUM_THREADS"] == "3"                      # the user's choice stays
    env = {"OMPI_COMM_WORLD_LOCAL_RANK": "1", "JDIFFUSION_BIND": "none", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert _runtime.bind_local_rank(env) == "" and env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert _runtime.bind_local_rank({}) == ""                 # not under mpirun


def test_train_sh_nproc_execs_mpirun(tmp_path):
    """--nproc N becomes `mpirun -np N --oversubscribe --bind-to none [--allow-run-as-root] bash train.sh ...`."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mpirun").write_text('#!/bin/sh\necho "mpirun $*"\n')
    (fake / "mpirun").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    env.pop("OMPI_COMM_WORLD_SIZE", None)
    r = subprocess.run(["bash", "train.sh", "--nproc", "4", "--max-train-steps", "3"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    root = " --allow-run-as-root" if os.geteuid() == 0 else ""
    assert r.stdout.strip() == (f"mpirun -np 4 --oversubscribe --bind-to none{root} bash {REPO}/train.sh "
                                f"--config configs/demo.toml --max-train-steps 3")
    r = subprocess.run(["bash", "train.sh", "--nproc", "x"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "--nproc needs a positive number" in r.stderr


# ----------------------------------------------------------------------------- generation under mpirun

@pytest.mark.slow
@needs_mpi
def test_infer_under_mpirun_equals_single_process(tmp_path):
    from jdiffusion_lora.generate import GenerateSettings, LoraSpec, build_items, read_inputs, read_manifest, run_job
    from jdiffusion_lora.generate import without_timing
    from jdiffusion_lora.tiny import random_tiny_model_path

    data = make_dataset(str(tmp_path / "data"))
    lora = write_tiny_lora(str(tmp_path / "style.safetensors"))
    with pytest.warns(UserWarning):
        items = build_items(*read_inputs(data))
    single = str(tmp_path / "single")
    run_job(items, GenerateSettings(model=random_tiny_model_path(), loras=[LoraSpec(lora, 0.8)], steps=2), single,
            progress=False)
    sharded = str(tmp_path / "mpi")
    # each rank computes with this process's thread count: on some CPUs (AMD EPYC) oneDNN's summation order
    # depends on it, and the promise is the same bytes at the same thread count (see test_generate._cli)
    from jdiffusion_lora._runtime import cpu_threads
    r = mpirun(2, sys.executable, "infer.py", "--model", random_tiny_model_path(), "--data", data, "--lora",
               f"{lora}:0.8", "--steps", "2", "--out", sharded, "--no-progress",
               env={"OMP_NUM_THREADS": str(cpu_threads())})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("generated by 2 worker(s)") == 1                    # rank 0 reports, once
    assert "0 already done, 5 generated" in r.stdout

    def files(folder):
        return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
                for d, _, fs in os.walk(folder) for f in fs if f.endswith(".png")}

    assert files(sharded) == files(single) and len(files(single)) == 5
    a, b = (read_manifest(os.path.join(x, "manifest.json"))["images"] for x in (single, sharded))
    assert without_timing(a) == without_timing(b)
    assert {rec["worker"] for rec in b.values()} == {"rank0", "rank1"}
    assert not [f for _, _, fs in os.walk(sharded) for f in fs if f.startswith(".tmp-")]


# ----------------------------------------------------------------------------- errors under mpirun

SCRIPT_HUNG = """
import os, signal, time, numpy as np
from jdiffusion_lora.train import distributed as dist
dist.all_sum(np.ones(1, np.float32), "warm-up (compiles the kernel)", timeout=0)
if dist.rank() == 1:
    time.sleep(3600) if "{sig}" == "hang" else os.kill(os.getpid(), signal.SIGKILL)
dist.all_sum(np.ones(1, np.float32), "the test all-reduce", timeout=5)
print("rank", dist.rank(), "passed the all-reduce")
"""


@pytest.mark.slow
@needs_mpi
@pytest.mark.parametrize("sig", ["hang", "SIGKILL"])
def test_a_hung_or_dead_rank_stops_the_others(sig):
    import time
    t0 = time.time()
    r = mpirun(2, sys.executable, "-c", SCRIPT_HUNG.format(sig=sig), timeout=300)
    assert r.returncode != 0 and "passed the all-reduce" not in r.stdout
    assert time.time() - t0 < 120
    if sig == "hang":   # rank 0's watchdog names what hung
        assert "rank 0 of 2: the test all-reduce did not complete within 5 s: another rank has died or hangs" \
            in r.stderr


@pytest.mark.slow
@needs_mpi
def test_config_mismatch_and_too_many_ranks_are_clear_errors(tmp_path):
    train = [sys.executable, "-m", "jdiffusion_lora.cli", "train", "--config", "configs/demo.toml",
             "--max-train-steps", "1", "--no-before-after", "--no-progress-bar", "--sample-every", "0",
             "--output-dir", str(tmp_path / "run")]
    r = mpirun(2, per_rank=[train, train + ["--learning-rate", "1e-3"]], timeout=600)
    assert r.returncode != 0
    assert "the ranks run different configs: rank(s) [1] differ from rank 0" in r.stderr
    assert "this rank differs in: learning_rate" in r.stderr
    assert not os.path.exists(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    r = mpirun(2, *train, "--global-batch-size", "1", timeout=600)
    assert r.returncode != 0 and "world size 2 is larger than the global batch 1" in r.stderr


SCRIPT_NAN = """
import sys
sys.path.insert(0, "tests")
from train_fixtures import config, tiny_pipeline
from jdiffusion_lora.train import distributed as dist
from jdiffusion_lora.train.trainer import NonFiniteLoss, Trainer
import pathlib
t = Trainer(config(pathlib.Path(sys.argv[1]), max_train_steps=3), pipeline=tiny_pipeline(), printer=lambda s: None)

def poison(step, metrics):
    if step == 1 and dist.rank() == 1:
        pair = t.pairs[5]
        pair.up.update(pair.up * float("nan"))

try:
    t.run(callback=poison)
except NonFiniteLoss as e:
    print(f"rank {dist.rank()} stopped: {e}")
"""


@pytest.mark.slow
@needs_mpi
def test_nan_on_one_rank_stops_every_rank_naming_rank_and_module(tmp_path):
    r = mpirun(2, sys.executable, "-c", SCRIPT_NAN, str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # (mpirun forwards each rank's output in chunks: the two lines may be interleaved)
    assert "rank 0 stopped: step 2: rank(s) [1] met a non-finite loss" in r.stdout
    assert "rank 1 stopped: step 2: loss is nan on rank 1 of 2. Non-finite: adapter weight" in r.stdout


# ----------------------------------------------------------------------------- training: 2 ranks = 1 process

STEPS = 3
DEMO = ["--config", "configs/demo.toml", "--max-train-steps", str(STEPS), "--no-before-after", "--no-progress-bar",
        "--save-every", "2", "--keep-last", "2", "--sample-every", "2", "--sample-steps", "2",
        "--global-batch-size", "2"]


def train_command(out, *extra):
    return [sys.executable, "-m", "jdiffusion_lora.cli", "train", *DEMO, "--output-dir", str(out), *extra]


def run_single(out, *extra):
    r = subprocess.run(train_command(out, *extra), env=mpi_env(), cwd=REPO, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def lora(out):
    from jdiffusion_lora.weights import read_safetensors
    return {f: read_safetensors(os.path.join(out, f))[0] for f in ("pytorch_lora_weights.safetensors",
                                                                     "lora_kohya.safetensors")}


def max_diff(a, b):
    assert a.keys() == b.keys()
    out = 0.0
    for f in a:
        assert a[f].keys() == b[f].keys()
        out = max(out, max(float(np.abs(a[f][k].astype(np.float64) - b[f][k]).max()) for k in a[f]))
    return out


def losses(out):
    import json
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


def files(out):
    """Relative paths of every file (the TensorBoard file name holds a timestamp: kept as its folder)."""
    paths = (os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    return sorted("tensorboard/events" if p.startswith("tensorboard/events.") else p for p in paths)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The demo config for STEPS steps, global batch 2: one process (accumulation 2) and 2 ranks under mpirun."""
    root = tmp_path_factory.mktemp("dp")
    run_single(root / "single")
    r = mpirun(2, *train_command(root / "mpi"), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "single", root / "mpi", r


@pytest.mark.slow
@needs_mpi
def test_two_ranks_train_the_same_lora_as_one_process(two_runs):
    single, mpi, r = two_runs
    assert max_diff(lora(single), lora(mpi)) <= 1e-5
    a, b = losses(single), losses(mpi)
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([x[1:] for x in b], [x[1:] for x in a], rtol=1e-5, atol=1e-7)   # loss, grad norm
    # one writer: the same files as the single process, one TensorBoard file, nothing half-written, one report
    assert files(mpi) == files(single)
    assert len(os.listdir(mpi / "tensorboard")) == 1
    assert not [f for f in files(mpi) if ".tmp-" in f]
    assert r.stdout.count("trained 3 step(s)") == 1 and "(2 ranks)" in r.stdout
    assert "global batch 2 over 2 ranks" in r.stdout


@pytest.mark.slow
@needs_mpi
def test_killed_two_rank_run_resumes_with_two_or_one_rank(two_runs, tmp_path):
    """Kill a 2-rank run (every process, SIGKILL) once its step-2 checkpoint exists; resume it with 2 ranks,
    and a copy of it with 1 process (which keeps the checkpoint's global batch of 2): the uninterrupted LoRA."""
    import shlex
    _, reference, _ = two_runs
    out = tmp_path / "killed"
    state = out / "checkpoints" / "checkpoint-000002" / "training_state" / "state.json"
    # The kill runs in bash: Jittor's SIGCHLD handler ends this pytest process when a child of it is SIGKILLed.
    log = tmp_path / "killed.log"     # what the killed run printed, shown if it ended before its checkpoint
    kill = (f"setsid {shlex.join(mpi_command(2, *train_command(out)))} >{shlex.quote(str(log))} 2>&1 & pid=$!\n"
            f"while [ ! -f {shlex.quote(str(state))} ] && kill -0 $pid 2>/dev/null; do sleep 0.05; done\n"
            f"kill -KILL -- -$pid; wait $pid; true")
    subprocess.run(["bash", "-c", kill], env=mpi_env(), cwd=REPO, timeout=900)
    printed = log.read_text(errors="replace")[-3000:] if log.exists() else "(no output)"
    assert state.exists(), f"the 2-rank run ended before its step-2 checkpoint:\n{printed}"
    assert not (out / "pytorch_lora_weights.safetensors").exists()                     # killed mid-way
    shutil.copytree(out, tmp_path / "killed_copy")
    r = mpirun(2, *train_command(out, "--resume", "latest"), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and max_diff(lora(reference), lora(out)) <= 1e-5
    assert [s for s, _, _ in losses(out)] == list(range(1, STEPS + 1))
    one = tmp_path / "killed_copy"
    r = run_single(one, "--resume", "latest", "--global-batch-size", "0")
    assert "keeping the checkpoint's global batch of 2 = 1 rank(s) x train_batch_size 1 x 2 accumulation" in r.stdout
    assert max_diff(lora(reference), lora(one)) <= 1e-5
