"""Command-line entry points (``[project.scripts]`` in pyproject.toml: ovseg-train, ovseg-eval, ovseg-predict, ...).

``scripts/*.py``, ``train.py`` and ``eval.py`` are thin wrappers around these modules. Every command shares one error
guard: a :class:`~ovseg_lab.errors.SetupError` (also one wrapped by Hydra's ``instantiate``), a full disk or an
unwritable output becomes one paragraph on stderr and exit status 2, never a traceback. Hydra commands (train, eval, mine) add the run-folder
lock and sweep handling of :func:`ovseg_lab.runner.main_guard`.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

from ovseg_lab.errors import as_user_error, report


def guarded(main: Callable[..., int | None]) -> Callable[..., int]:
    """Decorator for a command's ``main(argv=None) -> exit status``: user-facing errors -> :func:`report`, status 2."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return int(main(*args, **kwargs) or 0)
        except KeyboardInterrupt:
            print(f"\ninterrupted (Ctrl-C): {RERUN}\n", file=sys.stderr)
            return 130
        except Exception as err:
            setup = as_user_error(err)
            if setup is None:
                raise
            report(setup)
            return 2

    return wrapper


RERUN = "every file is written whole (complete or absent); rerun the same command."


@contextlib.contextmanager
def ctrl_c_exits_130(what_next: str = RERUN) -> Iterator[None]:
    """Ctrl-C inside the block (a command's imports: torch and Lightning take seconds) is one line and exit status
    130, not a KeyboardInterrupt traceback through the import machinery."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"\ninterrupted (Ctrl-C): {what_next}\n", file=sys.stderr)
        raise SystemExit(130) from None


def interruptible(main: Callable[..., Any], what_next: str) -> Callable[..., Any]:
    """Decorator for a Hydra command: Ctrl-C outside Lightning's own handling (composing, building the data, the
    final evaluation) is one line and exit status 130, not a KeyboardInterrupt traceback. Every record is written
    atomically, so what is on disk is complete; ``what_next`` says how to go on."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with ctrl_c_exits_130(what_next):
            return main(*args, **kwargs)

    return wrapper


def _tool(module: str) -> Callable[[], int]:
    """A command running ``<module>.main()`` (it parses sys.argv itself) under the guard."""

    @guarded
    def main() -> int:
        import importlib

        import ovseg_lab.resolvers  # noqa: F401

        importlib.import_module(module).main()
        return 0

    main.__name__ = main.__qualname__ = module.rpartition(".")[2]
    return main


# ovseg-benchmark, ovseg-gpu-check (scripts/benchmark.py, scripts/gpu_check.py): the tools print their JSON themselves
benchmark = _tool("ovseg_lab.tools.benchmark")
gpu_check = _tool("ovseg_lab.tools.gpu_check")
