"""`mlae` command line.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds a parser and sets
``func`` (called with the parsed namespace). Keeping the commands apart keeps this file a table of contents.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import warnings

# module name -> subcommands it registers (the module is imported only when present, so that partial
# installs, e.g. without the training extras, still give a helpful --help).
COMMAND_MODULES = [
    "mlae.commands.train",     # train, eval, predict, export
    "mlae.commands.pretrain",  # pretrain
    "mlae.commands.sweep",     # sweep
    "mlae.commands.compare",   # compare
    "mlae.commands.analyze",   # analyze
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="mlae",
        description="Parameter-efficient fine-tuning of vision transformers with Masked LoRA Experts (MLAE), "
        "DMLoRA, MoLE and the LoRA / linear-probe / full fine-tuning baselines.",
        epilog="`mlae train` with no options is the main job: MLAE on the embedded backbone and task, a few "
        "minutes on a CPU. `mlae COMMAND --help` describes a command.",
    )
    parser.add_argument("--version", action="version", version=f"mlae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and (err.name == name or name.startswith(err.name + ".")):
                continue  # that command is not written yet
            raise
        module.register(sub)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Our own warnings (mlae.MLAEWarning) as one ``mlae: warning:`` line, like our errors, not in Python's
    format (file, line and source line); other libraries' keep Python's, which says where they come from."""
    from .errors import MLAEWarning

    if issubclass(category, MLAEWarning):
        return f"mlae: warning: {message}\n"
    return _PYTHON_FORMAT(message, category, filename, lineno, line)


_PYTHON_FORMAT = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    before = warnings.formatwarning
    warnings.formatwarning = _format_warning
    # SIGTERM (`kill`, a batch scheduler's stop) ends a command as Ctrl-C does: a run keeps its checkpoint and
    # says how to continue, locks are released, `mlae compare` stops its runs.
    term = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        return _main(argv)
    finally:  # a caller that runs main() in its own process (a test, a notebook) gets its settings back
        warnings.formatwarning = before
        if term is not None:
            signal.signal(signal.SIGTERM, term)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        # No command: list the commands rather than start a training nobody named. Exit 2 like a usage error,
        # so that a script that ran bare `mlae` expecting training fails instead of passing silently.
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
