"""The console view of a run: one progress line, a few result lines, the summary; everything
else (library warnings, per-request progress bars, Prefect's task logs) goes to a log file
that the summary names.

On a terminal the view is one bar at the bottom (stage k of n, rows evaluated, time left),
with a line above it per finished step worth reading; in a log (CI, no terminal) it is one
plain line per step.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from seap.run.execute import JobEvent
from seap.run.plan import Plan

# rough relative cost of a job per stage, for the time-left estimate before a stage was timed
_WEIGHTS = {"statistics": 6.0, "evaluate-dense": 10.0, "evaluate": 8.0, "evaluate-routed": 1.0, "router": 2.0,
            "bench": 5.0, "perplexity": 3.0, "report": 0.3, "register": 0.5}


class RunView:
    """Receives :class:`~seap.run.execute.JobEvent` and draws the run."""

    def __init__(self, plan: Plan, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.plan = plan
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() and not os.environ.get("CI") if live is None else live
        self.stages = plan.stages
        self.rows = set(plan.rows)
        self.rows_done: set[str] = set()
        self.started = time.perf_counter()
        self.weight_done = 0.0
        self.seconds_done = 0.0
        self.remaining = sum(_WEIGHTS.get(j.stage, 0.2) for j in plan.jobs)
        self.current: JobEvent | None = None
        self._width = 0

    # -- events ---------------------------------------------------------------------------
    def __call__(self, event: JobEvent) -> None:
        job = event.job
        if event.state == "running":
            self.current = event
            self._draw()
            return
        weight = _WEIGHTS.get(job.stage, 0.2)
        self.remaining -= weight
        if event.state == "done":
            self.weight_done += weight
            self.seconds_done += event.seconds
        if job.row:
            self.rows_done.add(job.row)
        if event.state == "done" and (job.row or job.stage in ("statistics", "router", "bench", "perplexity")):
            self.line(f"{job.key:<40} {_result(event):<22} {event.seconds:6.1f} s")
        self.current = None
        self._draw()

    def line(self, text: str) -> None:
        """A line above the bar."""
        self._clear()
        self.stream.write(text + "\n")
        self.stream.flush()
        self._draw()

    # -- drawing --------------------------------------------------------------------------
    def status(self) -> str:
        event = self.current
        stage = event.job.stage if event else (self.stages[-1] if self.stages else "")
        k = self.stages.index(stage) + 1 if stage in self.stages else len(self.stages)
        elapsed = time.perf_counter() - self.started
        text = f"[{_clock(elapsed)}] stage {k}/{len(self.stages)} {stage:<15} rows {len(self.rows_done)}/{len(self.rows)}"
        if event:
            text += f"  job {event.index}/{event.total}"
        if self.weight_done > 0 and self.remaining > 0:
            text += f"  ~{_clock(self.seconds_done / self.weight_done * self.remaining)} left"
        return text

    def _draw(self) -> None:
        if not self.live:
            return
        text = self.status()
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)

    def _clear(self) -> None:
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0

    def close(self) -> None:
        self._clear()
        self.stream.flush()


def _result(event: JobEvent) -> str:
    """The one number worth showing for a finished job (a row's average)."""
    if not (event.job.row and event.output):
        return ""
    try:
        import json

        row = json.loads((Path(event.output) / "row.json").read_text(encoding="utf-8"))
        return f"average {row['average']['table'] * 100:.2f}"
    except (OSError, ValueError, KeyError):
        return ""


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60:d}:{seconds % 60:02d}"


@contextlib.contextmanager
def quiet_libraries(log_file: str | Path) -> Iterator[Path]:
    """Send library output to ``log_file`` for the duration: Python warnings, every logging
    handler that writes to the console, and anything printed to ``sys.stdout`` / ``sys.stderr``
    (per-request progress bars). The run's own view keeps the stream it was given before."""
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed below
    log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} =====\n")
    swapped: list[tuple[logging.StreamHandler[Any], Any]] = []
    consoles: list[tuple[Any, Any]] = []
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                        if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                stream = getattr(handler, "stream", None)
                if stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
                    try:
                        swapped.append((handler, handler.setStream(log)))
                    except AttributeError:  # a handler whose stream is fixed (logging's last resort)
                        continue
                    console = getattr(handler, "console", None)  # rich-based handlers (Prefect's) keep their own
                    if console is not None and hasattr(console, "file"):
                        consoles.append((console, console.file))
                        console.file = log
    file_handler = logging.StreamHandler(log)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(file_handler)
    old_showwarning = warnings.showwarning

    def showwarning(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                    line: Any = None) -> None:
        log.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = showwarning
    with contextlib.redirect_stdout(_Tee(log)), contextlib.redirect_stderr(_Tee(log)):
        try:
            yield path
        finally:
            warnings.showwarning = old_showwarning
            logging.getLogger().removeHandler(file_handler)
            for handler, stream in swapped:
                handler.setStream(stream)
            for console, file in consoles:
                console.file = file
            log.close()


class _Tee(io.TextIOBase):
    """A text stream into the log file (what libraries print or draw)."""

    def __init__(self, log: TextIO) -> None:
        self.log = log

    def write(self, text: str) -> int:  # type: ignore[override]
        return self.log.write(text)

    def flush(self) -> None:
        self.log.flush()

    def isatty(self) -> bool:
        return False




def log_path(config: Any, name: str) -> Path:
    """Where a run's library output goes: ``<workdir>/../logs/<name>-<time>.log``."""
    return Path(config.outputs.workdir).parent / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def run_with_view(config: Any, run: Any, summary: Any, name: str, verbose: bool = False,
                  views: list[Any] | None = None) -> int:
    """Run ``run()`` under a :class:`RunView` of ``config``'s plan, with library output in a log
    file (unless ``verbose``), then print ``summary(result)``. Returns the exit code: 0, 2 for
    a :class:`~seap.errors.SeapError` (its problem and fix), 1 for anything unexpected (a
    one-line summary; the trace is in the log)."""
    import traceback

    from seap.errors import SeapError
    from seap.run.plan import make_plan

    out = sys.stdout  # captured before the library output is redirected
    plan = make_plan(config)
    view = RunView(plan, out)
    if views is not None:
        views.append(view)
    path = log_path(config, name)
    started = time.perf_counter()
    out.write(f"{name}: {config.model.model}, {len(config.data.tasks)} tasks, sparsities "
              f"{', '.join(f'{s:g}' for s in config.masks.sparsities)}; {len(plan.rows)} rows, {len(plan)} jobs"
              + ("" if verbose else f"; library output -> {path}") + "\n")
    out.flush()
    context = contextlib.nullcontext(path) if verbose else quiet_libraries(path)
    try:
        with context:
            try:
                result = run()
            except BaseException:
                if not verbose:
                    traceback.print_exc(file=sys.stderr)  # into the log
                raise
    except SeapError as exc:
        view.close()
        out.write(f"error: {exc.problem}\n" + (f"  fix: {exc.fix}\n" if exc.fix else "") + f"log: {path}\n")
        return 2
    except KeyboardInterrupt:
        view.close()
        out.write(f"interrupted; finished steps are kept and a re-run resumes from them (log: {path})\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - one line here, the trace is in the log
        view.close()
        out.write(f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
                  f"  the full trace is in {path}\n")
        return 1
    finally:
        if views is not None and view in views:
            views.remove(view)
    view.close()
    for line in summary(result):
        out.write(line + "\n")
    out.write(f"finished in {_clock(time.perf_counter() - started)}" + ("" if verbose else f"; log: {path}") + "\n")
    out.flush()
    return 0


__all__ = ["RunView", "log_path", "quiet_libraries", "run_with_view"]
