"""The comparison the paper's Table 1 reports: dense, SEAP expert/general, Wanda-sp and FLAP,
at several sparsities, plus routed inference, perplexity and speed, in one run.

Calibration (train splits) per method:

* ``seap-expert``: each task's own corpus and scores; each task is evaluated with its own
  expert (oracle task identity, as in the paper's tables).
* ``seap-general``: SEAP-gen, the weighted sum of the tasks' scores.
* ``wanda-sp``, ``flap`` and their ``+logistic`` variants: task-agnostic baselines, scored on
  the pooled statistics of all tasks' corpora, with their original allocation (uniform;
  FLAP's adaptive allocation with bias compensation) or SEAP's logistic schedule.
* ``seap-routed``: the router picks an expert per input, falling back to the general mask
  below the confidence threshold; its accuracy includes routing errors.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .collect import ActivationStatistics, collect_statistics, merge_statistics
from .corpus import build_corpus, write_corpus
from .errors import SeapError
from .masks import PruningMask, build_mask
from .models import LoadedModel, load_model
from .prune import apply_mask
from .schedules import check_sparsity
from .scores import combine_scores, compute_scores, get_score

DENSE = "dense"


@dataclass(frozen=True)
class Variant:
    score: str
    schedule: str
    bias_compensation: bool
    calibration: str  # "task" (expert), "general" (weighted task scores) or "pooled" (merged statistics)


VARIANTS: dict[str, Variant] = {
    "seap-expert": Variant("seap-sf", "logistic", False, "task"),
    "seap-general": Variant("seap-sf", "logistic", False, "general"),
    "wanda-sp": Variant("wanda-sp", "uniform", False, "pooled"),
    "wanda-sp+logistic": Variant("wanda-sp", "logistic", False, "pooled"),
    "flap": Variant("flap", "flap-adaptive", True, "pooled"),
    "flap+logistic": Variant("flap", "logistic", True, "pooled"),
}
ROUTED = "seap-routed"
ALL_METHODS = (*VARIANTS, ROUTED)
BASELINES = tuple(name for name, v in VARIANTS.items() if v.calibration == "pooled")  # task-agnostic baselines
REPORT_METRICS = ("acc", "acc_norm", "paper")  # "paper": acc_norm where the paper reports it (metric_for)
DEFAULT_METHODS = ("seap-expert", "seap-general", "wanda-sp", "flap")


@dataclass
class ExperimentConfig:
    model: str = "smollm2-135m"
    tasks: list[str] = field(default_factory=lambda: ["capitals", "antonyms", "arithmetic", "sentiment", "categories"])
    data_dir: str | None = None
    sparsities: list[float] = field(default_factory=lambda: [0.2, 0.5])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    limit: int | None = None
    num_fewshot: int = 0
    samples: int = 200
    seed: int = 42
    max_tokens: int = 512
    stats_batch_size: int = 8
    eval_batch_size: int = 16
    seap_score: str = "seap-sf"
    gqa_mode: str = "kv-groups"
    router_threshold: float = 0.5
    router_layer: int = 0
    router_prompts: int = 500
    perplexity: bool = False
    perplexity_windows: int | None = 40
    bench: bool = False
    bench_repeats: int = 5
    metric: str = "acc"  # acc, acc_norm or paper
    device: str = "auto"
    dtype: str = "auto"

    def validate(self) -> None:
        for s in self.sparsities:
            check_sparsity(s)
            if s == 0:
                raise SeapError("sparsity 0 is the dense model, which is always evaluated", "drop 0 from --sparsities")
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise SeapError(f"unknown method(s) {unknown}", f"methods: {', '.join(ALL_METHODS)}")
        get_score(self.seap_score)
        if self.metric not in REPORT_METRICS:
            raise SeapError(f"unknown metric {self.metric!r}", "use acc, acc_norm or paper")
        if self.limit is not None and self.limit < 1:
            raise SeapError(f"limit must be at least 1, got {self.limit}", "pass --limit 1 or more")
        if ROUTED in self.methods and len(self.tasks) < 2:
            raise SeapError("routing needs at least two tasks", "add tasks or drop seap-routed")


PAPER_ACC_NORM = {"openbookqa", "hellaswag", "piqa", "arc_challenge"}


def metric_for(task: str, metric: str) -> str:
    if metric == "paper":  # the mix that matches the paper's dense numbers (method notes §9)
        return "acc_norm" if task in PAPER_ACC_NORM else "acc"
    return metric


def average(tasks: dict[str, Any], metric: str) -> dict[str, float]:
    """Mean acc and acc_norm over tasks, and ``table``: the mean of the report's metric."""
    avg = {}
    for name in ("acc", "acc_norm"):
        values = [t[name] for t in tasks.values() if name in t]
        if values:
            avg[name] = sum(values) / len(values)
    values = [t[metric_for(task, metric)] for task, t in tasks.items()]
    avg["table"] = sum(values) / len(values)
    return avg


def evaluate_masks(base: LoadedModel, registry: Any, specs: Sequence[Any], method: str, sparsity: float,
                   masks: Mapping[str, PruningMask] | None, bias_compensation: bool = False, limit: int | None = None,
                   num_fewshot: int = 0, batch_size: int = 16, metric: str = "acc") -> dict[str, Any]:
    """One row of the table: the dense model (no masks), one general mask on all tasks, or
    one expert mask per task, each task evaluated with its own expert."""
    from .evaluation import evaluate

    start = time.perf_counter()
    meta: dict[str, Any] = {}
    if not masks:
        result = evaluate(base, registry, specs, limit, num_fewshot, batch_size)
        tasks, realised, meta = result["tasks"], 0.0, result
    elif set(masks) == {"general"}:
        model = apply_mask(base, masks["general"], "hard", bias_compensation=bias_compensation)
        result = evaluate(model, registry, specs, limit, num_fewshot, batch_size)
        tasks, realised, meta = result["tasks"], masks["general"].realised_sparsity(), result
    else:
        missing = [s.name for s in specs if s.name not in masks]
        if missing:
            raise SeapError(f"no expert mask for task(s) {missing}", "build an expert mask for every evaluated task")
        tasks = {}
        for spec in specs:
            expert = apply_mask(base, masks[spec.name], "hard", bias_compensation=bias_compensation)
            meta = evaluate(expert, registry, [spec], limit, num_fewshot, batch_size)
            tasks.update(meta["tasks"])
        realised = sum(masks[s.name].realised_sparsity() for s in specs) / len(specs)
    return {"method": method, "sparsity": sparsity, "realised_sparsity": realised, "tasks": tasks,
            "average": average(tasks, metric), "seconds": round(time.perf_counter() - start, 1),
            "lm_eval_version": meta.get("lm_eval_version"), "num_fewshot": num_fewshot, "limit": limit}


def router_info(router: Any) -> dict[str, Any]:
    """What the report shows of a router: held-out accuracy (overall, per task), confusion, setup."""
    info = {k: router.meta[k] for k in ("heldout_accuracy", "heldout_accuracy_per_task", "n_train", "n_heldout",
                                       "threshold", "confusion")}
    info["tasks"] = router.tasks
    info["feature_layer"] = router.feature_layer
    return info


def evaluate_routed(base: LoadedModel, registry: Any, specs: Sequence[Any], sparsity: float,
                    experts: Mapping[str, PruningMask], general: PruningMask | None, router: Any,
                    limit: int | None = None, num_fewshot: int = 0, batch_size: int = 16, metric: str = "acc",
                    threshold: float | None = None) -> dict[str, Any]:
    """The ``seap-routed`` row: the router picks an expert per document (falling back to the
    general mask below its threshold); accuracy includes routing errors."""
    from .evaluation import evaluate_lm
    from .routing import ExpertBank, RoutedModel, make_routed_lm, routing_summary

    router.check_model(base.fingerprint)
    router.check_tasks([s.name for s in specs])
    bank = ExpertBank(base, experts, general)
    routed = RoutedModel(bank, router, threshold)
    lm = make_routed_lm(routed, {s.lm_eval_task: s.name for s in specs}, batch_size)
    start = time.perf_counter()
    result = evaluate_lm(lm, registry, specs, limit, num_fewshot)
    seconds = time.perf_counter() - start
    realised = sum(m.realised_sparsity() for m in bank.masks.values()) / len(bank.masks)
    tasks = result["tasks"]
    return {"method": ROUTED, "sparsity": sparsity, "realised_sparsity": realised, "tasks": tasks,
            "average": average(tasks, metric), "seconds": round(seconds, 1),
            "lm_eval_version": result.get("lm_eval_version"), "num_fewshot": num_fewshot, "limit": limit,
            "routing": routing_summary(lm.log, [s.name for s in specs]),
            "router_seconds": round(routed.routing_seconds, 3), "router_overhead": routed.routing_seconds / seconds,
            "materialisations": bank.materialisations}


class Experiment:
    """Runs an :class:`ExperimentConfig`, keeping artifacts under ``out_dir/artifacts``."""

    def __init__(self, config: ExperimentConfig, out_dir: str | Path, progress: bool = True,
                 loaded: LoadedModel | None = None, verbose: bool | None = None) -> None:
        from .tasks import TaskRegistry

        config.validate()
        self.config = config
        self.out = Path(out_dir)
        self.art = self.out / "artifacts"
        self.progress = progress
        self.verbose = progress if verbose is None else verbose
        self.registry = TaskRegistry(config.data_dir, self.out / "tasks")
        self.specs = self.registry.resolve(config.tasks)
        not_mc = [s.name for s in self.specs if s.kind != "multiple_choice"]
        if not_mc:
            raise SeapError(f"task(s) {not_mc} are not multiple-choice tasks",
                            "use multiple-choice tasks; WikiText-2 perplexity is reported with --perplexity")
        self._loaded = loaded
        self.log: list[str] = []

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            self._loaded = load_model(self.config.model, device=self.config.device, dtype=self.config.dtype)
        return self._loaded

    def say(self, message: str) -> None:
        self.log.append(message)
        if self.verbose:
            print(f"[seap eval] {message}", flush=True)

    # -- calibration -----------------------------------------------------------------
    def statistics(self) -> dict[str, ActivationStatistics]:
        c = self.config
        corpora = {s.name: build_corpus(s.calibration_records(), s.name, c.samples, c.seed, source=s.source)
                   for s in self.specs}
        write_corpus(self.art / "corpus.jsonl", corpora, c.max_tokens)
        stats = {}
        for task, corpus in corpora.items():
            path = self.art / "stats" / task
            cached = None
            if path.is_dir():
                try:
                    cached = ActivationStatistics.load(path)
                except SeapError:
                    cached = None
            if (cached is not None and cached.fingerprint == self.loaded.fingerprint
                    and cached.meta.get("corpus_digest") == corpus.digest() and cached.meta.get("max_tokens") == c.max_tokens):
                stats[task] = cached
                continue
            self.say(f"statistics for {task} ({len(corpus)} texts)")
            stats[task] = collect_statistics(self.loaded, corpus, c.stats_batch_size, c.max_tokens, progress=self.progress)
            stats[task].save(path, overwrite=True)
        return stats

    def masks(self, stats: dict[str, ActivationStatistics]) -> dict[tuple[str, float], dict[str, PruningMask]]:
        """Masks per (method, sparsity): ``{task: mask}`` for experts, ``{"general": mask}`` otherwise."""
        c = self.config
        pooled = merge_statistics(list(stats.values()), "pooled") if len(stats) > 1 else next(iter(stats.values()))
        scores_cache: dict[tuple[str, str], Any] = {}

        def scores(score: str, task: str) -> Any:
            if (score, task) not in scores_cache:
                scores_cache[(score, task)] = compute_scores(pooled if task == "pooled" else stats[task], score)
            return scores_cache[(score, task)]

        needed = {m for m in c.methods if m in VARIANTS}
        if ROUTED in c.methods:
            needed |= {"seap-expert", "seap-general"}
        out: dict[tuple[str, float], dict[str, PruningMask]] = {}
        for method in sorted(needed):
            v = VARIANTS[method]
            score = c.seap_score if method.startswith("seap") else v.score
            for sparsity in c.sparsities:
                masks: dict[str, PruningMask] = {}
                if v.calibration == "task":
                    for task in stats:
                        masks[task] = build_mask(scores(score, task), sparsity, v.schedule, c.gqa_mode,
                                                 bias_compensation_stats=stats[task] if v.bias_compensation else None)
                elif v.calibration == "general":
                    combined = combine_scores([scores(score, t) for t in stats])
                    masks["general"] = build_mask(combined, sparsity, v.schedule, c.gqa_mode)
                else:
                    masks["general"] = build_mask(scores(score, "pooled"), sparsity, v.schedule, c.gqa_mode,
                                                  bias_compensation_stats=pooled if v.bias_compensation else None)
                for name, mask in masks.items():
                    mask.meta["method"] = method
                    mask.save(self.art / "masks" / f"{method}-{sparsity:g}" / name, overwrite=True)
                out[(method, sparsity)] = masks
        return out

    # -- evaluation ------------------------------------------------------------------
    def _row(self, method: str, sparsity: float, realised: float, tasks: dict[str, Any], seconds: float,
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
        row = {"method": method, "sparsity": sparsity, "realised_sparsity": realised, "tasks": tasks,
               "average": average(tasks, self.config.metric), "seconds": round(seconds, 1)}
        row.update(extra or {})
        return row

    def run(self) -> dict[str, Any]:
        c = self.config
        started = time.perf_counter()
        self.say(f"model {c.model}")
        base = self.loaded
        stats = self.statistics()
        masks = self.masks(stats)
        from .evaluation import data_fingerprint, lm_eval_version

        opts = {"limit": c.limit, "num_fewshot": c.num_fewshot, "batch_size": c.eval_batch_size, "metric": c.metric}
        self.say("evaluating the dense model")
        rows = [evaluate_masks(base, self.registry, self.specs, DENSE, 0.0, None, **opts)]
        meta = {"lm_eval_version": lm_eval_version(), "data_fingerprint": data_fingerprint(self.specs, c.limit, c.num_fewshot),
                "limit": c.limit, "num_fewshot": c.num_fewshot}
        for (method, sparsity), group in sorted(masks.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            if method not in c.methods:
                continue
            self.say(f"evaluating {method} at {sparsity:g}")
            rows.append(evaluate_masks(base, self.registry, self.specs, method, sparsity, group,
                                       VARIANTS[method].bias_compensation, **opts))
        router_info = None
        if ROUTED in c.methods:
            router_info, routed_rows = self.routed(masks)
            rows.extend(routed_rows)
        results: dict[str, Any] = {
            "config": asdict(c),
            "model_fingerprint": base.fingerprint,
            **meta,
            "tasks": [s.describe() for s in self.specs],
            "metric": c.metric,
            "rows": rows,
            "router": router_info,
        }
        if c.perplexity:
            results["perplexity"] = self.perplexities(masks)
        if c.bench:
            results["speed"] = self.speed(masks)
        results["seconds"] = round(time.perf_counter() - started, 1)
        return results

    def routed(self, masks: dict[tuple[str, float], dict[str, PruningMask]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        from .evaluation import training_prompts
        from .router import train_router

        c = self.config
        self.say("training the router")
        prompts = training_prompts(self.registry, self.specs, c.router_prompts, c.seed)
        router = train_router(self.loaded, prompts, c.router_layer, seed=c.seed, threshold=c.router_threshold)
        router.save(self.art / "router", overwrite=True)
        info = router_info(router)
        rows = []
        for sparsity in c.sparsities:
            self.say(f"evaluating seap-routed at {sparsity:g}")
            rows.append(evaluate_routed(self.loaded, self.registry, self.specs, sparsity,
                                        masks[("seap-expert", sparsity)], masks[("seap-general", sparsity)]["general"],
                                        router, c.limit, c.num_fewshot, c.eval_batch_size, c.metric))
        return info, rows

    def perplexities(self, masks: dict[tuple[str, float], dict[str, PruningMask]]) -> dict[str, Any]:
        from .evaluation import wikitext_perplexity

        c = self.config
        if not c.data_dir:
            raise SeapError("--perplexity needs WikiText-2 under --data-dir", "pass --data-dir with wikitext/")
        self.say("WikiText-2 perplexity")
        out = {"dense": wikitext_perplexity(self.loaded, c.data_dir, max_windows=c.perplexity_windows,
                                            progress=self.progress)}
        for (method, sparsity), group in masks.items():
            if method not in c.methods or "general" not in group:
                continue
            model = apply_mask(self.loaded, group["general"], "hard", bias_compensation=VARIANTS[method].bias_compensation)
            out[f"{method}@{sparsity:g}"] = wikitext_perplexity(model, c.data_dir, max_windows=c.perplexity_windows,
                                                               progress=self.progress)
        return out

    def speed(self, masks: dict[tuple[str, float], dict[str, PruningMask]]) -> dict[str, Any]:
        from .bench import benchmark

        c = self.config
        models = {"dense": self.loaded}
        for (method, sparsity), group in sorted(masks.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            if method in c.methods and "general" in group:
                models[f"{method}@{sparsity:g}"] = apply_mask(self.loaded, group["general"], "hard",
                                                               bias_compensation=VARIANTS[method].bias_compensation)
        self.say(f"speed benchmark of {len(models)} models")
        return benchmark(models, repeats=c.bench_repeats)


def flat_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """Flat numbers per row (``method@sparsity``): average and per-task accuracy, retention
    against dense, realised sparsity and speed-ups; what DVC tracks as metrics."""
    dense = next((r for r in results["rows"] if r["method"] == DENSE), None)
    metric = results.get("metric", "acc")
    speed = (results.get("speed") or {}).get("models", {})
    out: dict[str, Any] = {}
    for row in results["rows"]:
        name = DENSE if row["method"] == DENSE else f"{row['method']}@{row['sparsity']:g}"
        entry: dict[str, Any] = {"average": row["average"]["table"], "realised_sparsity": row["realised_sparsity"]}
        for task, values in row["tasks"].items():
            value = values.get(metric_for(task, metric))
            entry[task] = value
            if dense and value is not None:
                reference = dense["tasks"].get(task, {}).get(metric_for(task, metric))
                if reference:
                    entry[f"{task}_retention"] = value / reference
        if dense and dense["average"]["table"]:
            entry["retention"] = row["average"]["table"] / dense["average"]["table"]
        bench = speed.get(name) or next((v for k, v in sorted(speed.items()) if k.startswith(f"{name}:")), None)
        if bench:
            entry["prefill_speedup"] = bench["prefill_speedup"]
            entry["decode_speedup"] = bench["decode_speedup"]
        out[name] = entry
    return out


def save_results(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, results.md (Table 1 layout), accuracy_vs_sparsity.png, plus the
    flat metrics.json and accuracy.csv (average accuracy per method and sparsity) for DVC."""
    from .io import atomic_write_text
    from .report import accuracy_plot, markdown_report

    out = Path(out_dir)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "accuracy_vs_sparsity.png",
             "metrics": out / "metrics.json", "csv": out / "accuracy.csv"}
    atomic_write_text(paths["json"], json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(paths["markdown"], markdown_report(results))
    accuracy_plot(results, paths["plot"])
    atomic_write_text(paths["metrics"], json.dumps(flat_metrics(results), indent=2, sort_keys=True) + "\n")
    lines = ["method,sparsity,average,realised_sparsity"]
    for row in sorted(results["rows"], key=lambda r: (r["method"], r["sparsity"])):
        lines.append(f"{row['method']},{row['sparsity'] * 100:g},{row['average']['table'] * 100:.4f},"
                     f"{row['realised_sparsity'] * 100:.4f}")
    atomic_write_text(paths["csv"], "\n".join(lines) + "\n")
    return paths
