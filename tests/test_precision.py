"""--precision auto: bf16 on a CPU only where its bf16 matrix products measure faster than fp32."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mlae import hardware


FAKE_CPUINFO = ("vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Test CPU 9000\n"
                "stepping\t: 8\nflags\t\t: avx512f avx512_bf16\n\nprocessor\t: 1\nmodel name\t: Other\n")


@pytest.fixture
def fake_cpu(monkeypatch, tmp_path):
    """A CPU that reports bf16 instructions (what /proc/cpuinfo says is the only thing replaced; the measurement
    runs on this machine), with the per-user cache in a temporary folder."""
    monkeypatch.setenv("MLAE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: FAKE_CPUINFO)
    hardware.cpu_supports_bf16.cache_clear()
    hardware.cpu_bf16_speedup.cache_clear()
    yield tmp_path / "cpu_bf16.json"
    hardware.cpu_supports_bf16.cache_clear()
    hardware.cpu_bf16_speedup.cache_clear()


def test_measurement_is_a_ratio_and_leaves_the_thread_count():
    threads = torch.get_num_threads()
    ratio = hardware._measure_bf16_speedup(rounds=3)
    assert 0 < ratio < 100
    assert torch.get_num_threads() == threads


def test_measured_once_then_read_from_the_cache(fake_cpu):
    first = hardware.cpu_bf16_speedup()
    stored = json.loads(fake_cpu.read_text())
    (key,) = stored
    assert key.startswith("Test CPU 9000 (GenuineIntel/6/143/8) | amx False | torch ")
    assert stored[key] == pytest.approx(first, abs=1e-3)
    # Another process on this machine reads the stored value instead of measuring again: the choice is stable.
    for value, expected in ((9.0, "bf16"), (0.5, "fp32"), (hardware.BF16_MIN_SPEEDUP, "bf16")):
        fake_cpu.write_text(json.dumps({key: value}))
        hardware.cpu_bf16_speedup.cache_clear()
        assert hardware.cpu_bf16_speedup() == value
        assert hardware.resolve_precision("auto", torch.device("cpu")) == expected
    assert hardware.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # an explicit choice is kept
    assert hardware.resolve_precision("fp32", torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("damage", ["[not a table", "[" * 100_000, "[1, 2]"])
def test_a_damaged_cache_is_measured_again_and_rewritten(fake_cpu, damage):
    fake_cpu.write_text(damage)  # not JSON; nested past the parser's recursion limit; JSON but not a table
    assert hardware.cpu_bf16_speedup() > 0
    assert isinstance(json.loads(fake_cpu.read_text()), dict)


def test_cpus_that_share_a_model_name_are_measured_apart(fake_cpu, monkeypatch):
    hardware.cpu_bf16_speedup()
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: FAKE_CPUINFO.replace("model\t\t: 143", "model\t\t: 207"))
    hardware.cpu_bf16_speedup.cache_clear()
    hardware.cpu_bf16_speedup()
    assert len(json.loads(fake_cpu.read_text())) == 2


def test_processes_that_start_together_measure_once(tmp_path):
    """Parallel `mlae compare` jobs (or torchrun ranks) start at once: the first measures under a file lock, the
    others wait and read its value, so that all of them choose the same precision."""
    code = ("from mlae import hardware; hardware._cpuinfo = lambda: 'model name : Race CPU\\nflags : avx512_bf16\\n'; "
            "print(hardware.cpu_bf16_speedup())")
    env = {**os.environ, "MLAE_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    values = {float(p.communicate(timeout=120)[0]) for p in procs}
    assert len(values) == 1 and all(p.returncode == 0 for p in procs)
    assert list(json.loads((tmp_path / "cpu_bf16.json").read_text()).values()) == list(values)


def test_no_bf16_instructions_means_fp32_without_measuring(monkeypatch, tmp_path):
    monkeypatch.setenv("MLAE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: "model name\t: Old CPU\nflags\t\t: avx2\n")
    hardware.cpu_supports_bf16.cache_clear()
    hardware.cpu_bf16_speedup.cache_clear()
    try:
        assert hardware.cpu_bf16_speedup() == 0.0
        assert hardware.resolve_precision("auto", torch.device("cpu")) == "fp32"
        assert not (tmp_path / "cpu_bf16.json").exists()
    finally:
        hardware.cpu_supports_bf16.cache_clear()
        hardware.cpu_bf16_speedup.cache_clear()
