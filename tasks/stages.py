"""The Prefect task that runs one job of the plan (:mod:`seap.run.plan`).

There is one task function; each job runs as that task under its stage's name (``masks``,
``evaluate``...), so the Prefect UI shows one task run per job. The task takes and returns
only references (``{"path", "digest"}``) and is cached on the same content key the library's
executor uses (:func:`seap.run.execute.content_key`: stage, parameters, input contents, stage
code, work folder), with the output in the same content-addressed folder. A second run with
the same inputs is all ``Cached``; a changed option re-runs only the jobs that depend on it;
a killed run resumes from its finished jobs. Retries (2) only on I/O errors.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from seap.errors import SeapError
from seap.run.execute import Ref, content_key, run_cached
from seap.run.plan import STAGES, Job, input_leaves
from seap.run.stages import StageContext

RETRIES = 2  # transient I/O (network filesystems, object stores)
CACHE_EXPIRATION = timedelta(days=90)

_CONTEXTS: dict[str, StageContext] = {}
_LOCK = threading.Lock()


def stage_context(workdir: str) -> StageContext:
    """One context per work folder and process, so the stages of a run share the loaded base model."""
    key = str(Path(workdir).resolve())
    with _LOCK:
        if key not in _CONTEXTS:
            _CONTEXTS[key] = StageContext(Path(workdir) / "task-files")
        return _CONTEXTS[key]


def job_cache_key(_ctx: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Prefect's cache key of a job run: the executor's content key (``None`` for stages that
    always run)."""
    job = Job.from_dict(parameters["job"])
    if not STAGES[job.stage].cached:
        return None
    return content_key(job, parameters["inputs"], parameters["workdir"])


def retry_transient(_task: Any, _run: Any, state: Any) -> bool:
    """Retry I/O failures only; a bad input (SeapError) fails at once."""
    try:
        state.result()
    except SeapError:
        return False
    except OSError:
        return True
    except Exception:  # noqa: BLE001 - anything else is a bug or bad input: do not retry
        return False
    return False


@task(name="job", cache_key_fn=job_cache_key, cache_expiration=CACHE_EXPIRATION, persist_result=True,
      retries=RETRIES, retry_delay_seconds=2, retry_condition_fn=retry_transient)
def run_job_task(job: dict[str, Any], inputs: dict[str, Any], workdir: str) -> Ref:
    """Run (or reuse) one job of the plan; returns the reference of its output folder."""
    _check(inputs)
    out, _ = run_cached(Job.from_dict(job), inputs, workdir, stage_context(workdir))
    return out


def job_task(job: Job) -> Any:
    """The task for ``job``, named after its stage."""
    return run_job_task.with_options(name=job.stage)


def _check(inputs: Mapping[str, Any]) -> None:
    for role, value in inputs.items():
        for path in (ref["path"] for ref in input_leaves(value)):
            if not Path(path).exists():
                raise SeapError(f"input {path} ({role}) is missing (deleted after it was cached?)",
                                "re-run with PREFECT_TASKS_REFRESH_CACHE=true, or restore the work folder")


__all__ = ["job_cache_key", "job_task", "retry_transient", "run_job_task", "stage_context"]
