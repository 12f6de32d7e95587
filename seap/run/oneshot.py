"""``seap prune``: corpus -> statistics -> scores -> mask -> hard-pruned checkpoint in one shot,
as a plan of one job chain (:func:`seap.run.plan.make_prune_plan`) run by the same executor,
stage functions and content-addressed cache as ``seap eval``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seap.data.corpus import DEFAULT_SAMPLES_PER_TASK, DEFAULT_SEED
from seap.errors import SeapError
from seap.io import atomic_directory, check_output, read_json
from seap.maths.mask_formats import Mask, load_mask
from seap.maths.schedules import check_sparsity
from seap.model.checkpoint import PRUNED_MASK_DIR
from seap.model.loaded import LoadedModel
from seap.data.corpus import BUILTIN_CALIBRATION, build_corpora
from seap.run.commands import ONESHOT_METHODS
from seap.run.config import Front, RunConfig
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
        lines.append("timings (s):       " + ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items()))
        if self.cached:
            lines.append(f"reused:            {len(self.cached)} job(s) from {self.workdir}: {', '.join(self.cached)}")
        return lines


def prune_config(model: str, calib: str, sparsity: float, method: str = "seap", tasks: Sequence[str] | None = None,
                 front: Front = "python", **options: Any) -> tuple[RunConfig, list[str]]:
    """The run configuration of a one-shot prune, validated, and the calibration tasks.

    ``method`` is an entry of the method table that builds masks, or ``seap``: the SEAP expert
    with one task in ``calib`` (or ``tasks`` selecting one), the SEAP general mask with several.
    ``options`` are :class:`RunConfig` fields (``score`` and ``schedule`` are SEAP's: a baseline
    keeps its own). Reads the records (cheap) but loads no model."""
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
    for name in ("score", "schedule"):
        own = getattr(entry, name)
        if own is not None and options.get(name) not in (None, own):
            raise SeapError(f"{method} has its own {name} ({own}); --{name} sets SEAP's",
                            f"drop --{name}, or prune with --method seap --{name} {options[name]}")
    values = {k: v for k, v in options.items() if v is not None}
    values.update(model=model, tasks=names, methods=[method], sparsities=[sparsity], bench=False, mlflow=False,
                  perplexity=False)
    config = RunConfig.from_mapping(values, front)
    return config.validate(check_data=False), names


def prune(model: str | LoadedModel, calib: str, sparsity: float, out: str | Path, method: str = "seap",
          tasks: Sequence[str] | None = None, overwrite: bool = False, progress: bool = True,
          front: Front = "python", **options: Any) -> PruneResult:
    """One shot: corpus -> statistics -> scores -> mask (refitted by default) -> hard-pruned
    checkpoint in ``out``, as one chain of jobs of the plan (:func:`seap.run.plan.make_prune_plan`)
    run by the same executor and stage functions as ``seap eval``, cached in the run's
    ``workdir``: a re-run with another sparsity reuses the corpus and statistics.

    ``model`` is a model name or path, or a :class:`LoadedModel` (used as it is, never changed);
    ``calib`` a JSON/JSONL records file (``"task"`` field, else the file name) or ``builtin``;
    ``options`` are :class:`RunConfig` fields (``unit``, ``reconstruct``, ``refit_alpha``,
    ``protect_first``, ``samples``, ...). Everything is validated before a model is loaded."""
    from seap.run.execute import execute
    from seap.run.plan import make_prune_plan
    from seap.run.stages import StageContext

    loaded = model if isinstance(model, LoadedModel) else None
    location = loaded.location if loaded is not None else str(model)
    sparsity = check_sparsity(sparsity)
    out = Path(out)
    check_output(out, [location, None if calib == BUILTIN_CALIBRATION else calib], overwrite)
    config, names = prune_config(location, calib, sparsity, method, tasks, front, **options)
    records = calib if calib == BUILTIN_CALIBRATION else str(Path(calib).resolve())
    plan = make_prune_plan(config, records)
    workdir = Path(config.outputs.workdir)
    ctx = StageContext(workdir / "task-files", progress=progress, say=lambda _: None, preloaded=loaded)
    done = execute(plan, ctx)
    timings: dict[str, float] = {}
    for key, seconds in done.seconds.items():
        stage = key.split("/", 1)[0]
        timings[stage] = timings.get(stage, 0.0) + seconds
    result_dir = done.path("checkpoint")
    publish_checkpoint(result_dir / CHECKPOINT_DIR, out, overwrite, inputs=[location])
    summary = read_json(result_dir / CHECKPOINT_SUMMARY, "prune summary")
    mask = load_mask(out / PRUNED_MASK_DIR)
    return PruneResult(out, mask, sparsity, summary["realised_sparsity"], summary["dense_params"],
                       summary["pruned_params"], names, timings, workdir,
                       [k for k in done.cached if not k.startswith("model")])


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
