"""One error type for bad user input, turned into one stderr line and exit status 2 at the entry points."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """Bad input from the user (flag, file, checkpoint, model name): reported without a traceback."""


class Interrupted(Exception):
    """The run was stopped by a signal after saving a checkpoint; `code` is the exit status (128 + signal)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors can span a page), or its type name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _flush_logs() -> None:
    """Flush every log handler, so the lines logged so far come before the error line. Not `logging.shutdown()`:
    that closes handlers, and a library's handler (absl's, imported by rouge-score) closes the stream it was
    made with, which may be a stream the caller still uses (an in-process caller, a test's captured stderr)."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for handler in {h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers}:
        with contextlib.suppress(OSError, ValueError):
            handler.flush()


def leave(code: int) -> NoReturn:
    """Exit with status `code`. One process of several (torchrun, `accelerate launch`: WORLD_SIZE > 1) skips the
    interpreter's finalization, where the back ends' C++ threads meet objects already torn down and abort
    (SIGABRT, seen under FSDP and DeepSpeed), which would replace the status: as a finished one does
    (`cli.end_launched_process`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _flush_logs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def exits_cleanly(prog: str) -> Callable[[F], F]:
    """Decorate an entry point so a UserError becomes `prog: error: message` on stderr and exit 2.

    Ctrl-C becomes exit 130 with one line. Anything else is a bug and keeps its traceback.
    """

    def wrap(main: F) -> F:
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except UserError as e:
                _flush_logs()
                print(f"{prog}: error: {e}", file=sys.stderr)
                leave(2)
            except Interrupted as e:
                _flush_logs()
                print(f"{prog}: {e}", file=sys.stderr)
                leave(e.code)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                leave(130)

        return run  # type: ignore[return-value]

    return wrap
