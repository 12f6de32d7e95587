"""``seap prune``: corpus -> statistics -> scores -> mask -> hard-pruned checkpoint in one shot,
as a plan of one job chain (:func:`seap.run.plan.make_prune_plan`) run by the same executor,
stage functions and content-addressed cache as ``seap eval``."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seap.data.corpus import DEFAULT_SAMPLES_PER_TASK, DEFAULT_SEED
from seap.errors import SeapError
from seap.io import atomic_directory, check_output, read_json
from seap.maths.mask_formats import BUDGET_META, Mask, load_mask
from seap.maths.schedules import check_sparsity
from seap.model.checkpoint import PRUNED_MASK_DIR
from seap.model.loaded import LoadedModel
from seap.data.corpus import BUILTIN_CALIBRATION, build_corpora
from seap.run.commands import ONESHOT_METHODS
from seap.run.config import DEFAULT_BUDGET_GRID, Front, RunConfig
from seap.run.methods import get_method
from seap.run.stages import CHECKPOINT_DIR, CHECKPOINT_SUMMARY


@dataclass
class PruneResult:
    """What ``seap prune`` did."""

    out_dir: Path
    mask: Mask
    target_sparsity: float
    realised_sparsity: float
    dense_params: int
    pruned_params: int
    tasks: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    workdir: Path | None = None
    cached: list[str] = field(default_factory=list)  # the plan's jobs reused from the work folder

    def summary_lines(self) -> list[str]:
        m = self.mask.meta
        what = f"score {m.get('score')}, schedule {m.get('schedule')}"
        if m.get("gqa_mode"):
            what += f", GQA mode {m['gqa_mode']}"
        if m.get("unit"):
            what += f", unit {m['unit']}"
        lines = [
            f"pruned model:      {self.out_dir}",
            f"mask:              {m.get('kind', 'expert')} ({', '.join(self.tasks)}), method {m.get('method')}, {what}",
            f"target sparsity:   {self.target_sparsity:.4f}",
            f"realised sparsity: {self.realised_sparsity:.4f} of prunable weights "
            f"(parameters {self.dense_params:,} -> {self.pruned_params:,})",
        ]
        if hasattr(self.mask, "kept_signature"):  # experts of a mixture-of-experts model
            lines.append("experts kept:      " + " ".join(f"layer {i}: {k}" for i, k in self.mask.kept_signature()))
        elif m.get("layers"):
            lines.append("per layer:         " + " ".join(f"{layer['realised']:.2f}" for layer in m["layers"]))
        sized = m.get(BUDGET_META)
        if sized:  # (an expert the accuracy budget sized)
            budget = f"{sized['max_drop']:g} points" if sized.get("max_drop") is not None else \
                f"{sized['max_drop_rel']:g} of the margin over chance" if sized.get("max_drop_rel") is not None else "none"
            lines.append(f"budget:            {budget}; chosen {sized['chosen_sparsity'] * 100:g}%, selection "
                         f"{sized['metric']} {sized['selection_accuracy'] * 100:.1f} against dense "
                         f"{sized['selection_dense'] * 100:.1f} on {sized['selection_items']} held-out train items")
        lines.append("timings (s):       " + ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items()))
        if self.cached:
            lines.append(f"reused:            {len(self.cached)} job(s) from {self.workdir}: {', '.join(self.cached)}")
        return lines


BUDGET_OPTIONS = ("max_drop", "max_drop_rel", "min_speedup")  # (any of them: the budget's search sizes the expert)


def prune_config(model: str, calib: str | None, sparsity: float | None, method: str = "seap",
                 tasks: Sequence[str] | None = None, front: Front = "python", **options: Any
                 ) -> tuple[RunConfig, list[str]]:
    """The run configuration of a one-shot prune, validated, and the calibration tasks.

    ``method`` is an entry of the method table that builds masks, or ``seap``: the SEAP expert
    with one task in ``calib`` (or ``tasks`` selecting one), the SEAP general mask with several.
    ``options`` are :class:`RunConfig` fields (``score`` and ``schedule`` are SEAP's: a baseline
    keeps its own). Reads the records (cheap) but loads no model.

    With an accuracy budget (``max_drop`` or ``max_drop_rel``, and/or ``min_speedup``) there is
    no ``sparsity``: the one task of ``tasks`` (a starter task, or one of ``data_dir`` as
    ``seap eval`` names them) gets the SEAP expert of the largest grid sparsity within the
    budget, calibrated and selected on its own train split (``calib`` is not used)."""
    if any(options.get(k) is not None for k in BUDGET_OPTIONS):
        return _budget_prune_config(model, calib, sparsity, method, tasks, front, **options)
    if sparsity is None:
        raise SeapError("seap prune needs a sparsity, or an accuracy budget to choose one",
                        "pass --sparsity S, or --max-drop D (with --task NAME) to size the expert by accuracy")
    if calib is None:
        raise SeapError("seap prune needs calibration records", "pass --calib FILE (or builtin)")
    corpora = build_corpora(calib, tasks, options.get("samples", DEFAULT_SAMPLES_PER_TASK),
                            options.get("seed", DEFAULT_SEED))
    names = list(corpora)
    if method == "seap":
        method = "seap-expert" if len(names) == 1 else "seap-general"
    entry = get_method(method)
    if not entry.builds_masks:
        raise SeapError(f"method {method!r} builds no mask of its own", f"prune with any of: {', '.join(ONESHOT_METHODS)}")
    if entry.calibration == "task" and len(names) > 1:
        raise SeapError(f"an expert is built from one task, and {calib} holds {len(names)}",
                        "pass --task NAME, or use --method seap for the general mask")
    _own_score_and_schedule(method, options)
    values = {k: v for k, v in options.items() if v is not None}
    values.update(model=model, tasks=names, methods=[method], sparsities=[sparsity], bench=False, mlflow=False,
                  perplexity=False)
    config = RunConfig.from_mapping(values, front)
    return config.validate(check_data=False), names


def _own_score_and_schedule(method: str, options: dict[str, Any]) -> None:
    entry = get_method(method)
    for name in ("score", "schedule"):
        own = getattr(entry, name)
        if own is not None and options.get(name) not in (None, own):
            raise SeapError(f"{method} has its own {name} ({own}); --{name} sets SEAP's",
                            f"drop --{name}, or prune with --method seap --{name} {options[name]}")


def _budget_prune_config(model: str, calib: str | None, sparsity: float | None, method: str,
                         tasks: Sequence[str] | None, front: Front, **options: Any) -> tuple[RunConfig, list[str]]:
    """:func:`prune_config` with an accuracy budget: one task's SEAP expert, sized by the search."""
    if sparsity is not None:
        raise SeapError("a sparsity and an accuracy budget are both given, and the budget chooses the sparsity",
                        "drop --sparsity (the budget picks the largest grid sparsity within it), or drop the budget")
    if calib not in (None, BUILTIN_CALIBRATION):
        raise SeapError(f"with an accuracy budget the expert is calibrated and selected on its task's train split, "
                        f"so --calib {calib} would not be used",
                        "drop --calib and name the task: --task NAME (a starter task, or one in --data-dir)")
    if method not in ("seap", "seap-expert"):
        raise SeapError(f"an accuracy budget sizes SEAP experts, not {method}",
                        "prune with --method seap (or compare methods under a budget with `seap eval --max-drop`)")
    if not tasks or len(tasks) != 1:
        raise SeapError(f"an accuracy budget sizes one task's expert, and {len(tasks or [])} tasks were named",
                        "name one task: --task NAME (for every task at once: `seap eval --max-drop D --tasks ...`)")
    _own_score_and_schedule("seap-expert", options)
    values = {k: v for k, v in options.items() if v is not None}
    grid = values.get("budget_grid") or list(DEFAULT_BUDGET_GRID)
    values.update(model=model, tasks=list(tasks), methods=["seap-expert"], sparsities=[min(grid)], bench=False,
                  mlflow=False, perplexity=False)
    config = RunConfig.from_mapping(values, front)
    config.validate(check_data=True)  # (the task against its data: present, enough train records to hold out)
    return config, config.data.task_names


def prune(model: str | LoadedModel, calib: str | None, sparsity: float | None, out: str | Path, method: str = "seap",
          tasks: Sequence[str] | None = None, overwrite: bool = False, progress: bool = True,
          front: Front = "python", **options: Any) -> PruneResult:
    """One shot: corpus -> statistics -> scores -> mask (refitted by default) -> hard-pruned
    checkpoint in ``out``, as one chain of jobs of the plan (:func:`seap.run.plan.make_prune_plan`)
    run by the same executor and stage functions as ``seap eval``, cached in the run's
    ``workdir``: a re-run with another sparsity reuses the corpus and statistics.

    ``model`` is a model name or path, or a :class:`LoadedModel` (used as it is, never changed);
    ``calib`` a JSON/JSONL records file (``"task"`` field, else the file name) or ``builtin``;
    ``options`` are :class:`RunConfig` fields (``unit``, ``reconstruct``, ``refit_alpha``,
    ``protect_first``, ``samples``, ``max_drop`` ...; with a budget see :func:`prune_config`).
    Everything is validated before a model is loaded."""
    from seap.run.execute import execute
    from seap.run.plan import make_prune_plan
    from seap.run.stages import StageContext

    loaded = model if isinstance(model, LoadedModel) else None
    location = loaded.location if loaded is not None else str(model)
    sparsity = None if sparsity is None else check_sparsity(sparsity)
    out = Path(out)
    check_output(out, [location, None if calib in (None, BUILTIN_CALIBRATION) else calib], overwrite)
    config, names = prune_config(location, calib, sparsity, method, tasks, front, **options)
    records = calib if calib in (None, BUILTIN_CALIBRATION) else str(Path(calib).resolve())
    plan = make_prune_plan(config, records)
    workdir = Path(config.outputs.workdir)
    ctx = StageContext(workdir / "task-files", progress=progress, say=lambda _: None, preloaded=loaded)
    with _evaluation_quiet(config.budget.enabled):  # (the budget's selection rows: lm-eval's per-call notices)
        done = execute(plan, ctx)
    timings: dict[str, float] = {}
    for key, seconds in done.seconds.items():
        stage = key.split("/", 1)[0]
        timings[stage] = timings.get(stage, 0.0) + seconds
    result_dir = done.path("checkpoint")
    publish_checkpoint(result_dir / CHECKPOINT_DIR, out, overwrite, inputs=[location])
    summary = read_json(result_dir / CHECKPOINT_SUMMARY, "prune summary")
    mask = load_mask(out / PRUNED_MASK_DIR)
    if config.budget.enabled:  # (the sparsity the budget chose)
        sparsity = float(mask.meta[BUDGET_META]["chosen_sparsity"])
    assert sparsity is not None
    return PruneResult(out, mask, sparsity, summary["realised_sparsity"], summary["dense_params"],
                       summary["pruned_params"], names, timings, workdir,
                       [k for k in done.cached if not k.startswith("model")])


@contextlib.contextmanager
def _evaluation_quiet(on: bool) -> Iterator[None]:
    """lm-eval's per-evaluation warnings (an initialised model passed in, few-shot overrides) kept
    off the console while the budget's candidates are scored; errors still show."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    if on:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def publish_checkpoint(source: Path, out: Path, overwrite: bool = False, inputs: Sequence[str | None] = ()) -> Path:
    """Put a cached checkpoint folder at ``out``: its files hard-linked (copied across file
    systems), all at once."""
    with atomic_directory(out, overwrite, list(inputs)) as tmp:
        for path in sorted(source.rglob("*")):
            target = tmp / path.relative_to(source)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
    return out


__all__ = ["PruneResult", "prune", "prune_config", "publish_checkpoint"]
