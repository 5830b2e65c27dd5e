"""Real child processes for tests: start, watch, freeze, stop -- always by pid.

Every server a test needs (Valkey, Tansu, the sidecar itself later) runs as a
:class:`ManagedProcess`: its own process group, its output appended to a log file
the test can read afterwards, and a ``stop()`` that escalates to SIGKILL of the
whole group so a wedged or frozen process can never outlive the test run.

Nothing here is reaped early: liveness checks use ``waitid(..., WNOWAIT)`` so the
exited leader stays a zombie (keeping its pid/pgid reserved) until ``stop()`` or
``kill()`` has swept the rest of its process group. That makes the group kill
safe against pid reuse.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal as _signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

LOG_TAIL_CHARS = 2000

_registry: set[ManagedProcess] = set()
_registry_lock = threading.RLock()  # re-entrant: the signal handler may run while it is held


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago.

    There is a small race between closing the probe socket and the server binding
    the port; the ``start_*`` helpers retry on a bind failure for that reason.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _exit_code_from_siginfo(info: os.waitid_result) -> int:
    """Translate a ``waitid`` result into a ``Popen.returncode``-style int."""
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return -info.si_status


class ManagedProcess:
    """A child process in its own session whose output goes to ``log_path``.

    Use it when a test needs a real server or a real misbehaving process. It is
    started by the constructor; stop it with :meth:`stop` (graceful, then SIGKILL),
    :meth:`kill`, or by using it as a context manager. Any instance still alive at
    interpreter exit is SIGKILLed by an ``atexit`` hook.
    """

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        log_path: str | os.PathLike[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.argv: list[str] = [os.fspath(a) for a in argv]
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._exit_code: int | None = None
        self._reaped = False
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        with _registry_lock:
            _registry.add(self)

    # --- identity and state -------------------------------------------------

    @property
    def pid(self) -> int:
        """The child's pid, which is also its process-group id."""
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit code once the process has exited (negative = killed by signal), else None."""
        self._check_exit()
        return self._exit_code

    def alive(self) -> bool:
        """True while the process has not exited (a SIGSTOPped process is alive)."""
        return self._check_exit() is None

    def frozen(self) -> bool:
        """True if every thread of the process is stopped (state ``T`` in /proc), e.g. after SIGSTOP."""
        states = self._thread_states()
        return self.alive() and bool(states) and all(st in ("T", "t") for st in states)

    def _thread_states(self) -> list[str]:
        """One-letter states of all threads from ``/proc/<pid>/task/*/stat`` ([] where unavailable)."""
        states: list[str] = []
        for stat_file in Path(f"/proc/{self.pid}/task").glob("*/stat"):
            try:
                states.append(stat_file.read_text().rpartition(")")[2].split()[0])
            except (OSError, IndexError):
                continue
        return states

    def _check_exit(self) -> int | None:
        """Record the exit code if the child has exited, without reaping it."""
        if self._exit_code is not None:
            return self._exit_code
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped by someone else; ask Popen for the code
            self._reaped = True
            self._exit_code = self._popen.poll()
            return self._exit_code
        if info is not None:
            self._exit_code = _exit_code_from_siginfo(info)
        return self._exit_code

    def __repr__(self) -> str:
        if self.alive():
            state = "frozen" if self.frozen() else "running"
        else:
            state = f"exited({self._exit_code})"
        return f"<ManagedProcess {self.argv[:3]!r} pid={self.pid} {state}>"

    # --- waiting and signalling -----------------------------------------------

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` seconds (None = forever) for exit; return the code or None.

        Does not reap, so a later :meth:`stop` can still sweep the process group.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.001
        while (code := self._check_exit()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return code

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the pid; SIGSTOP/SIGCONT return only once the freeze/thaw took effect.

        SIGSTOP reaches a multi-threaded server's threads asynchronously, so this
        waits (up to 5 s) until all threads show as stopped -- after it returns
        the server will not answer. Raises ProcessLookupError if it already exited.
        """
        if not self.alive():
            raise ProcessLookupError(f"{self!r} has exited; not sending {_signal.Signals(sig).name}")
        os.kill(self.pid, sig)
        if sig == _signal.SIGSTOP:
            wait_until(self.frozen, 5.0, what=f"pid {self.pid} to stop", proc=self, interval=0.005)
        elif sig == _signal.SIGCONT:
            wait_until(lambda: not self.frozen(), 5.0, what=f"pid {self.pid} to continue", interval=0.005)

    def _signal_group(self, sig: int) -> None:
        """Send ``sig`` to the whole process group; safe because the leader is not yet reaped."""
        if self._reaped:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def _reap(self) -> int | None:
        """Sweep leftovers in the group, reap the leader, drop it from the registry."""
        self._signal_group(_signal.SIGKILL)
        if not self._reaped:
            with contextlib.suppress(ChildProcessError):
                self._popen.wait()
            self._reaped = True
        with _registry_lock:
            _registry.discard(self)
        return self._exit_code

    def stop(self, timeout: float = 5.0, sig: int = _signal.SIGTERM) -> int | None:
        """Ask the process to exit with ``sig``; SIGKILL the group after ``timeout`` s.

        Also sends SIGCONT so a frozen process can act on ``sig``. Idempotent.
        Returns the exit code (negative signal number if killed by a signal).
        """
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
                os.kill(self.pid, _signal.SIGCONT)
            if self.wait(timeout) is None:
                self._signal_group(_signal.SIGKILL)
                self.wait(5.0)
        return self._reap()

    def kill(self) -> int | None:
        """SIGKILL the whole process group at once (a crash, not a shutdown); return the exit code."""
        if self.alive():
            self._signal_group(_signal.SIGKILL)
            self.wait(5.0)
        return self._reap()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- logs -----------------------------------------------------------------

    def log_text(self) -> str:
        """Everything the process wrote to stdout/stderr so far (undecodable bytes replaced)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The last ``chars`` characters of the log, for error messages."""
        return self.log_text()[-chars:]

    def log_lines_json(self) -> list[dict[str, Any]]:
        """Each log line that parses as a JSON object, in order; other lines are skipped."""
        records: list[dict[str, Any]] = []
        for line in self.log_text().splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                records.append(obj)
        return records


def live_processes() -> list[ManagedProcess]:
    """ManagedProcesses started but not yet stopped (for leak assertions in tests)."""
    with _registry_lock:
        return [p for p in _registry if p.alive()]


@atexit.register
def _kill_leftovers() -> None:
    """Belt and braces: SIGKILL anything a skipped fixture teardown left running."""
    with _registry_lock:
        leftovers = list(_registry)
    for proc in leftovers:
        with contextlib.suppress(Exception):
            proc.kill()


def _kill_leftovers_then_die(signum: int, _frame: object) -> None:
    """On SIGTERM/SIGHUP (e.g. a CI job cancelled), SIGKILL our children, then die of the same signal.

    atexit does not run when the interpreter is killed by a signal, and the
    children live in their own sessions, so without this they would be orphaned.
    Bypasses Popen (its locks may be held by the interrupted code): raw killpg,
    then a raw waitpid so no zombies are handed to init.
    """
    with _registry_lock:
        leftovers = list(_registry)
    for proc in leftovers:
        proc._signal_group(_signal.SIGKILL)
    for proc in leftovers:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc.pid, 0)
    _signal.signal(signum, _signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_signal_cleanup() -> None:
    """Hook SIGTERM/SIGHUP only where nobody else has (default handler, main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (_signal.SIGTERM, _signal.SIGHUP):
        if _signal.getsignal(sig) is _signal.SIG_DFL:
            _signal.signal(sig, _kill_leftovers_then_die)


_install_signal_cleanup()


class ProcessDiedError(TimeoutError):
    """The process being waited on exited before it became ready (e.g. lost a port-bind race)."""


def _died_error(proc: ManagedProcess, what: str) -> ProcessDiedError:
    """A ProcessDiedError explaining that ``proc`` exited while we waited for ``what``."""
    return ProcessDiedError(
        f"{proc!r} exited with code {proc.returncode} while waiting for {what}; "
        f"log tail ({proc.log_path}):\n{proc.log_tail()}"
    )


def _timeout_error(what: str, timeout: float, proc: ManagedProcess | None, last: object) -> TimeoutError:
    """A TimeoutError naming what never became ready, with the log tail when there is a process."""
    msg = f"timed out after {timeout:.1f}s waiting for {what} (last error: {last!r})"
    if proc is not None:
        msg += f"; {proc!r} log tail ({proc.log_path}):\n{proc.log_tail()}"
    return TimeoutError(msg)


def wait_until(
    check: Callable[[], object],
    timeout: float,
    *,
    what: str,
    proc: ManagedProcess | None = None,
    interval: float = 0.05,
) -> object:
    """Call ``check`` until it returns truthy without raising; return that value.

    Use for readiness probes. Fails fast with ProcessDiedError (a TimeoutError)
    and the log tail if ``proc`` dies, and raises TimeoutError (also with the log tail) once ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        if proc is not None and not proc.alive():
            raise _died_error(proc, what)
        try:
            result = check()
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last = exc
        else:
            if result:
                return result
            last = result
        if time.monotonic() >= deadline:
            raise _timeout_error(what, timeout, proc, last)
        time.sleep(interval)


def _can_connect(host: str, port: int) -> bool:
    """One TCP connect attempt with a short timeout."""
    with socket.create_connection((host, port), timeout=0.25):
        return True


def wait_for_port(host: str, port: int, timeout: float = 10.0, proc: ManagedProcess | None = None) -> None:
    """Poll until ``host:port`` accepts a TCP connection.

    If ``proc`` is given and dies first, raise ProcessDiedError (a TimeoutError)
    at once with the last 2000 characters of its log.
    """
    wait_until(lambda: _can_connect(host, port), timeout, what=f"TCP {host}:{port}", proc=proc, interval=0.02)
