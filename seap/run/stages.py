"""One function per stage of the plan (:data:`seap.run.plan.STAGES`).

Every front door runs these: the local executor behind ``seap eval`` and the Prefect flow
(:mod:`seap.run.execute`) and the DVC stages (:mod:`seap.run.dvc`). A stage function gets
its job (parameters), the output folders of the jobs it reads (by role) and a folder to
create and fill (``out``, which does not exist yet; the caller renames it into place, so
nothing is ever half-written). It reads nothing else: what a job computes is decided by its
parameters and inputs alone, which is what makes the content-addressed cache correct.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seap.errors import SeapError
from seap.io import atomic_write_json, read_json
from seap.run.methods import ROUTED_EXPERTS, ROUTED_FALLBACK
from seap.run.plan import BUDGET_GENERAL_ROW, BUDGET_ROUTED_ROW, BUDGET_ROW, BUDGET_UNIFORM_ROW, GENERAL, POOLED, Job

MODEL_RECORD = "model.json"
CORPUS_FILE = "corpus.jsonl"
ROW_FILE = "row.json"
ITEMS_FILE = "items.json"
BENCH_FILE = "bench.json"
PERPLEXITY_FILE = "perplexity.json"
REGISTERED_FILE = "registered.json"
CHECKPOINT_DIR = "model"  # (in a checkpoint job's output) the pruned checkpoint
CHECKPOINT_SUMMARY = "summary.json"  # ... and what it removed
SELECTION_TASKS = "tasks.json"  # (in the selection job's output) each task, as the run names it, -> its name there
BUDGET_FILE = "budget.json"  # (in the budget choice's output) each task's curve and chosen sparsity
BUDGET_PLOT = "budget.png"


@dataclass
class StageContext:
    """What stage functions share within one process: the loaded base model (kept once, keyed
    by its content digest, never modified in place), where lm-eval task files go, and whether
    to draw progress bars."""

    task_files: Path
    progress: bool = False
    say: Callable[[str], None] = print
    preloaded: Any = None  # a LoadedModel the caller holds already: used for the model at its location
    work: Path | None = None  # a job's own folder for resumable progress (set per job by the executor)
    _models: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def base(self, model_dir: Path, device: str | None = None) -> Any:
        """The base model recorded by a ``model`` job (loaded once per process), on its recorded
        device or ``device``."""
        from seap.model.loading import load_model

        record = read_json(Path(model_dir) / MODEL_RECORD, "model record")
        if device is not None:  # (in the dtype of the recorded device, where its layers run)
            from seap.model.loaded import resolve_device, resolve_dtype

            dtype = resolve_dtype(record["dtype"], resolve_device(record["device"]))
            record = {**record, "device": device, "dtype": dtype, "digest": f"{record['digest']}@{device}"}
        if self.preloaded is not None and \
                Path(record["location"]).resolve() == Path(self.preloaded.location).resolve():
            return self.preloaded
        with self._lock:
            loaded = self._models.get(record["digest"])
            if loaded is None:
                self._models.clear()  # one base model at a time
                loaded = self._models[record["digest"]] = load_model(record["location"], device=record["device"],
                                                                     dtype=record["dtype"])
            return loaded

    def devices(self, model_dir: Path) -> list[Any]:
        """The devices the recorded model's walks may be spread over
        (:func:`seap.model.loaded.resolve_devices`): several only for a checkpoint read layer by
        layer (a model held in memory runs on one device)."""
        from seap.model.loaded import resolve_devices

        record = read_json(Path(model_dir) / MODEL_RECORD, "model record")
        devices = resolve_devices(record["device"])
        with self._lock:
            held = record["digest"] in self._models
        return devices if record.get("offload") != "cpu" and self.preloaded is None and not held else devices[:1]

    def layers(self, model_dir: Path, device: Any = None) -> Any:
        """The base model recorded by a ``model`` job as a layer source
        (:class:`~seap.model.layer_stream.LayerSource`): the model already held in this process,
        or its checkpoint read layer by layer (the dense model is never loaded whole), on
        ``device`` (one of :meth:`devices`; left out: the recorded device). Its fingerprint is
        computed once per model and dtype and kept in the cache folder."""
        from seap.io import atomic_write_text, cache_dir
        from seap.model.layer_stream import CheckpointLayers, NotStreamable, ResidentLayers
        from seap.model.loaded import resolve_device, resolve_dtype

        record = read_json(Path(model_dir) / MODEL_RECORD, "model record")
        if device is not None:
            record["device"] = str(device)
        if record.get("offload") == "cpu":  # held whole in CPU memory, each layer run on the device
            return ResidentLayers(self.base(model_dir, device="cpu"), device=resolve_device(record["device"]))
        if self.preloaded is not None and Path(record["location"]).resolve() == Path(self.preloaded.location).resolve():
            return ResidentLayers(self.base(model_dir))
        with self._lock:
            held = self._models.get(record["digest"])
        if held is not None:  # (a model this process loaded whole already)
            return ResidentLayers(held)
        dtype = resolve_dtype(record["dtype"], resolve_device(record["device"]))  # (the same on every device of a kind)
        memo = cache_dir() / "fingerprints" / f"{record['digest'].replace(':', '-')[:80]}-{str(dtype).split('.')[-1]}"
        known = memo.read_text(encoding="utf-8").strip() if memo.is_file() else None
        try:
            source = CheckpointLayers(record["location"], record["device"], record["dtype"], fingerprint=known)
        except NotStreamable:  # tensor names converted at load time (e.g. MoE experts): loaded whole
            return ResidentLayers(self.base(model_dir))
        if known is None:
            memo.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(memo, source.fingerprint)
        return source

    def walk_work(self, source: Any) -> Path | None:
        """Where a walk over ``source`` keeps its hidden states and progress: this job's work folder
        for a checkpoint read layer by layer (offload to disk), none for a model held in memory."""
        from seap.model.layer_stream import CheckpointLayers

        return self.work if isinstance(source, CheckpointLayers) else None

    def group_walk(self, model_dir: Path, device: Any, index: int, groups: int) -> tuple[Any, Path | None]:
        """The layer source and work folder of walk ``index`` of ``groups`` spread over devices
        (:meth:`devices`): on ``device``, in a work folder of its own, when there are several;
        as :meth:`layers` and :meth:`walk_work` give them when there is one."""
        source = self.layers(model_dir, device if groups > 1 else None)
        work = self.walk_work(source)
        return source, work / f"device-{index}" if work is not None and groups > 1 else work

    def catalogue(self, data_dir: str | None) -> Any:
        from seap.data.catalogue import TaskCatalogue

        return TaskCatalogue(data_dir, self.task_files)


Inputs = Mapping[str, Any]  # role -> Path, list of Paths, or {name: Path}
StageFunction = Callable[[Job, Inputs, Path, StageContext], None]


def model(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """Resolve the base model (fetch or convert once); record where it is and a digest of its files."""
    from seap.contenthash import tree_digest
    from seap.model.loading import resolve_model_path

    from seap.model.shards import checkpoint_files

    p = job.params
    location, kind = resolve_model_path(p.model)  # (a hub id: its snapshot in the Hugging Face cache)
    checkpoint_files(location)  # a missing or truncated shard is refused here, before any work
    digest = tree_digest(location)
    out.mkdir(parents=True)
    atomic_write_json(out / MODEL_RECORD, {"name": p.model, "location": str(location), "kind": kind,
                                           "device": p.device, "dtype": p.dtype, "offload": p.offload,
                                           "digest": digest})


def verify_model_record(model_dir: Path) -> None:
    """Refuse a model record whose model changed since it was written (a local folder or file
    edited in place): its content digest no longer matches."""
    from seap.contenthash import tree_digest

    record = read_json(Path(model_dir) / MODEL_RECORD, "model record")
    if not Path(record["location"]).exists() or tree_digest(record["location"]) != record["digest"]:
        raise SeapError(f"model {record['name']!r} is not the one the `model` stage recorded (its files changed)",
                        "re-run the model stage and everything after it: `dvc repro -f -s model && dvc repro`")


def selection(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """The tasks' data with each train split cut in two (:func:`seap.data.selection.write_selection_data`):
    ``train.jsonl`` calibrates, ``validation.jsonl`` holds the selection items; and how a run on
    the folder names each task (``tasks.json``)."""
    from seap.data.selection import write_selection_data

    p = job.params
    specs = ctx.catalogue(p.data_dir).resolve(p.tasks)
    out.mkdir(parents=True)
    names = write_selection_data(specs, out, p.items, p.seed)
    atomic_write_json(out / SELECTION_TASKS, dict(zip(p.tasks, names, strict=True)))
    held = {s.name: len((out / s.name / "validation.jsonl").read_text(encoding="utf-8").splitlines()) for s in specs}
    ctx.say("selection items: " + ", ".join(f"{t} {n}" for t, n in held.items()))


def data_source(inputs: Inputs, data_dir: str | None, tasks: list[str]) -> tuple[str | None, list[str]]:
    """Where a job's tasks are read from: ``data_dir`` and ``tasks`` as configured, or, for a job
    that reads the selection data (an ``inputs["data"]`` folder), that folder and each task's
    name there."""
    if not inputs.get("data"):
        return data_dir, tasks
    folder = Path(inputs["data"])
    names = read_json(folder / SELECTION_TASKS, "selection data")  # (the run's task -> its name there)
    return str(folder), [names[t] for t in tasks]


def corpus(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """Calibration corpora of the tasks' train splits (with an accuracy budget: their calibrating
    part, ``inputs["data"]``), or of a records file (``seap prune``), in one corpus file."""
    from seap.data.corpus import build_corpus, write_corpus

    p = job.params
    if p.records is not None:
        from seap.data.corpus import build_corpora

        corpora = build_corpora(p.records, p.tasks, p.samples, p.seed)
    else:
        data_dir, tasks = data_source(inputs, p.data_dir, p.tasks)
        specs = ctx.catalogue(data_dir).resolve(tasks)
        corpora = {s.name: build_corpus(s.calibration_records(), s.name, p.samples, p.seed, source=s.source)
                   for s in specs}
    out.mkdir(parents=True)
    write_corpus(out / CORPUS_FILE, corpora, max_tokens=p.max_tokens)
    ctx.say(", ".join(f"{t}: {len(c)} texts" for t, c in corpora.items()))


def statistics(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """Per-task statistics (``out/<task>/``): one pass, one shard of one, or shards merged; or
    the pooled merge of all tasks (``out`` itself)."""
    from seap.maths.statistics import ActivationStatistics, merge_statistics

    p = job.params
    out.parent.mkdir(parents=True, exist_ok=True)
    if p.moe:  # a mixture-of-experts model: what the routers do on each task's tokens
        _router_statistics(job, inputs, out, ctx)
        return
    if job.name == POOLED:
        merge_statistics([ActivationStatistics.load(Path(inputs["statistics"]) / t) for t in p.tasks], POOLED).save(out)
        return
    out.mkdir(parents=True)
    if "shards" in inputs:
        for t in p.tasks:
            merge_statistics([ActivationStatistics.load(Path(s) / t) for s in inputs["shards"]], t).save(out / t)
        return
    _collect(job, inputs, out, ctx)


def _router_statistics(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    from seap.data.corpus import DEFAULT_MAX_TOKENS, read_corpus
    from seap.maths.expert_selection import RouterStatistics
    from seap.model.expert_pruning import collect_router_statistics

    p = job.params
    if job.name == POOLED:
        parts = [RouterStatistics.load(Path(inputs["statistics"]) / t) for t in p.tasks]
        merged = parts[0]
        for part in parts[1:]:
            merged = merged.merge(part)
        merged.save(out)
        return
    corpora, header = read_corpus(Path(inputs["corpus"]) / CORPUS_FILE)
    source = ctx.layers(inputs["model"])  # (read layer by layer)
    work = ctx.walk_work(source)
    out.mkdir(parents=True)
    for t in p.tasks:
        collect_router_statistics(source, corpora[t], p.batch_size, header.get("max_tokens", DEFAULT_MAX_TOKENS),
                                  progress=ctx.progress, channels=p.unit != "experts",
                                  work=work / t if work is not None else None).save(out / t)


def _collect(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """Every task's statistics in one walk over the model's layers."""
    from seap.data.corpus import DEFAULT_MAX_TOKENS, read_corpus
    from seap.model.calibration import collect_task_statistics
    from seap.model.devices import on_devices, spread

    p = job.params
    corpora, header = read_corpus(Path(inputs["corpus"]) / CORPUS_FILE)
    missing = [t for t in p.tasks if t not in corpora]
    if missing:
        raise SeapError(f"task(s) {missing} are not in the corpus", f"it holds: {', '.join(corpora)}")
    shard = tuple(p.shard) if p.shard else None
    devices = ctx.devices(inputs["model"])
    groups = spread({t: sum(len(x) for x in corpora[t].texts) for t in p.tasks}, len(devices))

    def walk(group: list[str], device: Any, k: int) -> dict[str, Any]:
        """The group's tasks in one walk on ``device`` (its own work folder when there are several)."""
        source, work = ctx.group_walk(inputs["model"], device, k, len(groups))
        return collect_task_statistics(source, {t: corpora[t] for t in group}, p.batch_size,
                                       header.get("max_tokens", DEFAULT_MAX_TOKENS), shard=shard,  # type: ignore[arg-type]
                                       progress=ctx.progress, work=work)

    for collected in on_devices(groups, devices, walk):
        for t, stats in collected.items():
            stats.save(out / t)


def scores(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """One task's scores (or the pooled statistics' scores)."""
    from seap.run.commands import make_scores

    folder = Path(inputs["statistics"])
    task = job.params.task
    make_scores(folder if task == POOLED else folder / task, out, job.params.score)


def masks(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """One mask (:func:`seap.run.mask_building.build_method_mask`): an expert (one task's scores
    or router statistics), the general mask (the tasks' combined) or a pooled method's mask;
    bias-compensation means stored in it when it compensates. A mask that is reconstructed is
    refitted afterwards, in the refit walk (:func:`refits`)."""
    from seap.maths.scores import ImportanceScores
    from seap.maths.statistics import ActivationStatistics
    from seap.run.mask_building import build_method_mask

    p = job.params
    out.parent.mkdir(parents=True, exist_ok=True)
    if p.moe:  # experts of an MoE model: from its task's (or all tasks') router statistics
        from seap.maths.expert_selection import RouterStatistics

        folder = Path(inputs["statistics"])
        stats = RouterStatistics.load(folder / p.mask if p.kind == "expert" else folder)
        build_method_mask(p, router_statistics=stats).save(out)
        return
    bias = inputs.get("bias_statistics")
    if bias is not None and p.kind == "expert":
        bias = Path(bias) / p.mask
    scores = [ImportanceScores.load(s) for s in inputs["scores"]]
    bias_statistics = ActivationStatistics.load(bias) if bias is not None else None
    build_method_mask(p, scores=scores, bias_statistics=bias_statistics).save(out)


def refits(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """A walk: every mask of ``inputs["masks"]`` refitted on its calibration text (its task's, or
    every task's, then the generic text) in one pass over the model's layers
    (:func:`seap.model.refitting.reconstruct_masks`; the sequential refit walks once per mask),
    each written to ``out/<row>/<name>``; or one refitted mask, linked from its walk's output."""
    from seap.io import copy_artifact
    from seap.maths.mask_formats import load_mask
    from seap.model.devices import on_devices, spread
    from seap.model.refitting import reconstruct_mask_sequential, reconstruct_masks
    from seap.run.mask_building import refit_options

    p = job.params
    if p.member is not None:
        copy_artifact(Path(inputs["walk"]) / p.member, out)
        return
    corpora, generic_parts, cap = _refit_corpora(inputs)
    names = list(corpora)
    # walked generic text first: each mask merges its task's part (or every task's) and then the
    # generic parts, so with these in hand an expert is refitted as soon as its task's part is done
    parts = [*generic_parts, *corpora.values()]
    generic = list(range(len(generic_parts)))
    first = len(generic_parts)
    options = refit_options(p.refit)
    members = {}
    for member, path in inputs["masks"].items():
        task = p.tasks.get(member)
        if task is not None and task not in corpora:
            raise SeapError(f"task {task!r} is not in the corpus", f"it holds: {', '.join(names)}")
        used = [first + names.index(task)] if task is not None else list(range(first, first + len(names)))
        members[member] = (load_mask(path), used + generic)
    out.mkdir(parents=True)
    devices = ctx.devices(inputs["model"])
    sizes = [sum(len(x) for x in part.texts) for part in parts]
    groups = spread({m: float(sum(sizes[k] for k in used)) for m, (_, used) in members.items()}, len(devices))

    def walk(group: list[str], device: Any, k: int) -> None:
        """The group's masks refitted on ``device``: in one walk over the parts they use, or
        (sequential) one walk per mask."""
        source, work = ctx.group_walk(inputs["model"], device, k, len(groups))
        if options.sequential:  # the pruned stream is each mask's own: one walk per mask
            from seap.data.corpus import merge_corpora

            for member in group:
                mask, used = members[member]
                chosen = [parts[j] for j in used]
                corpus = chosen[0] if len(chosen) == 1 else merge_corpora(chosen)
                reconstruct_mask_sequential(source, mask, corpus, options, p.batch_size, cap, ctx.progress).save(out / member)
            return
        needed = sorted({j for member in group for j in members[member][1]})  # (the walk's parts, in order)
        own = {member: (members[member][0], [needed.index(j) for j in members[member][1]]) for member in group}
        done = reconstruct_masks(source, own, [parts[j] for j in needed], options, p.batch_size, cap, ctx.progress,
                                 work)
        for member, mask in done.items():
            mask.save(out / member)

    on_devices(groups, devices, walk)


def _refit_corpora(inputs: Inputs) -> tuple[dict[str, Any], list[Any], int | None]:
    """The run's corpora by task, the generic text's corpora and the token cap."""
    from seap.data.corpus import DEFAULT_MAX_TOKENS, read_corpus

    corpora, header = read_corpus(Path(inputs["refit_corpus"]) / CORPUS_FILE)
    generic = list(read_corpus(Path(inputs["refit_generic"]) / CORPUS_FILE)[0].values()) \
        if "refit_generic" in inputs else []
    return corpora, generic, header.get("max_tokens", DEFAULT_MAX_TOKENS)


def checkpoint(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """The base model hard-pruned with one mask, saved as a checkpoint that
    :func:`seap.load_pruned` reloads (``out/model``), and what it removed (``out/summary.json``:
    the mask's realised sparsity of prunable weights, and all parameters before and after).

    The mask (heads and channels, or a mixture-of-experts model's experts) is applied one
    decoder layer at a time (:func:`seap.model.checkpoint.write_pruned`): the dense model is
    never loaded whole, and a run killed part-way resumes after the last finished layer
    (``ctx.work``)."""
    from seap.maths.mask_formats import load_mask
    from seap.model.checkpoint import write_pruned
    from seap.model.shards import shard_parameter_count

    mask = load_mask(inputs["mask"])
    out.mkdir(parents=True)
    source = ctx.layers(inputs["model"])
    dense_params = sum(p.numel() for p in source.model.parameters())
    write_pruned(source, mask, out / CHECKPOINT_DIR, work=ctx.work, progress=ctx.progress)
    pruned_params = shard_parameter_count(out / CHECKPOINT_DIR)
    atomic_write_json(out / CHECKPOINT_SUMMARY, {
        "row": job.params.row, "mask": job.params.mask, "realised_sparsity": mask.realised_sparsity(),
        "dense_params": dense_params, "pruned_params": pruned_params})


def _load_masks(paths: Mapping[str, Any]) -> dict[str, Any]:
    from seap.maths.mask_formats import load_mask

    return {name: load_mask(path) for name, path in paths.items()}


def _write_row(out: Path, row: dict[str, Any], items: Mapping[str, Any]) -> None:
    out.mkdir(parents=True)
    atomic_write_json(out / ROW_FILE, row)
    atomic_write_json(out / ITEMS_FILE, items)


def evaluate(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """One row: dense, a general mask on every task, or each task with its own expert; on the
    reported items, or (``select`` jobs: ``inputs["data"]``) on the selection items."""
    from seap.evaluation.rows import evaluate_masks

    p = job.params
    data_dir, tasks = data_source(inputs, p.data_dir, p.tasks)
    catalogue = ctx.catalogue(data_dir)
    specs = catalogue.resolve(tasks)
    loaded_masks = _load_masks(inputs.get("masks") or {})
    sparsity, matched = p.sparsity, None
    if inputs.get("choice"):  # every expert at the one grid sparsity nearest the budget's mean (the choice's)
        uniform = read_json(Path(inputs["choice"]) / BUDGET_FILE, "budget")["uniform"]
        sparsity, matched = float(uniform["sparsity"]), float(uniform["budget_mean"])
        loaded_masks = _load_masks({t: Path(inputs["search"]) / SEARCH_UNIFORM / t for t in p.tasks}
                                   if inputs.get("search") else inputs["candidates"][uniform["row"]])
    loaded = ctx.base(inputs["model"])
    row, items = evaluate_masks(loaded, catalogue, specs, p.method, sparsity, loaded_masks, p.limit,
                                p.num_fewshot, p.batch_size, p.metric)
    if matched is not None:
        row["budget_mean_sparsity"] = matched
    if p.method in (BUDGET_ROW, BUDGET_GENERAL_ROW):  # (sizes the budget chose: the row's is their mean)
        row["sparsity"] = row["realised_sparsity"]
        row["task_sparsity"] = {t: m.realised_sparsity() for t, m in loaded_masks.items()}
    row["model_fingerprint"] = loaded.fingerprint
    row["masks"] = {name: m.digest() for name, m in loaded_masks.items()}
    _write_row(out, row, items)
    ctx.say(f"{job.row or job.key}: average {row['average']['table'] * 100:.2f}")


def budget(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """Each task's sparsity under the accuracy budget, from the selection rows
    (:mod:`seap.maths.budget`: the largest candidate that keeps within it, with every smaller
    one), each task's chosen expert (``out/<task>/``; a task no candidate keeps within budget
    gets a mask that keeps everything), with ``general_rows`` the general mask under the same
    budget (``out/general/``: the largest sparsity that keeps every task within it), and the
    plot of the curves; or (``member``) one chosen mask, copied from that choice."""
    from seap.io import copy_artifact

    p = job.params
    if p.member is not None:
        copy_artifact(Path(inputs["choice"]) / p.member, out)
        return
    from seap.evaluation.budget_plot import budget_plot
    from seap.evaluation.metrics import chance, metric_for
    from seap.maths.budget import (
        DECIMALS,
        allowed_drop,
        chosen_sparsity,
        general_sparsity,
        nearest_uniform,
        selection_resolution,
        with_speed_target,
    )
    from seap.maths.mask_formats import BUDGET_META as MASK_META
    from seap.maths.mask_formats import load_mask
    from seap.maths.schedules import BEYOND_REACH

    def accuracy(row: Mapping[str, Any], task: str) -> float:
        return float(row["tasks"][task][metric_for(task, p.metric)])

    def chosen_mask(rows: Mapping[str, Any], chosen: float, name: str, sized_by: dict[str, Any]) -> Any:
        """The candidate ``name`` of the row at ``chosen`` (none: a mask keeping everything), with
        what sized it in its metadata (what the registry and the promotion gates read back)."""
        row = next((k for k, r in rows.items() if round(float(r["sparsity"]), DECIMALS) == chosen
                    and name in candidates.get(k, {})), None)
        mask = load_mask(candidates[row][name]) if row is not None else \
            load_mask(next(g[name] for g in candidates.values() if name in g)).keep_all()
        mask.meta[MASK_META] = {"max_drop": p.max_drop, "max_drop_rel": p.max_drop_rel, "metric": p.metric,
                                "chosen_sparsity": chosen, **sized_by}
        mask.save(out / name)
        return mask

    dense_row = read_json(Path(inputs["dense"]) / ROW_FILE, "selection row")
    dense_items = read_json(Path(inputs["dense"]) / ITEMS_FILE, "selection items")

    candidates = {row: dict(group) for row, group in (inputs.get("candidates") or {}).items()}
    searched: dict[str, Any] = {}  # (a bisection's rows, by method)
    searched_beyond: list[float] = []
    if inputs.get("search"):
        folder = Path(inputs["search"])
        for row, result in read_json(folder / SEARCH_ROWS, "search rows").items():
            searched.setdefault(row.partition("@")[0], {})[row] = result
            for member in (folder / SEARCH_MASKS / row).iterdir() if (folder / SEARCH_MASKS / row).is_dir() else ():
                candidates.setdefault(row, {})[member.name] = member
        search_record = read_json(folder / SEARCH_FILE, "search record")
        for found_beyond in search_record["beyond_reach"].values():
            searched_beyond.extend(found_beyond)

    def selection_rows(kind: str, method: str) -> dict[str, Any]:
        rows = {}
        for key, path in (inputs.get(kind) or {}).items():
            rows[key] = read_json(Path(path) / ROW_FILE, "selection row")
            if p.confidence:  # (per item: the paired drop's standard error)
                rows[key]["correct"] = _correct(read_json(Path(path) / ITEMS_FILE, "selection items"), p.metric)
        for key, row in searched.get(method, {}).items():  # (a seeded row's tasks, and the probes')
            rows[key] = {**rows.get(key, {}), "sparsity": row["sparsity"],
                         "tasks": {**rows.get(key, {}).get("tasks", {}), **row["tasks"]},
                         "correct": {**rows.get(key, {}).get("correct", {}), **row.get("correct", {})}}
        return rows

    dense_correct = _correct(read_json(Path(inputs["dense"]) / ITEMS_FILE, "selection items"), p.metric) \
        if p.confidence else {}

    def read(row: Mapping[str, Any], task: str) -> float:
        return _held_accuracy(row, task, p, accuracy(dense_row, task), dense_correct)

    def within_reach(found: dict[str, Any]) -> dict[str, Any]:  # (candidates the schedule could build)
        return {k: r for k, r in found.items()
                if not any(BEYOND_REACH in load_mask(m).meta for m in candidates[k].values())}

    found = selection_rows("rows", ROUTED_EXPERTS)
    found_general = selection_rows("general_rows", ROUTED_FALLBACK)
    everything = {**found, **found_general}
    rows, general_rows = within_reach(found), within_reach(found_general)
    out.mkdir(parents=True)
    record: dict[str, Any] = {"max_drop": p.max_drop, "max_drop_rel": p.max_drop_rel, "metric": p.metric, "tasks": {}}
    if inputs.get("search"):  # (how the bisection went: what the report says of it)
        record["search"] = {"kind": "bisect", "step": search_record["step"], "ceiling": search_record["ceiling"],
                            "rounds": len(search_record["rounds"]),
                            "probes": sum(len(r) for r in search_record["rounds"])}
    beyond = sorted({float(r["sparsity"]) for k, r in everything.items() if k not in rows and k not in general_rows}
                    | set(searched_beyond))
    if beyond:
        record["beyond_reach"] = beyond
        ctx.say(f"budget: the schedule cannot reach {', '.join(f'{s * 100:g}%' for s in beyond)} on this model; "
                "those candidates are left out")
    by_accuracy = p.max_drop is not None or p.max_drop_rel is not None
    speed = read_json(Path(inputs["speed"]) / BENCH_FILE, "candidate speed") if inputs.get("speed") else None
    timed = speed["models"] if speed is not None else None
    if speed is not None:
        record["min_speedup"] = p.min_speedup
        record["speed_setup"] = speed.get("setup", {})

    def with_speed(found: Mapping[str, Any], name: str, chosen: float | None, entry: dict[str, Any]) -> float:
        """``chosen`` (the accuracy budget's, or None) held against the speed target: the smallest
        candidate that reaches it (:func:`~seap.maths.budget.speed_sparsity`); said when the two
        cannot both be met (the accuracy budget wins)."""
        if timed is None:
            return chosen if chosen is not None else 0.0
        speedups = {float(r["sparsity"]): timed[f"{k}:{name}"]["prefill_speedup"] for k, r in found.items()
                    if f"{k}:{name}" in timed}
        alone = chosen is None
        chosen, fast, met = with_speed_target(chosen, speedups, p.min_speedup)
        entry["speed"] = {"target": p.min_speedup, "reached_at": fast, "met": met,
                          "curve": {f"{s:g}": v for s, v in sorted(speedups.items())}}
        if alone and fast is None:
            ctx.say(f"{name}: no candidate reaches a prefill speed-up of {p.min_speedup:g}; it stays dense")
        elif not met:
            ctx.say(f"{name}: the budget and the speed target cannot both be met (the budget allows "
                    f"{chosen * 100:g}%, the speed-up of {p.min_speedup:g} needs "
                    f"{'more than the grid has' if fast is None else f'{fast * 100:g}%'}); the budget is kept")
        entry["speed"]["at_chosen"] = speedups.get(next((s for s in speedups if round(s, DECIMALS) == chosen), -1.0))
        return chosen

    dense, allowed = {}, {}
    for task in p.tasks:
        dense[task] = accuracy(dense_row, task)
        items = dense_items.get(task) or []
        at_chance = chance(items)
        curve = {float(row["sparsity"]): accuracy(row, task) for row in rows.values() if task in row["tasks"]}
        resolution = selection_resolution(dense[task], len(items))
        entry = {"dense": dense[task], "chance": at_chance, "selection_items": len(items),
                 "curve": {f"{s:g}": a for s, a in sorted(curve.items())}, "resolution": resolution}
        chosen = None
        if by_accuracy:
            allowed[task] = entry["allowed_drop"] = allowed_drop(dense[task], p.max_drop, p.max_drop_rel, at_chance)
            held = {float(row["sparsity"]): read(row, task) for row in rows.values() if task in row["tasks"]}
            if p.confidence:  # (what the choice held against the budget: dense less the bound on the drop)
                entry["confidence"] = p.confidence
                entry["curve_bound"] = {f"{s:g}": a for s, a in sorted(held.items())}
            chosen = chosen_sparsity(held, dense[task], allowed[task])
            if chosen == 0.0:
                ctx.say(f"{task}: no sparsity of the grid keeps within the budget; its expert stays dense")
            if resolution > allowed[task] * 100:
                ctx.say(f"warning: {task}: {len(items)} selection items resolve {resolution:.1f} accuracy points "
                        f"(standard error), more than the budget of {allowed[task] * 100:.1f}; more items "
                        "(selection_items) or a larger budget make the choice reliable")
        chosen = entry["chosen"] = with_speed(rows, task, chosen, entry)
        if chosen == 0.0:
            entry["dense_expert"] = True
        at = entry["curve"].get(f"{chosen:g}", dense[task])
        mask = chosen_mask(rows, chosen, task, {"allowed_drop": allowed.get(task), "selection_items": len(items),
                                                "selection_dense": dense[task], "selection_accuracy": at})
        entry["realised_sparsity"] = mask.realised_sparsity()
        record["tasks"][task] = entry
    chosen_sizes = {t: e["chosen"] for t, e in record["tasks"].items()}
    at = {round(float(r["sparsity"]), DECIMALS): k for k, r in (rows or found).items()  # (within reach, if any,
          if all(t in r["tasks"] for t in p.tasks) and k in (inputs.get("rows") or {})}  # and planned for every task)
    if inputs.get("search"):  # (a bisection built every expert at the step nearest the chosen sizes' mean)
        record["uniform"] = {"sparsity": search_record["uniform"]["sparsity"], "row": None}
    else:
        uniform = nearest_uniform(chosen_sizes, list(at))  # the comparison at (nearly) equal mean sparsity
        record["uniform"] = {"sparsity": uniform, "row": at[uniform]}
    record["uniform"]["budget_mean"] = sum(chosen_sizes.values()) / len(chosen_sizes)
    if general_rows:
        curves = {t: {float(r["sparsity"]): accuracy(r, t) for r in general_rows.values() if t in r["tasks"]}
                  for t in p.tasks}
        general: dict[str, Any] = {"curves": {t: {f"{s:g}": a for s, a in sorted(c.items())} for t, c in curves.items()}}
        held = {t: {float(r["sparsity"]): read(r, t) for r in general_rows.values() if t in r["tasks"]} for t in p.tasks}
        chosen = general_sparsity(held, dense, allowed) if by_accuracy else None
        chosen = general["chosen"] = with_speed(general_rows, GENERAL, chosen, general)
        at = {t: next((a for s, a in curves[t].items() if round(s, DECIMALS) == chosen), dense[t]) for t in p.tasks}
        worst = max(p.tasks, key=lambda t: (dense[t] - at[t]) - allowed.get(t, 0.0))  # (the task closest to its budget)
        mask = chosen_mask(general_rows, chosen, GENERAL,
                           {"allowed_drop": allowed.get(worst), "selection_items": len(dense_items.get(worst) or []),
                            "selection_dense": dense[worst], "selection_accuracy": at[worst], "bound_by": worst})
        record["general"] = {**general, "realised_sparsity": mask.realised_sparsity(), "bound_by": worst}
        if chosen == 0.0:
            ctx.say("general: no sparsity of the grid keeps every task within the budget; it stays dense")
    atomic_write_json(out / BUDGET_FILE, record)
    budget_plot(record, out / BUDGET_PLOT)
    ctx.say("budget: " + ", ".join(f"{t} {e['chosen'] * 100:g}%" for t, e in record["tasks"].items())
            + (f"; general {record['general']['chosen'] * 100:g}%" if general_rows else ""))


SEARCH_FILE = "search.json"  # (in a search's output) each member's measured curve, round by round
SEARCH_ROWS = "rows.json"  # ... the selection results as rows (row key -> sparsity, tasks)
SEARCH_MASKS = "masks"  # ... every scored candidate: masks/<row>/<member>
SEARCH_UNIFORM = "uniform"  # ... every task's expert at one sparsity, the mean of the chosen sizes: uniform/<task>


def _correct(items: Mapping[str, Any], metric: str) -> dict[str, dict[str, float]]:
    """Per-item correctness of a row's per-item results (task -> item -> 1.0 or 0.0), under the
    run's metric for each task, keyed as JSON keeps it."""
    from seap.evaluation.metrics import metric_for
    from seap.evaluation.significance import correctness

    found = correctness(items, {task: metric_for(task, metric) for task in items})
    return {task: {str(k): v for k, v in per_item.items()} for task, per_item in found.items()}


def _held_accuracy(row: Mapping[str, Any], task: str, p: Any, dense: float,
                   dense_correct: Mapping[str, Mapping[str, float]]) -> float:
    """The selection accuracy of ``row`` on ``task`` that the budget's choice holds against it:
    measured, or (``p.confidence``) ``dense`` less the bound on the paired drop
    (:func:`~seap.maths.budget.drop_bound`, per item against ``dense_correct``)."""
    from seap.evaluation.metrics import metric_for
    from seap.maths.budget import drop_bound

    if not p.confidence:
        return float(row["tasks"][task][metric_for(task, p.metric)])
    return dense - drop_bound(dense_correct[task], row["correct"][task], p.confidence)


def _budgets(p: Any, dense_row: Mapping[str, Any], dense_items: Mapping[str, Any]) -> dict[str, tuple[float, float, float]]:
    """Each task of ``p.tasks`` -> (dense selection accuracy, chance, allowed drop), all as fractions."""
    from seap.evaluation.metrics import chance, metric_for
    from seap.maths.budget import allowed_drop

    found = {}
    for task in p.tasks:
        dense = float(dense_row["tasks"][task][metric_for(task, p.metric)])
        at_chance = chance(dense_items.get(task) or [])
        found[task] = (dense, at_chance, allowed_drop(dense, p.max_drop, p.max_drop_rel, at_chance))
    return found


def search(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """The accuracy budget's bisection (:func:`seap.maths.budget.next_probe`). The selection
    rows of the run's own sparsities (``seeds``) are the first points; then, round by round,
    each member not yet settled (a task's expert; ``general``: every task within its budget) is
    built at the grid point the bisection asks for, refitted with the round's other candidates
    in one walk, and scored on the selection items, until every member's sparsity is known to
    within the step. Then every task's expert at the one step nearest the mean of the sizes the
    budget will choose (:func:`~seap.maths.budget.chosen_sparsity`) is built for the comparison
    at equal mean sparsity (``uniform/<task>``; not scored here).

    Every probe is kept in the job's work folder as it finishes, so a killed search resumes at
    the probe it was on. Writes each curve (``search.json``), the results as selection rows
    (``rows.json``), every scored candidate (``masks/<row>/<member>``) and the uniform experts."""
    import dataclasses as dc
    import shutil
    import tempfile

    from seap.io import copy_artifact
    from seap.maths.budget import DECIMALS, chosen_sparsity, nearest_uniform, next_probe
    from seap.maths.mask_formats import load_mask
    from seap.maths.schedules import BEYOND_REACH
    from seap.run.job_params import EvaluationParams, MaskParams, RefitParams
    from seap.run.methods import row_key

    p = job.params
    dense_row = read_json(Path(inputs["dense"]) / ROW_FILE, "selection row")
    budgets = _budgets(p, dense_row, read_json(Path(inputs["dense"]) / ITEMS_FILE, "selection items"))
    rows: dict[str, dict[str, Any]] = {}  # row key -> {"sparsity", "tasks": {task: results}, "correct": per item}
    for seed in (inputs.get("seeds") or {}).values():
        seeded = read_json(Path(seed) / ROW_FILE, "selection row")
        row = rows.setdefault(seeded["method"] + "@" + f"{float(seeded['sparsity']):g}", {
            "sparsity": float(seeded["sparsity"]), "tasks": {}, "correct": {}})
        row["tasks"].update(seeded["tasks"])
        row["correct"].update(_correct(read_json(Path(seed) / ITEMS_FILE, "selection items"), p.metric))
    dense_correct = _correct(read_json(Path(inputs["dense"]) / ITEMS_FILE, "selection items"), p.metric)
    beyond: dict[str, list[float]] = {}
    quiet = dc.replace(ctx, say=lambda _message: None)
    work = ctx.work or Path(tempfile.mkdtemp(prefix="seap-search-"))

    def accuracy(row: Mapping[str, Any], task: str) -> float:  # (what the choice reads, as in :func:`budget`)
        return _held_accuracy(row, task, p, budgets[task][0], dense_correct)

    def curve(member: str) -> dict[float, float]:
        """``member``'s measured points (the general mask: its tightest task's margin over its budget)."""
        method = p.masks[member]["method"]
        found = {}
        for key, row in rows.items():
            if key.partition("@")[0] != method:
                continue
            at = round(float(row["sparsity"]), DECIMALS)
            if member != GENERAL and member in row["tasks"]:
                found[at] = accuracy(row, member)
            elif member == GENERAL and all(t in row["tasks"] for t in p.tasks):
                found[at] = min(accuracy(row, t) - d + a for t, (d, _, a) in budgets.items())
        found.update({round(s, DECIMALS): -1.0 for s in beyond.get(member, [])})  # (never taken)
        return found

    def probe(member: str) -> float | None:
        if member == GENERAL:
            return next_probe(curve(member), 0.0, 0.0, p.ceiling, p.step)
        dense, _, allowed = budgets[member]
        return next_probe(curve(member), dense, allowed, p.ceiling, p.step)

    def build(wanted: Mapping[str, float], name: str) -> dict[str, Path]:
        """Each member of ``wanted`` (member -> sparsity) built and, with a refit, refitted (in one
        walk), as ``work/probes/<row>/<member>/built``; kept from an earlier, killed try."""
        folders = {}
        for member, sparsity in wanted.items():
            row = row_key(p.masks[member]["method"], sparsity)
            folder = folders[member] = work / "probes" / row / member
            if (folder / "built").is_dir() and not (folder / "unrefitted").exists():
                continue  # (built, and refitted, before)
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            params = MaskParams(**{**p.masks[member], "sparsity": sparsity, "row": row})
            masks(Job("masks", f"{row}/{member}", params=params), inputs["members"][member], folder / "built", quiet)
            if BEYOND_REACH in load_mask(folder / "built").meta:
                atomic_write_json(folder / BEYOND_REACH, {"sparsity": sparsity})
            elif p.refit is not None:
                atomic_write_json(folder / "unrefitted", {})
        waiting = {m: f for m, f in folders.items() if (f / "unrefitted").exists()}
        if waiting:  # refitted together: one walk over the model's layers
            walk_out, partial = work / f"walk-{name}", work / f"walk-{name}.partial"
            shutil.rmtree(walk_out, ignore_errors=True)
            walk = Job("refits", "walk", params=RefitParams(refit=p.refit, batch_size=p.batch_size,
                                                           tasks={m: p.refit_tasks.get(m) for m in waiting}))
            refits(walk, {"model": inputs["model"], "refit_corpus": inputs["refit_corpus"],
                          **({"refit_generic": inputs["refit_generic"]} if "refit_generic" in inputs else {}),
                          "masks": {m: f / "built" for m, f in waiting.items()}}, walk_out, dc.replace(quiet, work=partial))
            for member, folder in waiting.items():
                shutil.rmtree(folder / "built")
                (walk_out / member).rename(folder / "built")
                (folder / "unrefitted").unlink()
            shutil.rmtree(walk_out)
            shutil.rmtree(partial, ignore_errors=True)
        return folders

    def score(probes: Mapping[str, float], folders: Mapping[str, Path]) -> None:
        """The built members scored on the selection items (the experts in one row, each on its
        own task; the general mask on every task), each kept as ``row.json`` beside its mask."""
        waiting = {m: f for m, f in folders.items() if not (f / ROW_FILE).is_file() and not (f / BEYOND_REACH).is_file()}
        experts = {m: f for m, f in waiting.items() if m != GENERAL}
        groups = [(experts, list(experts))] if experts else []
        if GENERAL in waiting:
            groups.append(({GENERAL: waiting[GENERAL]}, list(p.tasks)))
        for group, tasks in groups:
            params = EvaluationParams(**{**p.evaluation, "tasks": tasks, "per_task": GENERAL not in group,
                                         "sparsity": 0.0})
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                evaluate(Job("select", "probe", params=params),
                         {"model": inputs["model"], "data": inputs["data"],
                          "masks": {m: f / "built" for m, f in group.items()}}, Path(tmp) / "row", quiet)
                results = read_json(Path(tmp) / "row" / ROW_FILE, "selection row")["tasks"]
                correct = _correct(read_json(Path(tmp) / "row" / ITEMS_FILE, "selection items"), p.metric)
            for member, folder in group.items():
                own = list(results) if member == GENERAL else [member]
                atomic_write_json(folder / ROW_FILE, {"sparsity": probes[member], "tasks": {t: results[t] for t in own},
                                                      "correct": {t: correct[t] for t in own}})

    rounds: list[dict[str, float]] = []
    out.mkdir(parents=True)
    while True:
        probes = {m: s for m in p.masks if (s := probe(m)) is not None}
        if not probes:
            break
        rounds.append(probes)
        ctx.say(f"search round {len(rounds)}: " + ", ".join(f"{m} {s * 100:g}%" for m, s in probes.items()))
        folders = build(probes, f"round-{len(rounds)}")
        score(probes, folders)
        for member, folder in folders.items():
            sparsity = probes[member]
            if (folder / BEYOND_REACH).is_file():
                beyond.setdefault(member, []).append(sparsity)
                continue
            row = row_key(p.masks[member]["method"], sparsity)
            scored = read_json(folder / ROW_FILE, "selection row")
            merged = rows.setdefault(row, {"sparsity": sparsity, "tasks": {}, "correct": {}})
            merged["tasks"].update(scored["tasks"])
            merged["correct"].update(scored["correct"])
            copy_artifact(folder / "built", out / SEARCH_MASKS / row / member)
    # every expert at the one step nearest the mean of the sizes the choice takes
    steps = [round(k * p.step, DECIMALS) for k in range(1, int(p.ceiling / p.step + 1e-9) + 1)]
    chosen = {t: chosen_sparsity(curve(t), budgets[t][0], budgets[t][2]) for t in p.tasks}
    uniform = nearest_uniform(chosen, steps)
    for task, folder in build({t: uniform for t in p.tasks}, "uniform").items():
        copy_artifact(folder / "built", out / SEARCH_UNIFORM / task)
    atomic_write_json(out / SEARCH_FILE, {
        "step": p.step, "ceiling": p.ceiling, "rounds": rounds,
        "curves": {m: {f"{s:g}": a for s, a in sorted(curve(m).items())} for m in p.masks},
        "beyond_reach": {m: sorted(v) for m, v in beyond.items()},
        "uniform": {"sparsity": uniform, "budget_mean": sum(chosen.values()) / len(chosen)}})
    atomic_write_json(out / SEARCH_ROWS, rows)
    if ctx.work is None:
        shutil.rmtree(work, ignore_errors=True)
    ctx.say("search: " + ", ".join(f"{m} {sum(m in r for r in rounds)} probes" for m in p.masks)
            + f" in {len(rounds)} rounds; uniform comparison at {uniform * 100:g}%")


def router(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """The task router, trained on the tasks' training prompts."""
    from seap.evaluation.harness import training_prompts
    from seap.evaluation.router import train_router

    p = job.params
    catalogue = ctx.catalogue(p.data_dir)
    specs = catalogue.resolve(p.tasks)
    loaded = ctx.base(inputs["model"])
    trained = train_router(loaded, training_prompts(catalogue, specs, p.prompts_per_task, p.seed),
                           p.feature_layer, seed=p.seed, threshold=p.threshold)
    trained.save(out)
    ctx.say(f"router: held-out accuracy {trained.meta['heldout_accuracy']:.3f}")


def evaluate_routed(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """The routed row (router + experts + general fallback); documents routed to their own
    task's expert reuse the expert row's per-item results."""
    from seap.evaluation.router import Router
    from seap.evaluation.rows import evaluate_routed as routed_row
    from seap.evaluation.rows import router_info
    from seap.maths.mask_formats import load_mask

    p = job.params
    catalogue = ctx.catalogue(p.data_dir)
    specs = catalogue.resolve(p.tasks)
    experts = _load_masks(inputs["experts"])
    if p.router_kind == "patterns":  # TAER: the nearest stored routing pattern of each prompt's prefix
        from seap.evaluation.routed import PatternRouter

        trained: Any = PatternRouter.from_masks(experts, threshold=p.threshold)
    else:
        trained = Router.load(inputs["router"])
    general = load_mask(inputs["general"]) if inputs.get("general") else None
    fallback = _choose_fallback(inputs, p.metric, experts) if inputs.get("fallbacks") else None
    if fallback is not None:
        general = fallback.pop("mask")
    expert_items = read_json(Path(inputs["expert_row"]) / ITEMS_FILE, "expert row items") \
        if inputs.get("expert_row") else None
    loaded = ctx.base(inputs["model"])
    row, items = routed_row(loaded, catalogue, specs, p.sparsity, experts, general, trained, p.limit,
                            p.num_fewshot, p.batch_size, p.metric, p.threshold, expert_items)
    row["method"] = p.method
    if p.method == BUDGET_ROUTED_ROW:  # (experts of the sizes the budget chose: the row's is their mean)
        row["sparsity"] = row["realised_sparsity"]
    row["model_fingerprint"] = loaded.fingerprint
    row["masks"] = {name: m.digest() for name, m in experts.items()}
    if general is not None:
        row["masks"][GENERAL] = general.digest()
    row["router"] = router_info(trained) if isinstance(trained, Router) else \
        {"kind": "patterns", "tasks": trained.tasks, "prefix_tokens": trained.prefix_tokens, "threshold": p.threshold}
    if fallback is not None:
        row["fallback"] = fallback
    _write_row(out, row, items)
    if general is not None and p.method == BUDGET_ROUTED_ROW:  # (the registry's bundle takes it from here)
        from seap.run.methods import FALLBACK_MASK

        general.save(out / FALLBACK_MASK)
    ctx.say(f"{job.row}: average {row['average']['table'] * 100:.2f} "
            f"({row['reused_documents']} of {row['routing']['docs']} documents reused from the expert row)")


def _choose_fallback(inputs: Inputs, metric: str, experts: Mapping[str, Any]) -> dict[str, Any]:
    """The routed row's fallback chosen on the held-out tasks (:func:`seap.maths.budget.fallback_choice`
    under the budget the experts were sized by): what was measured, the choice and its ``mask``
    (a mask keeping everything when dense is chosen)."""
    from seap.evaluation.metrics import metric_for
    from seap.maths.budget import allowed_drop, fallback_choice
    from seap.maths.mask_formats import BUDGET_META as MASK_META
    from seap.maths.mask_formats import load_mask

    dense_row = read_json(Path(inputs["held_out_dense"]) / ROW_FILE, "held-out dense row")
    tasks = list(dense_row["tasks"])

    def accuracy(row: Mapping[str, Any]) -> dict[str, float]:
        return {t: float(row["tasks"][t][metric_for(t, metric)]) for t in tasks}

    dense = accuracy(dense_row)
    sized_by = next(iter(experts.values())).meta.get(MASK_META) or {}
    allowed = {t: allowed_drop(dense[t], sized_by.get("max_drop"), sized_by.get("max_drop_rel"),
                               dense_row["tasks"][t].get("chance")) for t in tasks}
    measured = {}
    for name, path in inputs["held_out"].items():
        row = read_json(Path(path) / ROW_FILE, "held-out row")
        measured[name] = (accuracy(row), float(row["realised_sparsity"]))
    chosen = fallback_choice(dense, measured, allowed)
    if chosen == "dense":  # (a mask that keeps everything: the dense model as the bank's fallback)
        mask = next(iter(experts.values())).keep_all()
        mask.meta["task"] = GENERAL
    else:
        mask = load_mask(inputs["fallbacks"][chosen])
    return {"chosen": chosen, "held_out_tasks": tasks, "dense": dense, "allowed_drop": allowed,
            "candidates": {n: {"accuracy": a, "realised_sparsity": s} for n, (a, s) in measured.items()}, "mask": mask}


def perplexity(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """WikiText-2 perplexity of the dense model or of one general mask."""
    from seap.evaluation.harness import wikitext_perplexity
    from seap.maths.mask_formats import load_mask
    from seap.model.masking import apply_mask

    p = job.params
    loaded = ctx.base(inputs["model"])
    if inputs.get("mask"):
        loaded = apply_mask(loaded, load_mask(inputs["mask"]), "hard")
    result = wikitext_perplexity(loaded, p.data_dir, max_windows=p.windows, progress=ctx.progress)
    out.mkdir(parents=True)
    atomic_write_json(out / PERPLEXITY_FILE, {"row": p.row, **result})


def bench(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """Dense against every mask's hard-pruned model, in one run on the same prompts. Masks that
    prune to the same per-layer shapes are timed once (``same_shapes_as``)."""
    from seap.evaluation.speed import benchmark
    from seap.model.masking import apply_mask

    loaded = ctx.base(inputs["model"])
    loaded_masks = _load_masks(inputs["masks"])
    representative: dict[tuple[Any, ...], str] = {}
    alias = {name: representative.setdefault(shape_signature(mask), name) for name, mask in loaded_masks.items()}
    models = {"dense": loaded}
    for name in dict.fromkeys(alias.values()):
        models[name] = apply_mask(loaded, loaded_masks[name], "hard")
    result = benchmark(models, repeats=job.params.repeats)
    engine = job.params.llama_cpp
    if engine != "off":
        from seap.evaluation.llama_cpp_runtime import (
            BUILD_COMMAND,
            find_llama_cpp,
            require_llama_cpp,
        )
        from seap.evaluation.speed import llama_cpp_speed

        build = find_llama_cpp() if engine == "auto" else require_llama_cpp(engine)
        if build is None:
            result["llama_cpp"] = {"skipped": f"no llama.cpp build found: `{BUILD_COMMAND}` builds one"}
        else:
            try:
                result["llama_cpp"] = llama_cpp_speed(models, build, repetitions=job.params.repeats)
            except SeapError as exc:  # a model llama.cpp cannot run (its family, its tokenizer): said, not fatal
                if engine != "auto":
                    raise
                result["llama_cpp"] = {"skipped": f"not exportable to GGUF: {exc.problem}"}
    for name, rep in alias.items():
        if name != rep:
            result["models"][name] = {**result["models"][rep], "same_shapes_as": rep}
            if "models" in result.get("llama_cpp", {}):
                result["llama_cpp"]["models"][name] = {**result["llama_cpp"]["models"][rep], "same_shapes_as": rep}
    out.mkdir(parents=True)
    atomic_write_json(out / BENCH_FILE, result)
    ctx.say(f"speed of dense and {len(models) - 1} distinct pruned shapes ({len(loaded_masks)} masks)")


def candidate_speed(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """The prefill (and decode) speed-up over dense of every distinct shape among the search's
    candidates, each timed against dense side by side on the same prompts; one pruned model
    is held at a time (a grid of fifteen sparsities would not fit beside each other)."""
    import tempfile

    from seap.evaluation.speed import benchmark, llama_cpp_speed_of_files
    from seap.model.masking import apply_mask

    p = job.params
    loaded = ctx.base(inputs["model"])
    representative: dict[tuple[Any, ...], str] = {}
    alias: dict[str, str] = {}  # each candidate -> the first of its shape (timed once)
    timed: dict[str, Any] = {}
    masks_in = inputs["masks"]
    in_llama_cpp = p.engine == "llama.cpp"
    setup: dict[str, Any] = {"runtime": p.engine}
    with tempfile.TemporaryDirectory(prefix="seap-candidates-gguf-") as tmp:
        files = {}
        if in_llama_cpp:  # every distinct shape exported to GGUF, then timed in one llama-bench run
            from seap.evaluation.llama_cpp_runtime import require_llama_cpp
            from seap.export.to_gguf import export_gguf

            build = require_llama_cpp(None if p.llama_cpp in ("auto", "off") else p.llama_cpp)
            files["dense"] = export_gguf(loaded, Path(tmp) / "dense.gguf")
        for name in masks_in:
            mask = _load_masks({name: masks_in[name]})[name]
            rep = alias[name] = representative.setdefault(shape_signature(mask), name)
            if rep != name:
                continue
            pruned = apply_mask(loaded, mask, "hard")  # (one pruned model held at a time)
            if in_llama_cpp:
                files[name] = export_gguf(pruned, Path(tmp) / f"candidate-{len(files)}.gguf")
                timed[name] = {"realised_sparsity": mask.realised_sparsity()}
            else:
                measured = benchmark({"dense": loaded, name: pruned}, repeats=p.repeats)["models"][name]
                timed[name] = {k: measured[k] for k in ("prefill_speedup", "decode_speedup", "realised_sparsity")
                               if k in measured}
            del pruned
        if in_llama_cpp:
            measured = llama_cpp_speed_of_files(files, build, repetitions=p.repeats)
            setup = {**setup, **measured["setup"]}
            for name, m in measured["models"].items():
                if name != "dense":
                    timed[name].update(prefill_speedup=m["prefill_speedup"], decode_speedup=m["decode_speedup"])
    timed = {name: timed[rep] if rep == name else {**timed[rep], "same_shapes_as": rep} for name, rep in alias.items()}
    out.mkdir(parents=True)
    atomic_write_json(out / BENCH_FILE, {"models": timed, "setup": setup})
    ctx.say(f"candidate speed ({p.engine}): {len(set(representative.values()))} distinct shapes of "
            f"{len(timed)} candidates")


def shape_signature(mask: Any) -> tuple[tuple[int, int, int], ...]:
    """Per-layer kept (heads, kv heads, channels), or per MoE layer the experts kept: masks with
    equal signatures run at the same speed."""
    if hasattr(mask, "kept_signature"):
        return mask.kept_signature()  # type: ignore[no-any-return]
    return tuple((g.num_heads, g.num_kv_heads, g.intermediate_size) for g in mask.kept_geometry().layers)


def report(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """Assemble the rows into the results (Table 1, results.json, metrics.json, CSV, plot)."""
    from seap.evaluation.harness import data_fingerprint, lm_eval_version
    from seap.evaluation.report import save_results
    from seap.evaluation.router import Router
    from seap.evaluation.rows import router_info

    p = job.params
    specs = ctx.catalogue(p.data_dir).resolve(p.tasks)
    rows = [read_json(Path(path) / ROW_FILE, "result row") for path in inputs["rows"].values()]
    results: dict[str, Any] = {
        "config": dict(p.config or {}),
        "model_fingerprint": next((r.get("model_fingerprint") for r in rows if r.get("model_fingerprint")), None),
        "lm_eval_version": lm_eval_version(),
        "data_fingerprint": data_fingerprint(specs, p.limit, p.num_fewshot),
        "limit": p.limit,
        "num_fewshot": p.num_fewshot,
        "tasks": [s.describe() for s in specs],
        "metric": p.metric,
        "rows": rows,
        "router": router_info(Router.load(inputs["router"])) if inputs.get("router") else None,
    }
    if inputs.get("bench"):
        results["speed"] = read_json(Path(inputs["bench"]) / BENCH_FILE, "speed benchmark")
    if inputs.get("perplexity"):
        ppl = [read_json(Path(path) / PERPLEXITY_FILE, "perplexity") for path in inputs["perplexity"]]
        results["perplexity"] = {entry.pop("row"): entry for entry in ppl}
    if inputs.get("budget"):
        results["budget"] = read_json(Path(inputs["budget"]) / BUDGET_FILE, "accuracy budget")
        if BUDGET_ROW in inputs["rows"] and BUDGET_UNIFORM_ROW in inputs["rows"]:
            results["budget"]["versus_uniform"] = _paired(inputs["rows"][BUDGET_ROW],
                                                          inputs["rows"][BUDGET_UNIFORM_ROW], p.metric)
    out.mkdir(parents=True)
    save_results(results, out)
    if inputs.get("budget"):
        import shutil

        shutil.copy2(Path(inputs["budget"]) / BUDGET_PLOT, out / BUDGET_PLOT)  # (out is this job's own, new folder)


def _paired(a: str | Path, b: str | Path, metric: str) -> dict[str, Any]:
    """Row ``a`` minus row ``b`` on the same reported items (:func:`~seap.evaluation.significance.paired_difference`:
    the mean difference over tasks in points, its 95% paired-bootstrap interval, McNemar's p), with
    both rows' realised sparsities."""
    from seap.evaluation.metrics import metric_for
    from seap.evaluation.significance import correctness, paired_difference

    rows = [read_json(Path(x) / ROW_FILE, "result row") for x in (a, b)]
    right = [correctness(items, {t: metric_for(t, metric) for t in items})
             for items in (read_json(Path(x) / ITEMS_FILE, "result items") for x in (a, b))]
    diff = paired_difference(right[0], right[1])
    return {"rows": [r["method"] for r in rows], "realised_sparsity": [r["realised_sparsity"] for r in rows],
            "sparsity": [r["sparsity"] for r in rows],
            **{k: v * 100 if k in ("difference", "low", "high") else v for k, v in diff.items()}}


def register(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """Every SEAP expert, general mask and routed bundle in the local registry folder, then (when
    enabled) one MLflow run with the results and one model version per record. Idempotent: a
    record registered before is kept as it is."""
    from seap.registry.records import (
        expert_records,
        read_local_record,
        register_locally,
    )

    p = job.params
    report_dir = Path(inputs["report"])
    results = read_json(report_dir / "results.json", "results file")
    groups = {row: {name: str(path) for name, path in group.items()} for row, group in inputs["masks"].items()}
    router_dir = str(inputs["router"]) if inputs.get("router") else None
    records = expert_records(results, groups, router_dir, p.score, p.schedule)
    written = register_locally(records, p.registry_dir)
    registered = [{"name": r.name, "version": w.name, "path": str(w), "tags": r.tags} for r, w in zip(records, written)]
    ctx.say(f"registered {len(registered)} expert versions in {p.registry_dir}")
    tracked = None
    if p.mlflow:
        from seap.registry.mlflow_code import mlflow_registry

        tracked = mlflow_registry().register_results(
            report_dir, [read_local_record(r["path"]) for r in registered], tracking_uri=p.tracking_uri,
            local_dir=p.mlflow_dir, experiment=p.experiment, params=p.run_params,
            tags=p.run_tags, progress=False)
        created = sum(v["created"] for v in tracked["versions"])
        ctx.say(f"MLflow run {tracked['run_id']} ({tracked['tracking_uri']}): {len(tracked['versions'])} versions, "
                f"{created} new")
    out.mkdir(parents=True)
    atomic_write_json(out / REGISTERED_FILE, {"registered": registered, "mlflow": tracked})


STAGE_FUNCTIONS: dict[str, StageFunction] = {
    "model": model,
    "corpus": corpus,
    "statistics": statistics,
    "scores": scores,
    "masks": masks,
    "refits": refits,
    "evaluate-dense": evaluate,
    "evaluate": evaluate,
    "select": evaluate,
    "search": search,
    "budget": budget,
    "selection": selection,
    "router": router,
    "evaluate-routed": evaluate_routed,
    "perplexity": perplexity,
    "bench": bench,
    "candidate-speed": candidate_speed,
    "report": report,
    "register": register,
    "checkpoint": checkpoint,
}


def run_job(job: Job, inputs: Inputs, out: Path, ctx: StageContext) -> None:
    """Run ``job`` into ``out`` (a folder that does not exist yet)."""
    try:
        function = STAGE_FUNCTIONS[job.stage]
    except KeyError:
        raise SeapError(f"no function for stage {job.stage!r}", "add it to seap.run.stages.STAGE_FUNCTIONS") from None
    function(job, inputs, out, ctx)


__all__ = ["STAGE_FUNCTIONS", "StageContext", "run_job", "shape_signature", "verify_model_record"]
