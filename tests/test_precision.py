"""--precision auto: bf16 on a CPU only where its bf16 matrix products measure faster than fp32."""
from __future__ import annotations

import json

import pytest
import torch

from mlae import utils


@pytest.fixture
def fake_cpu(monkeypatch, tmp_path):
    """A CPU that reports bf16 instructions (what /proc/cpuinfo says is the only thing replaced; the measurement
    runs on this machine), with the per-user cache in a temporary folder."""
    monkeypatch.setenv("MLAE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(utils, "_cpuinfo", lambda: "model name\t: Test CPU 9000\nflags\t\t: avx512f avx512_bf16\n")
    utils.cpu_supports_bf16.cache_clear()
    utils.cpu_bf16_speedup.cache_clear()
    yield tmp_path / "cpu_bf16.json"
    utils.cpu_supports_bf16.cache_clear()
    utils.cpu_bf16_speedup.cache_clear()


def test_measurement_is_a_ratio_and_leaves_the_thread_count():
    threads = torch.get_num_threads()
    ratio = utils._measure_bf16_speedup(rounds=3)
    assert 0 < ratio < 100
    assert torch.get_num_threads() == threads


def test_measured_once_then_read_from_the_cache(fake_cpu):
    first = utils.cpu_bf16_speedup()
    stored = json.loads(fake_cpu.read_text())
    (key,) = stored
    assert key.startswith("Test CPU 9000 | torch ") and stored[key] == pytest.approx(first, abs=1e-3)
    # Another process on this machine reads the stored value instead of measuring again: the choice is stable.
    for value, expected in ((9.0, "bf16"), (0.5, "fp32"), (utils.BF16_MIN_SPEEDUP, "bf16")):
        fake_cpu.write_text(json.dumps({key: value}))
        utils.cpu_bf16_speedup.cache_clear()
        assert utils.cpu_bf16_speedup() == value
        assert utils.resolve_precision("auto", torch.device("cpu")) == expected
    assert utils.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # an explicit choice is kept
    assert utils.resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_an_unreadable_cache_is_measured_again_and_rewritten(fake_cpu):
    fake_cpu.write_text("[not a table")
    assert utils.cpu_bf16_speedup() > 0
    assert isinstance(json.loads(fake_cpu.read_text()), dict)


def test_no_bf16_instructions_means_fp32_without_measuring(monkeypatch, tmp_path):
    monkeypatch.setenv("MLAE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(utils, "_cpuinfo", lambda: "model name\t: Old CPU\nflags\t\t: avx2\n")
    utils.cpu_supports_bf16.cache_clear()
    utils.cpu_bf16_speedup.cache_clear()
    try:
        assert utils.cpu_bf16_speedup() == 0.0
        assert utils.resolve_precision("auto", torch.device("cpu")) == "fp32"
        assert not (tmp_path / "cpu_bf16.json").exists()
    finally:
        utils.cpu_supports_bf16.cache_clear()
        utils.cpu_bf16_speedup.cache_clear()
