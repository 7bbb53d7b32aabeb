"""Files and folders: the per-user cache folder, atomic writes (text, safetensors), safetensors headers, advisory
file locks and the exclusive lock on an output folder."""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import time
import uuid
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import InputError, MissingFileError, RunDirError

__all__ = [
    "LOCK_FILE",
    "FolderLock",
    "atomic_save_file",
    "atomic_write",
    "atomic_write_text",
    "pid_alive",
    "read_safetensors_header",
    "user_cache_dir",
]


def user_cache_dir() -> Path:
    """Where mlae caches per-user files: ``$MLAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mlae``, else ``~/.cache/mlae``."""
    return Path(os.environ.get("MLAE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mlae"))


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock on ``path`` (created if needed), where the platform and the folder allow one:
    the parallel jobs of `mlae compare`/`sweep` and the ranks of a CPU torchrun start at once, and only the first
    should measure (:func:`mlae.hardware.cpu_bf16_speedup`). Without a lock (no fcntl, a read-only folder) it does
    nothing."""
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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


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
