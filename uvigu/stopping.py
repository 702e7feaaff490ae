"""Stopping a run on SIGTERM without losing what it trained, on one process or on many.

A run stops in one of two ways:
  at a step boundary  the loop asks `StopOnSigterm.requested_anywhere()` (a collective: every process agrees on the
                      same step), stops there and saves that step;
  at once             when nothing since the last checkpoint could be lost (during setup, a compilation, an
                      evaluation after the save), the process exits 0 there and then, instead of after the compile,
                      step or evaluation its main thread is inside.
The second needs two things Python's own signal handling lacks. Python runs a handler only between bytecodes, so
not while XLA compiles or runs: a watcher thread waits on `signal.set_wakeup_fd`'s pipe and sees SIGTERM at once.
With several processes one cannot exit alone (the others would wait for it in their next collective, and
collectives are exactly what the main threads cannot make while inside XLA): the decision goes through the
`jax.distributed` coordination service's key-value store instead, from a thread on each process. The signalled
process posts the request; every process answers whether it holds anything unsaved; only when every answer is "no"
do all exit, the coordinator last. Otherwise they stop together at the next step boundary, as above.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging

_RUNS = itertools.count()  # one key space per run; processes start their runs in the same order
_POLL_MS = 500  # how often a key-value poll wakes to see whether the run has ended
_VOTE_MS = 20_000  # how long a process waits for the others' answers before leaving the stop to the loop


class StopOnSigterm:
    """Catches SIGTERM for the `with` block (the previous handler comes back after it).

    The run keeps it informed: `unsaved` (a step trained since the last checkpoint) and `saving_in_progress` (a
    callable: an asynchronous save still being written). Saves go through `hold_exit()`, so that no process exits at
    once while its save is starting. `before_exit` is called just before an immediate exit (e.g. to remove a lock
    note)."""

    def __init__(self):
        self.requested = False
        self.unsaved = False
        self.saving_in_progress: Callable[[], bool] = lambda: False
        self.before_exit: Callable[[], None] = lambda: None
        self._gate = threading.Lock()  # held by a vote; taken by saves
        self._closed = threading.Event()
        self._stack = contextlib.ExitStack()
        self._prefix = f"uvigu/stop/{next(_RUNS)}"

    # ------------------------------------------------------------------------------------------------ the run ----

    def requested_anywhere(self) -> bool:
        """True when SIGTERM reached any process (a collective: every process must call it at the same point)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        # The agreed answer is returned, and never written back as False: a watcher thread may set `requested`
        # while the gather runs, and that request must survive to the next call.
        agreed = bool(np.any(multihost_utils.process_allgather(np.asarray([self.requested]))))
        self.requested = self.requested or agreed
        return agreed

    @contextlib.contextmanager
    def hold_exit(self):
        """No immediate exit starts inside this block, and a decided one happens before it (never mid-save)."""
        with self._gate:
            yield

    # ------------------------------------------------------------------------------------------------- set-up ----

    def __enter__(self) -> StopOnSigterm:
        previous = signal.signal(signal.SIGTERM, self._python_handler)
        self._stack.callback(signal.signal, signal.SIGTERM, previous)
        if threading.current_thread() is threading.main_thread():  # set_wakeup_fd is main-thread only
            self._stack.enter_context(self._watch_signal())
        if jax.process_count() > 1:
            self._stack.enter_context(self._watch_other_processes())
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _python_handler(self, *_):
        self.requested = True

    @contextlib.contextmanager
    def _watch_signal(self):
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

        def watch():
            while data := os.read(read_fd, 512):
                if signal.SIGTERM in data:
                    self._on_sigterm()

        thread = threading.Thread(target=watch, name="sigterm-watch", daemon=True)
        thread.start()
        try:
            yield
        finally:
            signal.set_wakeup_fd(previous)
            os.close(write_fd)  # the watcher reads EOF and ends
            thread.join(timeout=5)
            os.close(read_fd)

    @contextlib.contextmanager
    def _watch_other_processes(self):
        thread = threading.Thread(target=self._poll, name="sigterm-poll", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._closed.set()
            thread.join(timeout=5 * _POLL_MS / 1000)

    # ------------------------------------------------------------------------------- from the watcher threads ----

    def _on_sigterm(self) -> None:
        self.requested = True
        if jax.process_count() > 1:
            with contextlib.suppress(Exception):  # another process posted it first
                _client().key_value_set(f"{self._prefix}/signal", str(jax.process_index()))
            return  # the poll thread of every process, this one included, takes it from here
        with self._gate:  # (as in a vote: never while a save is starting)
            if self._nothing_unsaved():
                self._exit_now()

    def _nothing_unsaved(self) -> bool:
        return not self.unsaved and not self.saving_in_progress()

    def _poll(self) -> None:
        client = _client()
        while not self._closed.is_set():
            started = time.monotonic()
            try:
                client.blocking_key_value_get(f"{self._prefix}/signal", _POLL_MS)
            except Exception:  # not posted yet (the wait timed out), or the service is going away: no busy loop
                self._closed.wait(max(0.0, _POLL_MS / 1000 - (time.monotonic() - started)))
                continue
            self.requested = True
            self._vote(client)
            return

    def _vote(self, client) -> None:
        """Every process answers whether it holds something unsaved; all "no": all exit now. The gate stays held
        from the answer on, so this process starts no save meanwhile (and never again once it exits)."""
        me, n = jax.process_index(), jax.process_count()
        self._gate.acquire()
        try:
            idle = self._nothing_unsaved()
            client.key_value_set(f"{self._prefix}/idle/{me}", "1" if idle else "0")
            answers = [client.blocking_key_value_get(f"{self._prefix}/idle/{i}", _VOTE_MS) for i in range(n)]
        except Exception as e:  # a process did not answer in time: the loop's collective stop remains
            logging.warning("SIGTERM: the processes did not all answer (%s); stopping at the next step", e)
            self._gate.release()
            return
        if not all(a == "1" for a in answers):
            logging.warning("SIGTERM: steps since the last checkpoint on some process; stopping at the next step")
            self._gate.release()
            return
        # The coordination service lives in process 0: it exits last, once the others have said they are going.
        if me == 0:
            with contextlib.suppress(Exception):
                for i in range(1, n):
                    client.blocking_key_value_get(f"{self._prefix}/exiting/{i}", _VOTE_MS)
                time.sleep(0.2)  # (they exit right after saying so)
        else:
            with contextlib.suppress(Exception):
                client.key_value_set(f"{self._prefix}/exiting/{me}", "1")
        self._exit_now()

    def _exit_now(self) -> None:
        logging.warning("SIGTERM with nothing unsaved since the last checkpoint%s: stopping now",
                        " on any process" if jax.process_count() > 1 else "")
        with contextlib.suppress(Exception):
            self.before_exit()
        logging.flush()
        os._exit(0)


def _client():
    """The `jax.distributed` coordination client (private in JAX; Orbax reaches it the same way)."""
    from jax._src import distributed

    if distributed.global_state.client is None:
        raise RuntimeError("several processes without jax.distributed.initialize")
    return distributed.global_state.client
