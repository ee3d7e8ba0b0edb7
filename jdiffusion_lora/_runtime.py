"""Set up Jittor before anything imports it, and say which device runs.

Jittor reads its configuration from environment variables at import time. On a
machine that has `nvcc` but no working CUDA driver/runtime (a common CI image),
`import jittor` fails unless `nvcc_path=""` is set. We look for CUDA the way Jittor
does (its own downloaded CUDA in ~/.cache/jittor/jtcuda, then `$nvcc_path`, `nvcc` on
PATH, /usr/local/cuda/bin, /usr/bin, /opt/cuda/bin; never downloading), check that a
driver, a device and the runtime library next to that nvcc are there, and only then
let Jittor use the GPU. `device_report()` is the line every command prints first, and a
GPU that is visible but unusable gets a warning saying why.

Override with `JDIFFUSION_DEVICE=cpu` or `JDIFFUSION_DEVICE=cuda`.

Under `mpirun` (OpenMPI sets OMPI_COMM_WORLD_LOCAL_RANK) each process is bound to its share of the
machine before Jittor starts: its own GPU through CUDA_VISIBLE_DEVICES (Jittor alone puts every rank
on GPU 0, Jittor#437), or on CPU its share of the cores through OMP_NUM_THREADS. `JDIFFUSION_BIND=none`
leaves both alone (then Jittor's NCCL set-up picks the GPU by local rank itself).
"""
from __future__ import annotations

import ctypes
import glob
import os
import shutil
from dataclasses import dataclass
from typing import List, Optional


def _libcuda():
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def _cuda_devices() -> List[tuple]:
    """(name, total memory in bytes) of each device the CUDA driver reports; [] without a driver."""
    lib = _libcuda()
    if lib is None:
        return []
    try:
        if lib.cuInit(0) != 0:
            return []
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return []
        out = []
        for i in range(count.value):
            dev, name, mem = ctypes.c_int(0), ctypes.create_string_buffer(256), ctypes.c_size_t(0)
            lib.cuDeviceGet(ctypes.byref(dev), i)
            lib.cuDeviceGetName(name, 256, dev)
            lib.cuDeviceTotalMem_v2(ctypes.byref(mem), dev)
            out.append((name.value.decode(errors="replace") or f"cuda:{i}", int(mem.value)))
        return out
    except AttributeError:
        return []


def nvcc_candidates() -> List[str]:
    """Where Jittor 1.3 looks for nvcc, in its order (jittor/compiler.py), without its download step."""
    home = os.environ.get("HOME") or os.path.expanduser("~")
    found = sorted(glob.glob(os.path.join(home, ".cache", "jittor", "jtcuda", "*", "bin", "nvcc")))
    if os.environ.get("nvcc_path"):
        found.append(os.environ["nvcc_path"])
    on_path = shutil.which("nvcc")
    if on_path:
        found.append(on_path)
    found += ["/usr/local/cuda/bin/nvcc", "/usr/bin/nvcc", "/opt/cuda/bin/nvcc"]
    return found


def find_nvcc() -> Optional[str]:
    for path in nvcc_candidates():
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _runtime_library(nvcc: str) -> Optional[str]:
    """The libcudart Jittor loads: <cuda>/lib64/libcudart.so next to nvcc (or the system one for /usr/bin)."""
    cuda_dir = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    names = [os.path.join(cuda_dir, "lib64", "libcudart.so"), os.path.join(cuda_dir, "lib", "libcudart.so")]
    names += ["libcudart.so", "libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0"]
    for name in names:
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    return None


@dataclass
class GpuProbe:
    devices: List[tuple]          # (name, bytes) per device the driver reports
    nvcc: Optional[str]
    runtime: Optional[str]

    @property
    def usable(self) -> bool:
        return bool(self.devices) and self.nvcc is not None and self.runtime is not None

    def why_unusable(self) -> Optional[str]:
        if not self.devices:
            return None  # no GPU visible: nothing to explain
        if self.nvcc is None:
            return ("no nvcc found where Jittor looks (" + ", ".join(nvcc_candidates()) +
                    "); install the CUDA toolkit or set nvcc_path=/path/to/nvcc")
        if self.runtime is None:
            return f"nvcc is at {self.nvcc} but no CUDA runtime library (libcudart.so) was found next to it"
        return None


def probe_gpu() -> GpuProbe:
    devices = _cuda_devices()
    nvcc = find_nvcc() if devices else None
    return GpuProbe(devices, nvcc, _runtime_library(nvcc) if nvcc else None)


def _cuda_device_count() -> int:
    """Number of CUDA devices the driver reports, 0 when there is no usable driver/runtime."""
    probe = probe_gpu()
    return len(probe.devices) if probe.usable else 0


def gpu_available() -> bool:
    """True when CUDA can really be used: a driver, a device, nvcc (where Jittor looks) and its runtime."""
    return _cuda_device_count() > 0


def _node_gpus(environ=os.environ) -> list:
    """GPU ids this process may use, without initialising CUDA: CUDA_VISIBLE_DEVICES or the driver's list."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    try:
        return [str(i) for i in range(len(os.listdir("/proc/driver/nvidia/gpus")))]
    except OSError:
        return []


def bind_local_rank(environ=os.environ) -> str:
    """Under mpirun: give this rank its GPU (CUDA_VISIBLE_DEVICES) or its share of the CPU cores
    (OMP_NUM_THREADS, unless set). Returns what was done, for messages; "" outside MPI.

    Must run before CUDA is initialised and before Jittor (and its OpenMP runtime) loads."""
    if "OMPI_COMM_WORLD_LOCAL_RANK" not in environ or environ.get("JDIFFUSION_BIND", "auto") == "none":
        return ""
    local = int(environ["OMPI_COMM_WORLD_LOCAL_RANK"])
    local_size = max(1, int(environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1")))
    gpus = _node_gpus(environ) if environ.get("JDIFFUSION_DEVICE", "auto").lower() != "cpu" else []
    if gpus:
        environ["CUDA_VISIBLE_DEVICES"] = gpus[local % len(gpus)]
        return f"GPU {gpus[local % len(gpus)]}"
    if "OMP_NUM_THREADS" not in environ:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        environ["OMP_NUM_THREADS"] = str(max(1, cores // local_size))
    return f"{environ['OMP_NUM_THREADS']} CPU thread(s)"


def configure_environment() -> str:
    """Decide the device and set Jittor's environment variables; returns "cuda" or "cpu".

    Must run before the first `import jittor` in the process.
    """
    global PROBE
    wanted = os.environ.get("JDIFFUSION_DEVICE", "auto").lower()
    if wanted not in ("auto", "cpu", "cuda"):
        raise ValueError(f"JDIFFUSION_DEVICE must be auto, cpu or cuda, got {wanted!r}")
    bind_local_rank()
    PROBE = probe_gpu() if wanted != "cpu" else GpuProbe([], None, None)
    device = "cuda" if wanted == "cuda" or (wanted == "auto" and PROBE.usable) else "cpu"
    if device == "cpu":
        os.environ["nvcc_path"] = ""
    elif PROBE.nvcc and not os.environ.get("nvcc_path"):
        os.environ["nvcc_path"] = PROBE.nvcc  # the nvcc we checked is the one Jittor uses
    # Jittor imports torch when it is installed unless told not to; torch is test-only here.
    os.environ.setdefault("FIX_TORCH_ERROR", "0")
    # Jittor's info/warning chatter (compiler paths, cache dirs); errors still print.
    # Set log_silent=0 to see it.
    os.environ.setdefault("log_silent", "1")
    return device


def keep_freed_memory(environ=os.environ) -> bool:
    """glibc only, for training: serve large allocations from the heap and keep freed memory there (mallopt
    M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB), for the rest of the process. oneDNN allocates a fresh buffer for the
    reordered weights of every convolution it runs (forward and input gradient) and glibc maps buffers above
    32 MB fresh each time, so every page was faulted in again on every call: 1.4 million page faults (5.6 GB)
    per SD 2.1 training step at 512 px, 1.5 s of its 20 s; none with this. The cost: memory once freed stays
    with the process (the step's peak rose about 0.3 GB), which is why generation, whose `--low-memory` mode frees
    each model for the next, keeps glibc's defaults. `JDIFFUSION_MALLOC=system` opts out. Returns whether the
    setting was applied."""
    if environ.get("JDIFFUSION_MALLOC", "").lower() == "system":
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version    # glibc: mallopt and these parameter numbers
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, ctypes.c_int(2 ** 31 - 1)))


PROBE: GpuProbe = GpuProbe([], None, None)
DEVICE = configure_environment()

import jittor as jt  # noqa: E402  (must follow the environment set-up above)

if DEVICE == "cuda":
    jt.flags.use_cuda = 1


def release_between(x):
    """Inference on growing activations (the VAE decoder: 64 -> 512 px): compute `x` now and give Jittor's
    cached free blocks back, so the next, larger stage does not pile its buffers on top of the cached buffers
    of the smaller ones (Jittor's allocator keeps freed blocks by size for reuse; a stage with larger tensors
    cannot reuse them). SD 2.1 VAE decode at 512 px: peak +1.78 -> +1.41 GB. A no-op while gradients flow
    (a sync then would run the graph the backward still needs). Returns x."""
    if not jt.flags.no_grad:
        return x
    x.sync()
    jt.gc()
    _malloc_trim()
    return x


def _malloc_trim() -> None:
    """glibc: return the free pages inside the heap to the system too, not only its top (no-op elsewhere)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_threads() -> int:
    """Threads Jittor's CPU kernels use (OpenMP: OMP_NUM_THREADS, else the CPUs this process may run on)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_report(device: Optional[str] = None, probe: Optional[GpuProbe] = None) -> List[str]:
    """The device line every command prints first, plus a warning when a GPU is visible but unusable."""
    device, probe = device or DEVICE, probe or PROBE
    forced = " (JDIFFUSION_DEVICE)" if os.environ.get("JDIFFUSION_DEVICE", "auto").lower() != "auto" else ""
    if device == "cuda" and probe.devices:
        name, mem = probe.devices[0]
        lines = [f"device: GPU 0 {name}, {mem / 2 ** 30:.1f} GiB{forced}"
                 + (f" ({len(probe.devices)} visible)" if len(probe.devices) > 1 else "")]
    elif device == "cuda":
        lines = [f"device: GPU (CUDA){forced}"]
    else:
        lines = [f"device: CPU, {cpu_threads()} threads{forced}"]
    why = probe.why_unusable()
    if device == "cpu" and why:
        names = ", ".join(n for n, _ in probe.devices)
        lines.append(f"warning: a CUDA GPU is visible ({names}) but unusable, running on CPU: {why}")
    return lines


def announce_device() -> None:
    """Print the device line (stdout) and any unusable-GPU warning (stderr); rank 0 only under MPI."""
    import sys
    if getattr(jt, "rank", 0) != 0:
        return
    for line in device_report():
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout, flush=True)


__all__ = ["jt", "DEVICE", "gpu_available", "configure_environment", "device_report", "announce_device"]
