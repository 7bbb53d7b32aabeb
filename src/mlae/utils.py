"""Device, precision, seeding and random-state helpers, atomic writes, safetensors headers, folder locks and the
parsers of option values, shared by the commands."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open

from .errors import InputError, MissingFileError, RunDirError

__all__ = [
    "DistInfo",
    "auto_threads",
    "autocast",
    "busy_cores",
    "cpu_cores",
    "cpu_jobs",
    "cpu_bf16_speedup",
    "cpu_supports_bf16",
    "get_rng_state",
    "pyplot",
    "save_png",
    "init_distributed",
    "parse_bool",
    "parse_list",
    "read_safetensors_header",
    "resolve_device",
    "resolve_precision",
    "seed_everything",
    "set_rng_state",
    "user_cache_dir",
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


def user_cache_dir() -> Path:
    """Where mlae caches per-user files: ``$MLAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mlae``, else ``~/.cache/mlae``."""
    return Path(os.environ.get("MLAE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mlae"))


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


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock on ``path`` (created if needed), where the platform and the folder allow one:
    the parallel jobs of `mlae compare`/`sweep` and the ranks of a CPU torchrun start at once, and only the first
    should measure. Without a lock (no fcntl, a read-only folder) it does nothing."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except (ImportError, OSError):
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """The torch (CPU and CUDA), numpy and Python random states as (tensors, JSON-able dict)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, py_state, gauss = random.getstate()
    return tensors, {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
                     "python": [version, list(py_state), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Inverse of :func:`get_rng_state`."""
    torch.set_rng_state(tensors["torch"].cpu())
    cuda = [tensors[f"cuda.{i}"].cpu() for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = info["python"]
    random.setstate((version, tuple(py_state), gauss))


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


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it, and setting it
    briefly would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write a file through a uniquely named temporary file + ``os.replace``: a crash or a concurrent reader
    never sees half a file, and a failed write leaves no temporary file behind. ``write(tmp_path: str)``.
    The file gets the mode a plain ``open()`` would give it (writers such as safetensors create 0600 files)."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def parse_bool(text: str | bool) -> bool:
    """An option's boolean from the command line or a recipe: 1/true/yes/on or 0/false/no/off (any case)."""
    if isinstance(text, bool):
        return text
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise InputError(f"not a boolean: {text!r}")


def parse_list(text: str | list | tuple) -> list[str]:
    """A list option: a YAML list as it is, or text separated by commas and/or spaces (``qkv,proj``)."""
    return list(text) if isinstance(text, (list, tuple)) else [t for t in re.split(r"[,\s]+", text) if t]


def read_safetensors_header(path: str | os.PathLike, what: str = "file", note: str = "") -> dict[str, str]:
    """The string metadata of a safetensors file, read without its tensors. A missing file is a MissingFileError
    ("<what> not found"), anything else safetensors cannot parse (truncated, a pickle) an InputError that ends
    with ``note``."""
    if not Path(path).is_file():
        raise MissingFileError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:  # safetensors raises several types for truncated/foreign files
        raise InputError(f"{path} is not a readable safetensors file ({err}){note}") from None


def pyplot():
    """matplotlib's pyplot on the Agg backend (figures to files, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Write ``fig`` as a PNG through :func:`atomic_write` and close it."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    pyplot().close(fig)


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """safetensors ``save_file`` through :func:`atomic_write` (parent folder created), so a crash never leaves
    half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except Exception as err:  # SafetensorError, which is no OSError even for a full disk
            code = re.search(r"\(os error (\d+)\)", str(err))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from err

    atomic_write(path, write)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


LOCK_FILE = ".mlae.lock"


class FolderLock:
    """One process's exclusive claim on an output folder: ``<folder>/.mlae.lock`` names the owner (pid, host,
    start, command) and is ``flock``-ed while held, so the kernel frees it the moment its owner dies. The lock
    left behind by a dead process on this host is taken over with a note; one from another host is refused
    (whether that process still runs cannot be known from here). Use as a context manager."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._made_folder = False

    def __enter__(self) -> "FolderLock":
        import fcntl  # POSIX only, like the rest of the run-folder machinery

        if self.folder.exists() and not self.folder.is_dir():
            raise RunDirError(f"{self.folder} is a file, not a folder; choose another --out")
        try:
            self._made_folder = self._made_folder or not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunDirError(f"cannot write to {self.folder}: {err.strerror}; choose another --out") from None
        host = socket.gethostname()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        except OSError:  # a file system without locks (some network mounts): judge by the recorded owner alone
            held = None
        if not held and (not self.path.exists() or os.stat(self.path).st_ino != os.fstat(fd).st_ino):
            os.close(fd)  # its owner removed the file between our open and our lock: claim the new one
            return self.__enter__()
        try:
            owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            owner = {}
        mine = owner.get("host") == host
        if owner and not held and mine and (held is False or not pid_alive(int(owner.get("pid", 0)))):
            print(f"note: {self.folder} was locked by process {owner.get('pid')}, which has ended; taking the lock "
                  "over", file=sys.stderr)
        elif held or owner:
            os.close(fd)
            self._made_folder = False
            since = time.strftime("%Y-%m-%d %H:%M", time.localtime(owner["since"])) if "since" in owner else "?"
            hint = "wait for it to finish or choose another --out" if held or mine else (
                f"if it no longer runs, delete {self.path}")
            raise RunDirError(f"{self.folder} is in use by process {owner.get('pid', '?')} on "
                              f"{owner.get('host', '?')} since {since} ({owner.get('command', '?')}); {hint}")
        record = {"pid": os.getpid(), "host": host, "since": time.time(), "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        # Remove the file while still holding the lock; a process that opened it meanwhile sees it gone and retries.
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self._made_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # leave no empty folder behind a run that failed before writing anything
