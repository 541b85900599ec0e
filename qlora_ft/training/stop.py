"""Stopping on a signal: finish the optimizer step, save a checkpoint, exit 130 (SIGINT) or 143 (SIGTERM)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import torch

log = logging.getLogger(__name__)


class StopRequest:
    """SIGINT/SIGTERM during training: the first one lets the current optimizer step finish, after which the
    loop saves a checkpoint and stops (exit status 130/143); a second one exits at once (checkpoints are
    written atomically, so that cannot damage one)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        log.warning("%s: finishing this step, then saving a checkpoint (again to stop at once)",
                    signal.Signals(signum).name)  # fmt: skip

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self, engine) -> bool:
        """Whether to stop now. Collective with several processes: all stop at the same step if any got a signal."""
        if engine.world > 1:
            signum = int(engine.gather_rows(torch.tensor([self.signum or 0])).max())
            self.signum = self.signum or signum or None
        return self.signum is not None
