"""One background thread per logger for the figures: drawing them (matplotlib, about 0.4 s a
probe on the quickstart) runs while training goes on, in probe order, on rank 0.

``finish`` waits for everything submitted (so does the interpreter's exit, for a script that
never closes its monitor); an error in the thread is raised again at the next ``submit`` or at
``finish`` (never lost).
"""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Callable
from typing import Any


class Worker:
    """Args:
        name: the thread's name (``memsurgery-tensorboard``).
        background: False runs every job at once, in the caller's thread.
    """

    def __init__(self, name: str, background: bool = True) -> None:
        self.name, self.background = name, background
        self._q: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.busy_s = 0.0  # time spent in jobs (what the figures cost)
        self._atexit = False

    def submit(self, job: Callable[[], Any]) -> None:
        self._raise()
        if not self.background:
            self._run(job)
            self._raise()
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
            if not self._atexit:  # a script that never closes its monitor still gets its last figures
                atexit.register(self._at_exit)
                self._atexit = True
        self._q.put(job)

    def _run(self, job: Callable[[], Any]) -> None:
        import time

        t = time.perf_counter()
        try:
            job()
        except BaseException as e:  # kept, raised in the training thread
            if self._error is None:
                self._error = e
        finally:
            self.busy_s += time.perf_counter() - t

    def _loop(self) -> None:
        while True:
            job = self._q.get()
            try:
                if job is None:
                    return
                self._run(job)
            finally:
                self._q.task_done()

    def drain(self) -> None:
        """Wait for every submitted job; raise the first error one of them had."""
        if self._thread is not None and self._thread.is_alive():
            self._q.join()
        self._raise()

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        self._thread = None
        self._raise()

    def _at_exit(self) -> None:
        import contextlib

        with contextlib.suppress(BaseException):  # the interpreter is exiting: nothing to raise into
            if self._thread is not None and self._thread.is_alive():
                self._q.join()

    def _raise(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise RuntimeError(f"memsurgery's {self.name} logger failed while drawing a probe's figures: "
                               f"{type(e).__name__}: {e}") from e
