"""Stopping a run cleanly when asked to: SIGTERM (what Slurm, Kubernetes and TPU VMs send before
they stop a job) and SIGINT (Ctrl-C).

The first signal is noted; the training loop asks ``requested()`` before each compiled call, so
the call under way finishes, a checkpoint is saved at the step reached and the run exits non-zero
(``Preempted``: 128 + the signal's number, as a shell reports a killed command). A second signal
stops the process at once, by the signal's default action: orbax writes a checkpoint into a
temporary folder and renames it when complete, so the newest complete checkpoint stays as it was.
In a multi-process run the processes agree, at the same call, on whether any of them was signalled.
"""

import os
import signal
import sys
import threading

import jax
import numpy as np

from resnet_flax.errors import UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(UserError):
    """The run stopped on a signal, after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum


class StopRequests:
    """While entered (in the main thread), SIGTERM and SIGINT ask the run to stop."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: stopping after the steps under way, with a checkpoint "
              "(a second signal stops at once)", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """Whether this process (or, in a multi-process run, any process) was signalled: in a
        multi-process run a collective, so every process must ask at the same points."""
        local = self.signum is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.int32(local))))

    @property
    def stopping_signal(self) -> int:
        """The signal this process got; SIGTERM where only another process of the run got one."""
        return self.signum or signal.SIGTERM

    @property
    def name(self) -> str:
        return signal.Signals(self.stopping_signal).name
