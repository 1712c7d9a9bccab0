"""A quiet console: raypipe's own lines on the terminal, Ray's internals in the run's log file.

What a user of ``raypipe`` sees by default (docs/cluster.md, "Console and logs"):

- raypipe's own log lines (``HH:MM:SS LEVEL raypipe...: message``), the stages' results and
  Ray Data's progress bars when stdout is a terminal or a notebook (:func:`on_screen`);
- nothing else. Everything Ray prints goes to ``<run.out_dir>/logs/ray.log`` instead:
  driver-side log records of the ``ray`` and ``ray.data`` loggers (start-up, execution plans,
  Ray Data's progress logs without a terminal, "Progress bars disabled"), Python warnings
  (Ray's ``RayDeprecationWarning``\\ s among them), the output of Ray's worker processes that the
  driver receives (Ray Train's controller, ``core_worker`` error lines such as the
  ``PreemptionWatcher`` one, tracebacks of Ray's helper actors) and the raylet's messages
  ("N PYTHON worker processes have been started ..."), and error lines that Ray's C++ core
  writes to the driver's own stderr.

``raypipe -v`` shows all of it on the console as Ray would, and still writes the log file.

Lines that raypipe code logs inside Ray workers (the per-epoch line of ``raypipe train``) reach
the driver through the same channel as Ray's worker output: :func:`worker_setup` gives the
``raypipe`` logger of a worker process a handler whose lines start with :data:`MARK`, and the
driver passes exactly those lines to the console (without the mark).

How the routing hooks into Ray (Ray 2.60): worker output arrives through the driver's
``global_worker_stdstream_dispatcher`` (handler ``ray_print_logs``, installed when
``log_to_driver`` is on); the raylet's messages through ``ray._private.worker.print_to_stdstream``,
called by the driver's error-listener thread. Both are private hooks: if a Ray release moves
them, :func:`route_ray_output` logs that at DEBUG and leaves Ray's own printing in place (a
noisier console, never lost output).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import re
import sys
import threading

log = logging.getLogger(__name__)

#: prefix of a raypipe line written by a Ray worker process (see :func:`worker_setup`)
MARK = "[raypipe] "
#: format of raypipe's console lines (the CLI's, and the workers' after the mark)
LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"
#: logger of the run log only: Ray's forwarded lines and the full stage results
FILE_ONLY = "raypipe.runlog"
#: Ray's driver-side loggers that print to the console (both propagate=False)
RAY_LOGGERS = ("ray", "ray.data")
#: an error/warning line of Ray's C++ core (glog/spdlog style) on a process's stderr
_NATIVE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] ")

_state: dict = {"verbose": False, "path": None, "handler": None, "routed": False, "native": None}
_lock = threading.Lock()


class _RunLogHandler(logging.FileHandler):
    """The run log's handler: keeps its first formatter (``ray.init`` re-formats the ``ray`` logger's handlers)."""

    def setFormatter(self, fmt: logging.Formatter | None) -> None:  # noqa: N802 - logging's name
        if self.formatter is None:
            super().setFormatter(fmt)


def set_verbose(verbose: bool) -> None:
    """``raypipe -v``: Ray's output stays on the console (and also goes to the run log)."""
    _state["verbose"] = bool(verbose)


def verbose() -> bool:
    return _state["verbose"]


def bars_wanted(cfg) -> bool:
    """Whether raypipe's own progress bars (tqdm: synth, compare, auto) are shown: ``ray.progress_bars``,
    and on a quiet console only when stdout is a terminal or a notebook (as for Ray Data's bars,
    :func:`raypipe.runtime.configure_data_context`). Without a terminal a bar would write one
    carriage-return update after another into the log or pipe; the stage's summary line says it instead."""
    return bool(cfg.ray.progress_bars) and interactive(cfg)


def progress(total: int, desc: str, enabled: bool, unit: str = "it"):
    """A tqdm bar (a context manager with ``update(n)``) when ``enabled``, else a silent stand-in."""
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit=unit)
        except ImportError:  # pragma: no cover - tqdm comes with ray[data]
            pass
    return _SilentBar()


class _SilentBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass


def on_screen() -> bool:
    """Whether stdout is shown to a person as it is written: a terminal, or the output area of a
    Jupyter/IPython kernel (its ``OutStream`` is no tty, but it redraws a bar in place like one)."""
    out = sys.stdout
    try:
        if out.isatty():
            return True
    except Exception:  # noqa: BLE001 - None (pythonw), a closed or minimal stream: not on screen
        return False
    return any(k.__module__.split(".")[0] == "ipykernel" for k in type(out).__mro__)  # or a subclass of it


def interactive(cfg) -> bool:
    """Whether the console is a person's terminal or notebook (or Ray's full output was asked for:
    ``-v``, ``ray.quiet=false``): then bars and a line per epoch; into a pipe or a log file, fewer lines."""
    return not cfg.ray.quiet or verbose() or on_screen()


def run_log_path() -> str | None:
    """The run log this process writes, once :func:`open_run_log` was called."""
    return _state["path"]


def open_run_log(out_dir: str) -> str | None:
    """Send Ray's driver-side loggers, Python warnings and raypipe's records to ``<out_dir>/logs/ray.log``.

    Idempotent; a second ``out_dir`` in the same process switches the file. Returns the path
    (None for a remote ``out_dir`` such as ``s3://``: the log then stays in Ray's session logs).
    """
    if "://" in out_dir:
        return None
    path = os.path.abspath(os.path.join(out_dir, "logs", "ray.log"))
    with _lock:
        if _state["path"] == path:
            _quiet_ray_loggers()
            return path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handler = _RunLogHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.DEBUG if _state["verbose"] else logging.INFO)
        old = _state["handler"]
        for name in ("", *RAY_LOGGERS, "py.warnings", FILE_ONLY):
            lg = logging.getLogger(name)
            if old is not None:
                lg.removeHandler(old)
            if name in ("", FILE_ONLY) or logging.getLogger(name).propagate is False:
                lg.addHandler(handler)
        if old is not None:
            old.close()
        _state.update(path=path, handler=handler)
        # Python warnings (Ray's deprecation warnings on the driver among them) become log records
        # of "py.warnings": the file always, the console only with -v.
        logging.captureWarnings(True)
        pyw = logging.getLogger("py.warnings")
        if not _state["verbose"]:
            pyw.propagate = False
            pyw.addHandler(handler)
        file_only = logging.getLogger(FILE_ONLY)
        file_only.propagate = False
        file_only.setLevel(logging.INFO)
        _quiet_ray_loggers()
    return path


def _quiet_ray_loggers() -> None:
    """Without -v, Ray's driver loggers lose their console handlers (the run log keeps their records).

    Ray configures them on import (``ray`` in ``ray._private.log``, ``ray.data`` in
    ``ray.data._internal.logging``), so this runs again after ``ray.init`` and ``import ray.data``.
    """
    if _state["verbose"]:
        return
    for name in RAY_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
        lg.propagate = False
        if _state["handler"] is not None and _state["handler"] not in lg.handlers:
            lg.addHandler(_state["handler"])


# ----------------------------------------------------------------------------- worker output
def _who(data: dict) -> str:
    pid = data.get("pid")
    if pid in ("raylet", "autoscaler"):
        return f"({pid})"
    name = data.get("actor_name") or data.get("task_name") or ""
    return f"({name} pid={pid}, ip={data.get('ip')})".replace("( ", "(")


def route_lines(data: dict, console=None) -> None:
    """One batch of output the driver received from Ray (worker stdout/stderr or a raylet message).

    Lines marked by :func:`worker_setup` go to ``console`` (default: stderr) without the mark;
    every line goes to the run log with the process it came from.
    """
    console = console if console is not None else sys.stderr
    runlog = logging.getLogger(FILE_ONLY)
    who = _who(data)
    for line in data.get("lines", ()):
        if not isinstance(line, str):
            line = str(line)
        if line.startswith(MARK):
            print(line[len(MARK):], file=console, flush=True)
        runlog.info("%s %s", who, line)


def route_ray_output() -> bool:
    """After ``ray.init``: worker output and raylet messages to :func:`route_lines` (quiet) or, with
    -v, to Ray's own printing plus the run log. Returns whether the hooks were installed."""
    try:
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError as exc:  # another Ray layout: Ray prints as it always does
        log.debug("Ray's output hooks not found (%s): Ray's worker output stays on the console", exc)
        return False
    original = getattr(ray_worker.print_to_stdstream, "_raypipe_original", ray_worker.print_to_stdstream)
    if not callable(original) or not hasattr(dispatcher, "add_handler"):
        return False

    def routed(data, ignore_prefix: bool = False):
        try:
            if _state["verbose"]:
                original(data, ignore_prefix)
                logging.getLogger(FILE_ONLY).info("%s %s", _who(data), "\n".join(map(str, data.get("lines", ()))))
            else:
                route_lines(data)
        except Exception:  # noqa: BLE001 - never let a log line break Ray's printer thread
            original(data, ignore_prefix)

    routed._raypipe_original = original  # type: ignore[attr-defined]
    # raylet messages: the error-listener thread calls the module's print_to_stdstream by name
    ray_worker.print_to_stdstream = routed
    # worker output: Ray's printer thread emits to the dispatcher's handlers; Ray's own one is named
    # "ray_print_logs" (and removed by that name at ray.shutdown, which then removes ours too)
    names = [n for n, _ in getattr(dispatcher, "handlers", [])]
    if "ray_print_logs" in names:
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", functools.partial(routed, ignore_prefix=False))
    _state["routed"] = True
    return True


def worker_setup() -> None:
    """In a Ray worker process: raypipe's INFO+ records are written to stderr marked with :data:`MARK`.

    Idempotent. Called by raypipe code that runs in workers and logs for the user (Ray Train's
    loop, the model actors). Ray forwards the line to the driver, whose router shows it.
    """
    lg = logging.getLogger("raypipe")
    if any(getattr(h, "_raypipe_mark", False) for h in lg.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(MARK + LINE_FORMAT, DATE_FORMAT))
    handler._raypipe_mark = True  # type: ignore[attr-defined]
    lg.addHandler(handler)
    if lg.level == logging.NOTSET or lg.level > logging.INFO:
        lg.setLevel(logging.INFO)
    lg.propagate = False  # Ray Train's root console handler would print the line a second time


# ----------------------------------------------------------------------------- native stderr
def capture_native_stderr() -> bool:
    """Route the driver's own C++ log lines (Ray's core worker writes ERROR lines to fd 2) to the run log.

    fd 2 becomes a pipe read by a thread: lines that look like Ray's C++ log lines
    (``[YYYY-MM-DD hh:mm:ss,ms E pid tid] file.cc:N: ...``) go to the run log, everything else is
    passed on to the original stderr at once (partial lines too, so progress bars still update).
    Quiet mode only; idempotent; undone at exit. Returns whether it is active.
    """
    if _state["verbose"] or _state["native"] is not None:
        return _state["native"] is not None
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
    except OSError as exc:
        log.debug("cannot capture native stderr: %s", exc)
        return False
    runlog = logging.getLogger(FILE_ONLY)

    def pump() -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(r, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            out = []
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    break
                line, buf = buf[:nl + 1], buf[nl + 1:]
                if _NATIVE_LINE.match(line):
                    runlog.info("(driver core_worker) %s", line.decode("utf-8", "replace").rstrip("\n"))
                else:
                    out.append(line)
            # a partial line that cannot be the start of a native log line is passed on now
            if buf and not (buf[:1] == b"[" and len(buf) < 8192):
                out.append(buf)
                buf = b""
            if out:
                try:
                    os.write(saved, b"".join(out))
                except OSError:
                    pass
        if buf:
            try:
                os.write(saved, buf)
            except OSError:
                pass

    thread = threading.Thread(target=pump, name="raypipe-native-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        try:
            os.dup2(saved, 2)  # closes the pipe's last write end: the pump sees EOF and flushes
        except OSError:
            return
        thread.join(timeout=2)

    atexit.register(restore)
    _state["native"] = (saved, thread)
    return True
