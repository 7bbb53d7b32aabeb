"""Where and how fast mlae runs: the device, the precision (with the measured bf16 speedup of this CPU), autocast,
CPU threads and parallel jobs, and joining a torchrun process group."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import InputError
from .files import _file_lock, atomic_write_text, user_cache_dir

__all__ = [
    "BF16_MIN_SPEEDUP",
    "THREADS_RULE",
    "CPU_AUTO_PRECISION",
    "DistInfo",
    "auto_threads",
    "autocast",
    "busy_cores",
    "cpu_bf16_speedup",
    "cpu_cores",
    "cpu_name",
    "cpu_jobs",
    "cpu_supports_bf16",
    "init_distributed",
    "resolve_device",
    "resolve_precision",
]


def resolve_device(device: str | None = None, local_rank: int = 0) -> torch.device:
    """The requested device, or CUDA when available, else the CPU. A bare "cuda" means this process's GPU
    (``local_rank`` under torchrun). A device this machine does not have is refused here, with what it has,
    rather than by the first tensor moved there."""
    try:
        dev = torch.device(device or "cpu")
    except RuntimeError as err:
        raise InputError(f"--device {device}: not a device name ({err}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise InputError(f"--device {device}: no CUDA GPU is available here (torch.cuda.is_available() is "
                             "False); use --device cpu, or leave --device out to pick the GPU when there is one")
        if dev.index is not None and dev.index >= count:
            raise InputError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    if device and device != "cuda":
        return dev
    if device == "cuda" or torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when the CPU reports bf16 instructions (AVX512-BF16 or AMX). Without them bf16 is emulated, far
    slower than fp32; with them it is not always faster either (``cpu_bf16_speedup``)."""
    flags = _cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


# bf16 is chosen for a CPU only when its matrix products beat fp32 by this much: bf16 also costs accuracy.
BF16_MIN_SPEEDUP = 1.15
# What --precision auto does on a CPU, in the words of the commands' --help.
CPU_AUTO_PRECISION = (f"a CPU whose bf16 matrix products measure at least {BF16_MIN_SPEEDUP:g}x faster than fp32 "
                      "(measured once per CPU and torch version, about 1 s, kept in $MLAE_CACHE_DIR, else "
                      "~/.cache/mlae: delete cpu_bf16.json there to measure again)")
# The matrix products of a small ViT's training step (tokens x width x 3*width, x 4*width, and back).
_PROBE_SHAPES = ((4096, 128, 384), (4096, 128, 512), (4096, 512, 128))


def _measure_bf16_speedup(rounds: int = 15) -> float:
    """fp32 time / bf16 time of ``_PROBE_SHAPES``, 1 thread, median of interleaved rounds (about 1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        mats = {dt: [(torch.randn(m, k, generator=gen).to(dt), torch.randn(k, n, generator=gen).to(dt))
                     for m, k, n in _PROBE_SHAPES] for dt in (torch.float32, torch.bfloat16)}

        def seconds(dt) -> float:
            t0 = time.perf_counter()
            for a, b in mats[dt]:
                a @ b
            return time.perf_counter() - t0

        for dt in mats:  # warm-up: first calls pick kernels
            seconds(dt)
        ratios = sorted(seconds(torch.float32) / seconds(torch.bfloat16) for _ in range(rounds))
        return ratios[len(ratios) // 2]
    finally:
        torch.set_num_threads(threads)


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (else what the platform module knows): the label that
    timings are tagged with, since they compare only between runs on one kind of CPU."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_identity() -> str:
    """The CPU as /proc/cpuinfo's first processor describes it: vendor, family, model, stepping and model name
    (cloud VMs often report a generic name such as "Intel(R) Xeon(R) Processor"), and whether it has AMX."""
    fields = {}
    for line in _cpuinfo().splitlines():
        if not line.strip():
            break  # the first processor is enough
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    parts = [fields.get(k, "?") for k in ("vendor_id", "cpu family", "model", "stepping")]
    return f"{fields.get('model name', 'unknown CPU')} ({'/'.join(parts)}) | amx {'amx_bf16' in _cpuinfo()}"


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster bf16 matrix products run than fp32 on this CPU (0 when it reports no bf16
    instructions). CPUs that report them differ widely: an AVX-512 bf16 AMD EPYC ran bf16 several times faster,
    an Intel Xeon VM with the same flags and no AMX at 0.7x. Measured once per CPU (:func:`_cpu_identity`) and
    torch version and kept in ``user_cache_dir()/cpu_bf16.json``, so that every run on a machine makes the same
    choice; delete that file to measure again (e.g. after a measurement on a busy machine)."""
    if not cpu_supports_bf16():
        return 0.0
    key = f"{_cpu_identity()} | torch {torch.__version__}"
    path = user_cache_dir() / "cpu_bf16.json"

    def known() -> dict:
        try:
            table = json.loads(path.read_text())
        except Exception:  # noqa: BLE001 - a damaged cache (unreadable, not JSON, ...) is measured again
            return {}
        return table if isinstance(table, dict) else {}

    with _file_lock(path.with_name(path.name + ".lock")):
        table = known()  # read under the lock: another process may have just measured
        if isinstance(table.get(key), (int, float)):
            return float(table[key])
        speedup = round(_measure_bf16_speedup(), 3)
        try:
            table[key] = speedup
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(table, indent=1, sort_keys=True) + "\n")
        except OSError:
            pass  # a read-only home: measured again next time
    return speedup


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map ``auto|bf16|fp32`` to ``bf16`` or ``fp32`` for ``device``: on CUDA bf16 where supported; on a CPU bf16
    only where its matrix products run at least ``BF16_MIN_SPEEDUP`` times faster than fp32 (measured)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise InputError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision == "bf16"``, a no-op otherwise (weights and optimizer stay fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def busy_cores(window: float = 0.3) -> float:
    """Cores other programs keep busy: the 1-minute load average, capped by the CPU time actually spent over a
    short window of /proc/stat. The load average alone also counts tasks in uninterruptible sleep (I/O, some
    VM housekeeping threads): on one 2-core VM it sat at 1.0 with both cores idle."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return 0.0

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]), idle

    try:
        import time

        total0, idle0 = sample()
        time.sleep(window)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return load
    spent = (total1 - total0) - (idle1 - idle0)
    used = cpu_cores() * spent / max(1, total1 - total0)
    return min(load, used)


# What a threads setting may be (TrainConfig.threads, the --threads of every command), in words for its errors.
THREADS_RULE = "an integer >= 1, or 0 for the cores other programs leave free"


def auto_threads(processes_per_node: int = 1) -> int:
    """CPU threads for torch: this process's share of the cores, minus those other programs keep busy.
    Oversubscribed OpenMP threads spin-wait on each other: on a busy 2-core machine, 2 threads ran a small ViT
    4-14x slower than 1."""
    cores = cpu_cores()
    share = max(1, cores // processes_per_node)
    return max(1, min(share, round(cores - busy_cores())))


def cpu_jobs(runs: int, jobs: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """(parallel jobs, torch threads per job) for ``runs`` independent CPU trainings. Default: one 1-thread job
    per free core. Small ViTs do not scale across threads: on 2 cores, two 1-thread training processes gave
    about 1.35x the images per second of one 2-thread process."""
    free = max(1, round(cpu_cores() - busy_cores()))
    if jobs is None:
        jobs = max(1, min(runs, free // (threads or 1)))
    if threads is None:
        threads = max(1, free // jobs)
    return jobs, threads


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a ``torchrun`` job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None, stack: contextlib.ExitStack | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment variables (nccl on CUDA, gloo on CPU).

    With ``stack``, a group this call created is left when the stack closes, after a barrier if no exception is
    propagating. Without it a rank that finishes first can abort at exit ("terminate called without an active
    exception"): gloo's worker thread frees its last all_reduce's tensors, which needs the GIL, while the
    interpreter is already finalizing. The barrier makes every earlier collective settle first. A group the
    caller created stays theirs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        if stack is not None:
            stack.push(lambda exc_type, *_: _leave_group(clean=exc_type is None))
    return info


def _leave_group(clean: bool) -> None:
    if dist.is_initialized():
        if clean:  # after a failure the other ranks may never reach it
            dist.barrier()
        dist.destroy_process_group()
