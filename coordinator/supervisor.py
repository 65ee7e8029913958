"""One child process per run, of one kind: started, restarted with backoff when it dies, stopped, never orphaned.

``omi-coordinator serve`` runs three kinds of per-run processes, each a :class:`RunProcesses` that says only what
to start (a :class:`Launch`): the run's swarm bootstrap peer (:mod:`omi.coordinator.bootstrap`), its checkpointer
(:mod:`omi.coordinator.checkpointer`) and its built-in validator (:mod:`omi.coordinator.validators`). They are
processes of their own because hivemind must be created in a process's main thread, and the coordinator's main
thread serves the gRPC API.

How a child ends, whatever ends the coordinator:

- **stop and shutdown**: SIGTERM to the child (each stops gracefully on it), SIGKILL to its process group once
  ``grace`` seconds have passed. Every child leads a session of its own, so its group holds what it forked, and
  Ctrl-C in the coordinator's terminal reaches the coordinator alone, which stops its children in order;
- **the coordinator killed** (SIGKILL, a crash): the kernel sends the child SIGKILL (``PR_SET_PDEATHSIG``, set
  before the child's program starts, so no window where it runs unwatched), and what the child forked ends with
  it (:func:`omi.swarm.lifetime.end_with_parent`). SIGKILL, not SIGTERM: an orphan must not finish what it was
  doing (a checkpointer would publish a checkpoint beside the next coordinator's checkpointer). The kernel signals
  when the *thread* that started the child ends, so every child is started on the supervisor's own thread, which
  lives until :meth:`RunProcesses.shutdown`; that thread also watches the children. Linux only: elsewhere a killed
  coordinator's children keep running until their process group is killed.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from omi.coordinator.errors import Unavailable
from omi.swarm.lifetime import signal_when_parent_dies

logger = logging.getLogger(__name__)

WATCH_INTERVAL = 2.0  # seconds between two checks of the children
FIRST_BACKOFF = 2.0  # seconds before a dead child is started again; doubled at each death in a row
MAX_BACKOFF = 60.0  # the longest wait before a restart
STEADY = 60.0  # seconds a child must have run for its death to start the backoff over


@dataclass(frozen=True)
class Launch:
    """How to start one run's child process.

    :param command: the program and its arguments
    :param log: file its stdout and stderr are appended to (None: the coordinator's own, unless ``read_stdout``)
    :param read_stdout: the coordinator reads what it prints (``Popen.stdout``); its stderr stays the coordinator's
    :param stdin: returns one line for the child's stdin, called on a thread of its own once the child started
        (it may wait: the child starts up meanwhile); an exception closes its stdin with nothing written
    """

    command: list[str]
    log: Path | None = None
    read_stdout: bool = False
    stdin: Callable[[], str] | None = None

    def __post_init__(self):
        assert not (self.log and self.read_stdout), "a child's stdout goes to its log or to the coordinator, not both"


@dataclass
class _Child:
    wanted: bool = True  # keep it running (False: stopping, then forgotten)
    process: subprocess.Popen | None = None
    started_at: float = 0.0  # monotonic time of the last try to start it
    stopping_since: float | None = None  # when it was sent SIGTERM
    deaths: int = 0  # deaths in a row, each within STEADY seconds of its start
    restart_at: float = 0.0  # monotonic time before which it is not started again


class RunProcesses:
    """Keeps one child process per run running: starts it, restarts it with backoff when it dies, stops it.

    :param name: what the children are, for logs ("checkpointer")
    :param launch: run id -> :class:`Launch`; may raise :class:`omi.coordinator.errors.Unavailable` when the child
      cannot start yet (the watch tries again at its next check)
    :param started: called with the run id and the new process after each start (on the supervisor's thread)
    :param wanted: the run ids whose child should run, read at every check: the others are stopped (None: only
      :meth:`start` and :meth:`stop` say)
    :param grace: seconds a child has to stop on SIGTERM before its process group gets SIGKILL
    :param interval: seconds between two checks of the children

    >>> sleepers = RunProcesses("sleeper", lambda run_id: Launch(["sleep", "60"]))
    >>> sleepers.start("digits").poll() is None  # started now, on the supervisor's thread
    True
    >>> sleepers.start("digits") is None  # it runs already
    True
    >>> sleepers.shutdown()  # SIGTERM, and SIGKILL to its process group after `grace` seconds
    """

    def __init__(self, name: str, launch: Callable[[str], Launch], *,
                 started: Callable[[str, subprocess.Popen], None] = lambda run_id, process: None,
                 wanted: Callable[[], list[str]] | None = None, grace: float = 15.0,
                 interval: float = WATCH_INTERVAL):
        self.name, self.launch, self.started, self.wanted = name, launch, started, wanted
        self.grace, self.interval = grace, interval
        self._children: dict[str, _Child] = {}  # touched only on the supervisor's thread
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False  # set on the supervisor's thread, under _lock: no call is queued after it
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name=f"{name}-processes", daemon=True)
        self._thread.start()

    def start(self, run_id: str) -> subprocess.Popen | None:
        """Keep run ``run_id``'s child running: start it now unless it runs or waits out its backoff (any thread).

        :returns: the process started now (None: none was)
        :raises Unavailable: from ``launch``, when the child cannot start yet
        """
        return self._call(self._start, run_id)

    def stop(self, run_id: str) -> None:
        """Stop run ``run_id``'s child (SIGTERM now, SIGKILL after ``grace``) without waiting for it (any thread)."""
        self._call(self._stop, run_id)

    def process(self, run_id: str) -> subprocess.Popen | None:
        """Run ``run_id``'s current child process (None: none; one that just died until the next check)."""
        child = self._children.get(run_id)
        return None if child is None else child.process

    def shutdown(self) -> None:
        """Stop every child and wait for them (up to ``grace`` seconds, then SIGKILL); later starts do nothing."""
        self._call(self._shutdown)
        self._thread.join()

    def _call(self, fn: Callable, *args):
        if threading.current_thread() is self._thread:  # from a callback of the watch itself
            return fn(*args)
        done = Future()
        with self._lock:
            if self._closed:
                return None
            self._calls.put((fn, args, done))
        return done.result()

    def _serve(self) -> None:
        """The supervisor's thread: runs the calls in order and checks the children every ``interval`` seconds."""
        next_check = 0.0
        while not self._closed:
            wait = next_check - time.monotonic()
            if wait <= 0:  # due even while calls keep coming
                try:
                    self._check()
                except Exception:
                    logger.exception("%s supervision failed; retrying", self.name)
                next_check = time.monotonic() + self.interval
                continue
            try:
                fn, args, done = self._calls.get(timeout=wait)
            except queue.Empty:
                continue
            try:
                done.set_result(fn(*args))
            except BaseException as e:
                done.set_exception(e)
        while not self._calls.empty():  # calls that came after the shutdown
            self._calls.get()[2].set_result(None)

    def _start(self, run_id: str) -> subprocess.Popen | None:
        child = self._children.setdefault(run_id, _Child())
        child.wanted = True
        if child.process is not None or time.monotonic() < child.restart_at:
            return None  # it runs, or it is stopping (the watch starts it again once it ended), or it backs off
        return self._spawn(run_id, child)

    def _spawn(self, run_id: str, child: _Child) -> subprocess.Popen:
        child.started_at, child.stopping_since = time.monotonic(), None
        launch = self.launch(run_id)
        parent = os.getpid()

        def end_with_coordinator() -> None:  # in the child, before its program starts
            signal_when_parent_dies(signal.SIGKILL)
            if os.getppid() != parent:  # the coordinator died before the kernel was asked
                os._exit(1)

        log = open(launch.log, "ab") if launch.log else None  # noqa: SIM115 - the child holds it open
        try:
            child.process = subprocess.Popen(
                launch.command, stdout=subprocess.PIPE if launch.read_stdout else log,
                stdin=subprocess.PIPE if launch.stdin else None, stderr=subprocess.STDOUT if log else None,
                start_new_session=True, preexec_fn=end_with_coordinator)
        finally:
            if log is not None:
                log.close()
        logger.info("run %s: %s started (pid %d%s)", run_id, self.name, child.process.pid,
                    f", log {launch.log}" if launch.log else "")
        if launch.stdin is not None:
            threading.Thread(target=self._write_stdin, args=(run_id, child.process, launch.stdin),
                             name=f"{self.name}-stdin-{run_id}", daemon=True).start()
        self.started(run_id, child.process)
        return child.process

    def _write_stdin(self, run_id: str, process: subprocess.Popen, line: Callable[[], str]) -> None:
        try:
            text = line()
        except Exception as e:  # the child reads end-of-file, exits, and is restarted
            logger.warning("run %s: nothing to hand the %s (pid %d): %s", run_id, self.name, process.pid, e)
            text = None
        try:
            with process.stdin:
                if text is not None:
                    process.stdin.write((text.rstrip("\n") + "\n").encode())
        except OSError:  # it died meanwhile: the watch restarts it
            pass

    def _stop(self, run_id: str) -> None:
        child = self._children.get(run_id)
        if child is None or not child.wanted:
            return
        child.wanted = False
        if child.process is None:
            del self._children[run_id]
            return
        child.process.terminate()
        child.stopping_since = time.monotonic()
        logger.info("run %s: %s stopping", run_id, self.name)

    def _check(self) -> None:
        """Stop children no longer wanted, reap the dead ones and start again those still wanted."""
        if self.wanted is not None:
            wanted = set(self.wanted())
            for run_id in [r for r, child in self._children.items() if child.wanted and r not in wanted]:
                self._stop(run_id)
            for run_id in wanted:
                self._children.setdefault(run_id, _Child()).wanted = True
        now = time.monotonic()
        for run_id, child in list(self._children.items()):
            process = child.process
            if process is not None and process.poll() is not None:
                _kill_group(process)  # what it forked and left behind
                if child.stopping_since is not None:
                    logger.info("run %s: %s stopped", run_id, self.name)
                else:
                    self._back_off(child, now)
                    logger.warning("run %s: %s (pid %d) exited with code %s%s", run_id, self.name, process.pid,
                                   process.returncode,
                                   f"; restarting in {child.restart_at - now:.0f} s" if child.wanted else "")
                child.process = child.stopping_since = None
            elif child.stopping_since is not None and now - child.stopping_since > self.grace:
                _kill_group(process)
            if child.process is None and not child.wanted:
                del self._children[run_id]
            elif child.process is None and now >= child.restart_at:
                try:
                    self._spawn(run_id, child)
                except Unavailable as e:  # e.g. the run's swarm peer is still starting
                    logger.info("run %s: %s waits (%s)", run_id, self.name, e)
                except Exception:
                    logger.exception("run %s: starting the %s failed; retrying", run_id, self.name)
                    self._back_off(child, now)

    @staticmethod
    def _back_off(child: _Child, now: float) -> None:
        child.deaths = 1 if now - child.started_at >= STEADY else child.deaths + 1
        child.restart_at = now + min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (child.deaths - 1))

    def _shutdown(self) -> None:
        with self._lock:
            self._closed = True
        children = {run_id: child.process for run_id, child in self._children.items() if child.process is not None}
        self._children.clear()
        for process in children.values():
            process.terminate()
        deadline = time.monotonic() + self.grace
        for run_id, process in children.items():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("run %s: %s did not stop in %.0f s; killing it", run_id, self.name, self.grace)
            _kill_group(process)
            process.wait()
            logger.info("run %s: %s stopped", run_id, self.name)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL ``process``'s process group (it leads one): the process, if it still runs, and what it forked."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
