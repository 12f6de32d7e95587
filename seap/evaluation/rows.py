"""One row of the results table, evaluated in memory: the dense model, a general mask on every
task, per-task experts (each task with its own expert), or routed inference.

A row is a plain dict (method, sparsity, realised sparsity, per-task metrics, averages,
timings); the per-item results (each document's metrics and each choice's loglikelihood) come
back beside it, so later rows can reuse them and paired comparisons can be made.
Masks are applied as they say (FLAP's bias compensation travels with its masks).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from seap.data.catalogue import TaskCatalogue, TaskSpec
from seap.errors import SeapError
from seap.evaluation.harness import DEFAULT_EVAL_BATCH_SIZE
from seap.evaluation.metrics import average
from seap.maths.mask_formats import Mask
from seap.model.loaded import LoadedModel
from seap.model.masking import apply_mask


def evaluate_masks(base: LoadedModel, catalogue: TaskCatalogue, specs: Sequence[TaskSpec], method: str,
                   sparsity: float, masks: Mapping[str, Mask] | None, limit: int | None = None,
                   num_fewshot: int = 0, batch_size: int = DEFAULT_EVAL_BATCH_SIZE, metric: str = "acc",
                   ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """One row and its per-item results: the dense model (no masks), one general mask on all
    tasks (``{"general": mask}``), or one expert per task (``{task: mask}``)."""
    from seap.evaluation.harness import evaluate

    start = time.perf_counter()
    items: dict[str, list[dict[str, Any]]] = {}
    if not masks:
        result = evaluate(base, catalogue, specs, limit, num_fewshot, batch_size)
        tasks, realised, meta, items = result["tasks"], 0.0, result, result["items"]
    elif set(masks) == {"general"}:
        model = apply_mask(base, masks["general"], "hard")
        result = evaluate(model, catalogue, specs, limit, num_fewshot, batch_size)
        tasks, realised, meta, items = result["tasks"], masks["general"].realised_sparsity(), result, result["items"]
    else:
        missing = [s.name for s in specs if s.name not in masks]
        if missing:
            raise SeapError(f"no expert mask for task(s) {missing}", "build an expert mask for every evaluated task")
        from seap.evaluation.harness import evaluate_lm

        # one lm-eval run for all tasks: each task's requests go to its own expert
        meta = evaluate_lm(experts_lm(base, {s.lm_eval_task: masks[s.name] for s in specs}, batch_size), catalogue,
                           specs, limit, num_fewshot)
        tasks, items = meta["tasks"], meta["items"]
        realised = sum(masks[s.name].realised_sparsity() for s in specs) / len(specs)
    row = {"method": method, "sparsity": sparsity, "realised_sparsity": realised, "tasks": tasks,
           "average": average(tasks, metric), "seconds": round(time.perf_counter() - start, 1),
           "lm_eval_version": meta.get("lm_eval_version"), "num_fewshot": num_fewshot, "limit": limit}
    return row, items


def experts_lm(base: LoadedModel, masks: Mapping[str, Mask], batch_size: int = DEFAULT_EVAL_BATCH_SIZE) -> Any:
    """An lm-eval ``LM`` that answers each request with its task's expert (``masks``: lm-eval
    task name -> mask), hard-pruned from ``base`` when its requests come and dropped after:
    one lm-eval run evaluates every task with its own expert (oracle task identity)."""
    from seap.evaluation.harness import dispatching_lm_class, hflm

    def expert_for(task: str) -> Any:
        if task not in masks:
            raise SeapError(f"no expert mask for lm-eval task {task!r}", "build an expert for every task")
        return hflm(apply_mask(base, masks[task], "hard"), batch_size)

    class ExpertPerTaskLM(dispatching_lm_class()):  # type: ignore[misc]
        def _dispatch(self, requests: list[Any], method: str) -> list[Any]:
            groups: dict[str, list[int]] = {}
            for i, req in enumerate(requests):
                groups.setdefault(req.task_name, []).append(i)
            return self._answer(requests, groups, expert_for, method, [None] * len(requests))

    return ExpertPerTaskLM()


def router_info(router: Any) -> dict[str, Any]:
    """What the report shows of a router: held-out accuracy (overall, per task), confusion, setup."""
    info = {k: router.meta[k] for k in ("heldout_accuracy", "heldout_accuracy_per_task", "n_train", "n_heldout",
                                       "threshold", "confusion")}
    info["tasks"] = router.tasks
    info["feature_layer"] = router.feature_layer
    return info


def evaluate_routed(base: LoadedModel, catalogue: TaskCatalogue, specs: Sequence[TaskSpec], sparsity: float,
                    experts: Mapping[str, Mask], general: Mask | None, router: Any,
                    limit: int | None = None, num_fewshot: int = 0, batch_size: int = DEFAULT_EVAL_BATCH_SIZE, metric: str = "acc",
                    threshold: float | None = None,
                    expert_items: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                    ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The ``seap-routed`` row: the router picks an expert per document (falling back to the
    general mask below its threshold); accuracy includes routing errors.

    With ``expert_items`` (the per-item results of the expert row on the same items), a
    document routed to its own task's expert is answered from them, since that expert would
    compute exactly those loglikelihoods; only the documents routed elsewhere are evaluated.
    """
    from seap.evaluation.harness import evaluate_lm
    from seap.evaluation.routed import ExpertBank, RoutedModel, make_routed_lm, routing_summary

    router.check_model(base.fingerprint)
    router.check_tasks([s.name for s in specs])
    bank = ExpertBank(base, experts, general)
    routed = RoutedModel(bank, router, threshold)
    known = {(task, int(item["doc_id"])): item["resps"] for task, task_items in (expert_items or {}).items()
             for item in task_items if item.get("resps")}
    lm = make_routed_lm(routed, {s.lm_eval_task: s.name for s in specs}, batch_size, known)
    start = time.perf_counter()
    result = evaluate_lm(lm, catalogue, specs, limit, num_fewshot)
    seconds = time.perf_counter() - start
    realised = sum(m.realised_sparsity() for m in bank.masks.values()) / len(bank.masks)
    tasks = result["tasks"]
    row = {"method": "seap-routed", "sparsity": sparsity, "realised_sparsity": realised, "tasks": tasks,
           "average": average(tasks, metric), "seconds": round(seconds, 1),
           "lm_eval_version": result.get("lm_eval_version"), "num_fewshot": num_fewshot, "limit": limit,
           "routing": routing_summary(lm.log, [s.name for s in specs]),
           "router_seconds": round(routed.routing_seconds, 3),
           "router_overhead": routed.routing_seconds / seconds if seconds else 0.0,
           "materialisations": bank.materialisations, "reused_documents": lm.reused}
    return row, result["items"]


__all__ = ["evaluate_masks", "evaluate_routed", "router_info"]
