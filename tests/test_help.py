"""The command line says what it does: `--help` read as a user reads it, `--version`, bare `mlae`."""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlae.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _help(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([*argv, "--help"])
        except SystemExit as exit_:
            assert exit_.code == 0
    return out.getvalue()


def _commands(*prefix: str) -> list[tuple[str, ...]]:
    """Every command and subcommand as `mlae ... --help` lists them (a new one is checked once it registers)."""
    text = _help(*prefix)
    if "\npositional arguments:\n" not in text:
        return [prefix]
    listed = text.split("\npositional arguments:\n")[1].split("\noptions:\n")[0]
    names = re.findall(r"^    (\w[\w-]*)(?:  |$)", listed, re.M)
    return [c for name in names for c in _commands(*prefix, name)] or [prefix]


COMMANDS = _commands()


def help_text(monkeypatch, *argv: str) -> str:
    monkeypatch.setenv("COLUMNS", "120")  # argparse wraps to the terminal width
    return _help(*argv)


def options(text: str) -> dict[str, str]:
    """``{"--masking {stochastic,fixed,mixed}": "expert masking: ..."}``: each option's invocation and its help,
    joined over wrapped lines, from the option sections (``options:`` and the groups), not the epilog."""
    entries: dict[str, str] = {}
    key, in_section = None, False
    for line in text.splitlines():
        m = re.match(r"^  (-\S.*?)(?:\s{2,}(.*))?$", line)
        if re.match(r"^\S[^:]*:$", line):  # "options:", "method options (...):", ...
            in_section, key = True, None
        elif not line.startswith(" ") and line.strip():  # the epilog
            in_section, key = False, None
        elif in_section and m:
            key = m.group(1)
            entries[key] = m.group(2) or ""
        elif in_section and key is not None and line.startswith(" " * 4) and line.strip():
            entries[key] = (entries[key] + " " + line.strip()).strip()
        else:
            key = None
    return entries


def entry(entries: dict[str, str], flag: str) -> tuple[str, str]:
    found = [(k, v) for k, v in entries.items() if k.split()[0].rstrip(",") == flag]
    assert len(found) == 1, (flag, list(entries))
    return found[0]


def test_switches_say_what_they_do(capsys, monkeypatch):
    opts = options(help_text(monkeypatch, "train"))
    _, adaptive = entry(opts, "--no-adaptive")
    assert adaptive.startswith("freeze the expert coefficients at --coeff-init") and "default True" not in adaptive
    _, rescale = entry(opts, "--no-rescale")
    assert rescale.startswith("do not scale the kept branches") and "default True" not in rescale
    _, per_branch = entry(opts, "--rank-per-branch")
    assert per_branch.startswith("give every branch the full rank") and "default False" not in per_branch


def test_choices_are_listed_and_enforced(capsys, monkeypatch):
    opts = options(help_text(monkeypatch, "train"))
    assert entry(opts, "--masking")[0] == "--masking {stochastic,fixed,mixed}"
    assert entry(opts, "--pattern")[0] == "--pattern {uniform,incremental,decremental,hourglass,protruding,random}"
    assert entry(opts, "--mask-granularity")[0] == "--mask-granularity {batch,sample}"
    for flag in ("--masking", "--pattern", "--mask-granularity"):
        with pytest.raises(SystemExit) as exit_:
            main(["train", flag, "bogus"])
        assert exit_.value.code == 2
        assert f"argument {flag}: invalid choice: 'bogus'" in capsys.readouterr().err


def test_list_defaults_read_as_typed(capsys, monkeypatch):
    text = help_text(monkeypatch, "train")
    opts = options(text)
    assert entry(opts, "--target-modules")[1].endswith("; default qkv]")
    assert entry(opts, "--experts-from")[1].endswith("[mole; default none]")
    assert "['" not in text and "[]" not in text


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_option_has_help(command, monkeypatch):
    assert {("train",), ("eval",), ("export",), ("sweep",), ("analyze", "similarity")} <= set(COMMANDS)
    opts = options(help_text(monkeypatch, *command))
    assert len(opts) > 2
    assert not [k for k, v in opts.items() if not v], f"options of `mlae {' '.join(command)}` without help"


def test_version(capsys):
    import tomllib

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"mlae {version}"


def test_bare_mlae_prints_help_and_starts_nothing(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mlae"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stdout.startswith("usage: mlae") and "mlae train" in run.stdout
    assert all(f"    {c[0]} " in run.stdout for c in COMMANDS)
    assert list(tmp_path.iterdir()) == []  # no run folder: no training started


def test_run_sh_without_arguments_is_still_the_main_job(tmp_path):
    """README's first command, `bash scripts/run.sh`: with no arguments it must start `mlae train`. The venv is
    a stand-in folder whose `mlae` is this interpreter's mlae (setup.sh sees it installed); the training is
    stopped once its run folder exists."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / "bin" / "mlae").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mlae "$@"\n')
    (venv / "bin" / "mlae").chmod(0o755)
    (venv / ".mlae-installed-train").touch()
    os.utime(venv / ".mlae-installed-train", (time.time() + 3600,) * 2)  # newer than pyproject.toml
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "run.sh")], cwd=work, env={**os.environ,
                            "MLAE_VENV": str(venv)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not list((work / "runs").glob("digits_mlae_s0*/config.yaml")):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "mlae train did not start"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
