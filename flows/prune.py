"""``prune_flow``: calibration file -> statistics -> scores -> mask -> hard-pruned model, cached per stage.

The Prefect counterpart of ``seap prune``; every stage is a cached task from ``tasks.stages``.
Run it without a server (Prefect starts a temporary one) or against ``PREFECT_API_URL``::

    python -m flows.prune --model smollm2-135m --calib builtin --sparsity 0.5
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import flow

from seap.data.corpus import DEFAULT_MAX_TOKENS, DEFAULT_SAMPLES_PER_TASK, DEFAULT_SEED
from seap.maths.geometry import check_gqa_mode
from seap.run.stages import resolve_method
from seap.maths.schedules import check_sparsity
from tasks.stages import (
    build_corpus,
    build_mask,
    collect_statistics,
    compute_scores,
    default_workdir,
    prune_model,
    ref,
    resolve_model,
)


@flow(name="seap-prune", log_prints=True)
def prune_flow(
    model: str = "smollm2-135m",
    calib: str = "builtin",
    sparsity: float = 0.5,
    task: str | None = None,
    method: str = "seap",
    gqa_mode: str = "kv-groups",
    samples: int | None = DEFAULT_SAMPLES_PER_TASK,
    seed: int = DEFAULT_SEED,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = 8,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Prune ``model`` for ``task`` (an expert) or for all tasks of ``calib`` (the general mask)."""
    # invalid parameters fail here, before any heavy work
    check_sparsity(sparsity)
    check_gqa_mode(gqa_mode)
    preset = resolve_method(method, None, None, None)
    work = workdir or default_workdir()

    from seap.run.stages import build_corpora

    tasks = [task] if task else sorted(build_corpora(calib, None, samples, seed))
    model_ref = resolve_model(model)
    source = calib if calib == "builtin" else ref(calib)
    corpora = {t: build_corpus(source, t, samples, seed, max_tokens, work) for t in tasks}
    stats = {t: collect_statistics(model_ref, corpora[t], batch_size, work) for t in tasks}
    scores = [compute_scores(stats[t], t, preset.score, work) for t in tasks]
    general = len(tasks) > 1
    bias = (stats[tasks[0]], tasks[0]) if preset.bias_compensation and not general else (None, None)
    mask = build_mask(scores, sparsity, preset.schedule, general, gqa_mode, work, *bias)
    pruned = prune_model(model_ref, mask, preset.bias_compensation and not general, work)
    print(f"pruned model: {pruned['path']}")
    return {"model": model_ref, "mask": mask, "pruned": pruned, "tasks": tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the cached prune flow.")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="builtin")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--task", default=None)
    parser.add_argument("--method", default="seap")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    prune_flow(model=args.model, calib=args.calib, sparsity=args.sparsity, task=args.task, method=args.method,
               workdir=args.workdir)


if __name__ == "__main__":
    main()
