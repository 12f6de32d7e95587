"""The ``seap`` command line: a table of commands, each a parser builder and a handler.

Nothing heavy is imported until a handler runs, so ``seap --help`` and ``seap CMD --help``
answer at once (torch alone takes seconds to import). Errors a user can fix are printed as
``seap CMD: error: <problem>`` and ``fix: <what to do>`` with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from seap.errors import SeapError
from seap.run.config import DEFAULT_MODEL

SCORE_NAMES = ("seap-sf", "seap-sw-paper", "seap-sw-code", "wanda-sp", "flap")  # checked against seap.maths.scores
SCHEDULE_NAMES = ("logistic", "uniform", "flap-adaptive")  # checked against seap.maths.schedules


@dataclass(frozen=True)
class Command:
    """One ``seap`` subcommand: its group in the help, a one-line summary, and its two halves."""

    name: str
    group: str
    summary: str
    arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


# -- shared arguments ---------------------------------------------------------------------


def _positive(text: str) -> int:
    """A whole number of at least 1 (counts, sizes, caps): checked when the command line is read."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if not (count >= 1 and 0 <= index < count):
        raise argparse.ArgumentTypeError(f"shard {text!r}: shards are numbered 0..N-1, e.g. 0/4")
    return index, count


def _model(p: argparse.ArgumentParser, required: bool = True, default: str | None = DEFAULT_MODEL,
           purpose: str = "") -> None:
    """``--model`` (required, or ``default`` when not) with ``--device`` and ``--dtype``."""
    p.add_argument("--model", required=required, default=None if required else default,
                   help=f"{purpose}hub id (org/name), local HF folder, .gguf file, or alias smollm2-135m")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")


def _schedule(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparsity", type=float, required=True, help="target fraction of prunable weights to remove, in [0, 1)")
    p.add_argument("--gqa-mode", default="kv-groups", choices=("kv-groups", "query-heads"),
                   help="GQA pruning unit: whole key/value groups (default) or the same number of query heads per group")
    p.add_argument("--k", type=float, default=None, help="logistic steepness (default 1.0)")
    p.add_argument("--x0", type=float, default=None, help="logistic inflection point in [0, 1] (default 0.3)")
    p.add_argument("--protect-first", type=int, default=None, help="logistic: first layers kept dense (default 2)")
    p.add_argument("--protect-last", type=int, default=None, help="logistic: last layers kept dense (default 2)")
    p.add_argument("--channel-multiple", type=_positive, default=None,
                   help="every pruned layer keeps a multiple of this many MLP channels, for fast kernels "
                        "(default 64; 1: any width)")
    p.add_argument("--same-width", action="store_true",
                   help="every layer keeps the same widths (uniform allocation), so that stock transformers "
                        "loads the pruned model (`seap export --format hf`)")


def _schedule_options(args: argparse.Namespace) -> dict[str, Any]:
    opts = {"k": args.k, "x0": args.x0, "protect_first": args.protect_first, "protect_last": args.protect_last,
            "channel_multiple": args.channel_multiple, "same_width": args.same_width or None}
    return {k: v for k, v in opts.items() if v is not None}


def _refit(p: argparse.ArgumentParser) -> None:
    """``--reconstruct`` / ``--no-reconstruct`` and the refit options, as the run configuration defines them."""
    from seap.run.config import add_arguments

    add_arguments(p, only=("reconstruct", "refit_alpha", "refit_prior", "refit_bias", "refit_sequential"))


def _reconstruct(args: argparse.Namespace) -> bool | None:
    """``--reconstruct`` (True), ``--no-reconstruct`` (False) or neither (None: the default)."""
    from seap.run.config import given_arguments

    return given_arguments(args).get("reconstruct")


def _refit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The refit options given (left out: :class:`RefitOptions` defaults)."""
    from seap.run.config import given_arguments

    given = given_arguments(args)
    opts = {"alpha": given.get("refit_alpha"), "prior": given.get("refit_prior"), "bias": given.get("refit_bias"),
            "sequential": given.get("refit_sequential")}
    return {k: v for k, v in opts.items() if v is not None}


def _tasks(p: argparse.ArgumentParser) -> None:
    from seap.run.config import DEFAULT_TASKS

    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS),
                   help="task names, optionally with a source prefix (hub:, local:, jsonl:, starter:); "
                        "default: the built-in starter suite")
    p.add_argument("--data-dir", default=None, help="folder of local tasks (e.g. ../shared/benchmarks)")


def _tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite in --mlflow-dir)")
    p.add_argument("--mlflow-dir", default="runs/mlflow", help="local MLflow store when no URI is set")


def _progress(args: argparse.Namespace) -> bool:
    return not (args.no_progress or os.environ.get("CI"))  # no bars in CI logs


def _load(args: argparse.Namespace) -> Any:
    from seap.model.loading import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


def _check_out(args: argparse.Namespace, *inputs: Any, file: bool = False,
               recognise: Callable[[Path], str | None] | None = None) -> None:
    """Everything about ``--out`` and ``--device`` that can be checked before a model is loaded."""
    from seap.io import check_output
    from seap.model.loaded import resolve_device

    if getattr(args, "device", None) is not None:
        resolve_device(args.device)
    check_output(args.out, [i for i in inputs if isinstance(i, str)], getattr(args, "overwrite", False), file=file,
                 recognise=recognise)


# -- one artifact at a time ---------------------------------------------------------------


def _corpus_args(p: argparse.ArgumentParser) -> None:
    from seap.data.corpus import DEFAULT_MAX_TOKENS, DEFAULT_SAMPLES_PER_TASK, DEFAULT_SEED

    p.add_argument("--records", required=True, help="JSON/JSONL task records, or 'builtin' for the starter suite")
    p.add_argument("--task", action="append", dest="tasks", help="task(s) to keep (default: all in the records)")
    p.add_argument("--samples", type=_positive, default=DEFAULT_SAMPLES_PER_TASK, help="records sampled per task")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--max-tokens", type=_positive, default=DEFAULT_MAX_TOKENS, help="token cap per text, used by `stats`")
    p.add_argument("--out", required=True, help="corpus JSONL file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing corpus file (never the records)")


def _corpus(args: argparse.Namespace) -> int:
    from seap.run.commands import make_corpus

    corpora = make_corpus(args.records, args.out, args.tasks, args.samples, args.seed, args.max_tokens,
                          args.overwrite)
    for task, corpus in corpora.items():
        print(f"{task}: {len(corpus)} texts  {corpus.digest()[:19]}")
    print(f"wrote {args.out}")
    return 0


def _stats_args(p: argparse.ArgumentParser) -> None:
    _model(p)
    p.add_argument("--corpus", required=True, help="corpus JSONL (from `seap corpus`)")
    p.add_argument("--task", action="append", dest="tasks")
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--max-tokens", type=_positive, default=None, help="token cap (default: the corpus's)")
    p.add_argument("--shard", type=_shard, default=None, help="process shard I of N (I/N), merge with merge-stats")
    p.add_argument("--accumulate-dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--second-moments", action="store_true",
                   help="also the second-moment matrices of o_proj/down_proj inputs (what `masks --reconstruct` "
                        "needs; about 2 x (hidden^2 + intermediate^2) x 8 bytes per layer on disk)")
    p.add_argument("--out", required=True, help="folder; one sub-folder per task")
    p.add_argument("--overwrite", action="store_true")


def _stats(args: argparse.Namespace) -> int:
    from seap.run.commands import make_statistics

    _check_out(args, args.model, args.corpus)
    written = make_statistics(_load(args), args.corpus, args.out, args.tasks, args.batch_size, args.max_tokens,
                              args.shard, args.accumulate_dtype, args.overwrite, _progress(args),
                              second_moments=args.second_moments)
    for task, path in written.items():
        print(f"{task}: {path}")
    return 0


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+")
    p.add_argument("--task", default=None, help="name of the merged task (needed if the inputs differ)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")


def _merge(args: argparse.Namespace) -> int:
    from seap.run.commands import merge_statistics_folders

    print(merge_statistics_folders(args.inputs, args.out, args.task, args.overwrite))
    return 0


def _scores_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stats", required=True, help="statistics folder of one task")
    p.add_argument("--score", default=SCORE_NAMES[0], choices=SCORE_NAMES, help="default: seap-sf")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")


def _scores(args: argparse.Namespace) -> int:
    from seap.run.commands import make_scores

    print(make_scores(args.stats, args.out, args.score, args.overwrite))
    return 0


def _masks_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scores", nargs="+", required=True, help="scores folder(s)")
    p.add_argument("--schedule", default="logistic", choices=SCHEDULE_NAMES)
    _schedule(p)
    p.add_argument("--general", action="store_true", help="combine the tasks' scores into the general mask")
    p.add_argument("--weight", action="append", help="general-mask weight TASK=W (default: wikitext 3, others 2)")
    p.add_argument("--bias-compensation-stats", default=None,
                   help="statistics folder whose means the mask stores, so applying it adds FLAP's bias compensation")
    _refit(p)
    p.add_argument("--refit-stats", nargs="+", default=None,
                   help="statistics with second moments to refit on (`seap stats --second-moments`; an expert's "
                        "own task, or the tasks merged); several folders are merged (e.g. the task's and generic "
                        "text's). Given, the mask is refitted (the default) unless --no-reconstruct")
    p.add_argument("--refit-corpus", nargs="+", default=None,
                   help="with --reconstruct --refit-sequential: corpus files (`seap corpus`) to refit on, the "
                        "first one's --refit-task texts (default: all) and every text of the others")
    p.add_argument("--refit-task", nargs="+", default=None, help="tasks of the first --refit-corpus file to refit on")
    _model(p, required=False, default=None, purpose="with --reconstruct: the base the statistics came from; ")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")


def _masks(args: argparse.Namespace) -> int:
    from seap.run.commands import make_mask, parse_weights

    refit: dict[str, Any] = {}
    _check_out(args, *args.scores, args.bias_compensation_stats, *(args.refit_stats or []), *(args.refit_corpus or []),
               args.model)
    # reconstruction is the default where there is something to refit on (--refit-stats or
    # --refit-corpus); --reconstruct without it is an error, --no-reconstruct builds a plain mask
    reconstruct = _reconstruct(args)
    if reconstruct is True or (reconstruct is None and (args.refit_stats or args.refit_corpus)):
        options = _refit_options(args)
        if options.get("sequential"):
            if not args.refit_corpus or not args.model or args.refit_stats:
                raise SeapError("--refit-sequential refits on calibration text, not statistics",
                                "pass --model (the base) and --refit-corpus FILE (from `seap corpus`)")
            from seap.run.commands import read_refit_corpus

            corpus, cap = read_refit_corpus(args.refit_corpus, args.refit_task)
            refit = {"refit_corpus": corpus, "refit_max_tokens": cap}
        elif not args.refit_stats or not args.model:
            raise SeapError("--reconstruct needs the base model and the statistics to refit on",
                            "pass --model (the base) and --refit-stats DIR (from `seap stats --second-moments`)")
        else:
            refit = {"refit_stats_dir": args.refit_stats}
        refit.update(refit_model=_load(args), refit_options=options)
    mask = make_mask(args.scores, args.out, args.sparsity, args.schedule, args.general, parse_weights(args.weight),
                     args.gqa_mode, args.bias_compensation_stats, args.overwrite, **refit, **_schedule_options(args))
    done = " (reconstructed)" if mask.is_reconstructed else ""
    print(f"{mask.meta['kind']} mask '{mask.task}'{done}: target {mask.meta['target_sparsity']:.4f}, "
          f"realised {mask.meta['realised_sparsity']:.4f} -> {args.out}")
    return 0


def _apply_args(p: argparse.ArgumentParser) -> None:
    _model(p)
    p.add_argument("--mask", required=True)
    p.add_argument("--mode", default="hard", choices=("hard", "soft"))
    bias = p.add_mutually_exclusive_group()
    bias.add_argument("--bias-compensation", dest="bias_compensation", action="store_true", default=None,
                      help="fold removed channels' means into biases (default: as the mask says)")
    bias.add_argument("--no-bias-compensation", dest="bias_compensation", action="store_false")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")


def _apply(args: argparse.Namespace) -> int:
    from seap.maths.expert_selection import load_mask
    from seap.model.checkpoint import save_pruned
    from seap.model.surgery import apply_mask

    _check_out(args, args.model, args.mask)
    mask = load_mask(args.mask)
    if args.mode == "soft" and not hasattr(mask, "kept_geometry"):  # an expert mask of an MoE model
        raise SeapError("soft expert pruning keeps every expert and changes only the routing, which a saved "
                        "checkpoint cannot carry", "apply expert masks with --mode hard")
    loaded = _load(args)
    pruned = apply_mask(loaded, mask, args.mode, bias_compensation=args.bias_compensation, inplace=True)
    if args.mode == "hard":
        save_pruned(pruned, args.out, mask, overwrite=args.overwrite)
    else:
        from seap.io import atomic_directory

        with atomic_directory(args.out, overwrite=args.overwrite, inputs=[args.model, args.mask]) as tmp:
            pruned.model.save_pretrained(tmp)
            pruned.tokenizer.save_pretrained(tmp)
    print(f"{args.mode}-pruned with '{mask.task}' (realised sparsity {mask.realised_sparsity():.4f}) -> {args.out}")
    return 0


def _prune_args(p: argparse.ArgumentParser) -> None:
    from seap.data.corpus import DEFAULT_MAX_TOKENS, DEFAULT_SAMPLES_PER_TASK, DEFAULT_SEED
    from seap.run.methods import METHODS

    _model(p)
    p.add_argument("--calib", required=True, help="JSON/JSONL task records (or texts), or 'builtin'")
    p.add_argument("--task", action="append", dest="tasks", help="prune for this task only (an expert mask)")
    p.add_argument("--method", default="seap", choices=("seap", *(n for n, m in METHODS.items() if m.builds_masks)),
                   help="seap (the expert of one task, or the general mask of several), or a baseline of the "
                        "method table (wanda-sp, flap and their +logistic variants)")
    p.add_argument("--score", default=None, choices=SCORE_NAMES, help="override the method's score")
    p.add_argument("--schedule", default=None, choices=SCHEDULE_NAMES, help="override the method's schedule")
    bias = p.add_mutually_exclusive_group()
    bias.add_argument("--bias-compensation", dest="bias_compensation", action="store_true", default=None)
    bias.add_argument("--no-bias-compensation", dest="bias_compensation", action="store_false")
    _refit(p)
    _schedule(p)
    p.add_argument("--samples", type=_positive, default=DEFAULT_SAMPLES_PER_TASK, help="calibration records per task")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--max-tokens", type=_positive, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--weight", action="append", help="general-mask weight TASK=W")
    p.add_argument("--out", required=True, help="folder for the pruned model")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _prune(args: argparse.Namespace) -> int:
    from seap.run.commands import parse_weights, prune

    result = prune(
        args.model, args.calib, args.sparsity, args.out, method=args.method, score=args.score,
        schedule=args.schedule, bias_compensation=args.bias_compensation, gqa_mode=args.gqa_mode,
        tasks=args.tasks, samples=args.samples, seed=args.seed, max_tokens=args.max_tokens,
        batch_size=args.batch_size, weights=parse_weights(args.weight), overwrite=args.overwrite,
        progress=_progress(args), device=args.device, dtype=args.dtype,
        reconstruct=_reconstruct(args), refit_options=_refit_options(args),
        **_schedule_options(args),
    )
    if args.json:
        print(json.dumps({"out": str(result.out_dir), "target_sparsity": result.target_sparsity,
                          "realised_sparsity": result.realised_sparsity, "tasks": result.tasks,
                          "dense_params": result.dense_params, "pruned_params": result.pruned_params,
                          "timings": result.timings}, indent=2))
    else:
        print("\n".join(result.summary_lines()))
        print(f"load it with: seap.load_pruned({str(result.out_dir)!r})")
    return 0


# -- the plan -----------------------------------------------------------------------------


def _run_args(p: argparse.ArgumentParser) -> None:
    from seap.run.config import add_arguments

    add_arguments(p)
    p.add_argument("--verbose", action="store_true", help="show library output instead of the log file")


def _config(args: argparse.Namespace) -> Any:
    from seap.run.config import RunConfig

    return RunConfig.from_cli(args).validate()


def _eval(args: argparse.Namespace) -> int:
    from seap.run.execute import execute
    from seap.run.plan import make_plan
    from seap.run.progress import RunView, run_with_view
    from seap.run.stages import StageContext

    config = _config(args)
    views: list[RunView] = []

    def run() -> Any:
        from pathlib import Path

        plan = make_plan(config)
        execute(plan, StageContext(Path(config.workdir) / "task-files", progress=False),
                on_event=lambda e: [v(e) for v in views])  # publishes the results to --out after the report

    def summary(_: Any) -> list[str]:
        from pathlib import Path

        from seap.evaluation.report import RESULT_FILES, table1

        out = Path(config.out)
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        return ["", table1(results).rstrip(), "", *(f"{name}: {out / name}" for name in RESULT_FILES)]

    return run_with_view(config, run, summary, "eval", verbose=args.verbose, views=views)


def _study_args(p: argparse.ArgumentParser) -> None:
    from seap.run.study import DEFAULT_GENERIC, DEFAULT_REFIT_ALPHAS, StudyOptions

    d = StudyOptions()
    p.add_argument("--model", default=d.model, help=f"base model (default: {d.model})")
    p.add_argument("--data-dir", default=d.data_dir, help="folder with piqa/ and wikitext/ (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=list(d.tasks), help="default: the starter suite and piqa")
    p.add_argument("--sparsities", nargs="+", type=float, default=list(d.sparsities))
    p.add_argument("--limit", type=int, default=d.limit, help="evaluation items per task (default: all)")
    p.add_argument("--samples", type=_positive, default=d.samples, help="calibration records per task")
    p.add_argument("--calibration-sizes", nargs="+", type=int, default=list(d.calibration_sizes))
    p.add_argument("--selection-items", type=int, default=d.selection_items,
                   help="held-out train items per task that choose the refit settings")
    p.add_argument("--kl-texts", type=int, default=d.kl_texts, help="held-out texts per task for the KL divergence")
    p.add_argument("--refit-alphas", nargs="+", type=float, default=list(DEFAULT_REFIT_ALPHAS),
                   help="regularisation strengths the selection tries (each with the refit's other defaults; "
                        "bias, corpus, prior and generic text are varied one at a time at alpha 0.01; "
                        "default: %(default)s)")
    p.add_argument("--sequential", action="store_true",
                   help="also try the layer-sequential refit (about 40x the refit time per mask on a CPU)")
    p.add_argument("--generic", nargs="*", default=list(DEFAULT_GENERIC),
                   help="tasks of --data-dir whose train text one selection candidate adds to every refit corpus "
                        "(default: %(default)s; none: --generic with no task)")
    p.add_argument("--perplexity-windows", type=int, default=d.perplexity_windows,
                   help="WikiText-2 windows of 512 tokens per general mask")
    p.add_argument("--workdir", default=d.workdir, help="shared, content-addressed work folder (a re-run resumes)")
    p.add_argument("--out", default=d.out, help="writes OUT/results/study.{json,md} and study-retention.png")
    p.add_argument("--ledger", default=None,
                   help="folder of finished runs, reused on any machine (default: OUT/results/study-runs)")
    p.add_argument("--fresh", action="store_true", help="measure every run again, replacing the ledger's entries")
    p.add_argument("--channel-multiple", type=_positive, default=d.channel_multiple,
                   help="kept MLP channels per layer, a multiple of this (default %(default)s: free widths, as the "
                        "study's first runs; 64 is the product's default)")


def _study(args: argparse.Namespace) -> int:
    import time
    import traceback
    from pathlib import Path

    from seap.run.progress import quiet_libraries
    from seap.run.study import JOB_EVENTS, StudyOptions, refit_candidates, run_study

    options = StudyOptions(model=args.model, data_dir=args.data_dir, tasks=tuple(args.tasks),
                           sparsities=tuple(args.sparsities), limit=args.limit, samples=args.samples,
                           calibration_sizes=tuple(args.calibration_sizes), selection_items=args.selection_items,
                           kl_texts=args.kl_texts, workdir=args.workdir, out=args.out,
                           perplexity_windows=args.perplexity_windows, ledger=args.ledger, fresh=args.fresh,
                           channel_multiple=args.channel_multiple,
                           candidates=refit_candidates(args.refit_alphas, args.generic, args.sequential))
    options.config().validate()  # every option checked before any work
    out = sys.stdout
    log = Path(args.workdir).parent / "logs" / f"study-{time.strftime('%Y%m%d-%H%M%S')}.log"

    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    def on_event(event: Any) -> None:
        if event.state == "done":  # (cached jobs stay quiet)
            say(f"  {event.job.key:<60} {event.seconds:8.1f} s")

    say(f"study: {options.model}, tasks {' '.join(options.tasks)}; library output -> {log}")
    JOB_EVENTS.append(on_event)
    try:
        with quiet_libraries(log):
            try:
                record = run_study(options, say)
            except BaseException:
                traceback.print_exc(file=sys.stderr)  # into the log
                raise
    finally:
        JOB_EVENTS.remove(on_event)
    say(f"study done in {record['seconds'] / 60:.0f} min: {Path(args.out) / 'results' / 'study.md'}")
    return 0


def _plan_args(p: argparse.ArgumentParser) -> None:
    _run_args(p)
    p.add_argument("--json", action="store_true", help="print the jobs as JSON")


def _plan(args: argparse.Namespace) -> int:
    from seap.run.plan import make_plan

    plan = make_plan(_config(args))
    if args.json:
        print(json.dumps([j.to_dict() for j in plan.jobs], indent=2, default=str))
        return 0
    for stage in plan.stages:
        jobs = plan.of_stage(stage)
        print(f"{stage} ({len(jobs)}): " + ", ".join(j.name or stage for j in jobs))
    print(f"{len(plan)} jobs, {len(plan.rows)} rows: {', '.join(plan.rows)}")
    return 0


def _stage_args(p: argparse.ArgumentParser) -> None:
    from seap.run.plan import STAGES

    p.add_argument("name", choices=list(STAGES), help="the stage, as named in dvc.yaml")
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    p.add_argument("--root", default=".", help="project root the stage paths are relative to (default: .)")


def _stage(args: argparse.Namespace) -> int:
    from seap.run.dvc import run_stage

    run_stage(args.name, args.params, args.root, progress=_progress(args))
    return 0


# -- evaluation tools ---------------------------------------------------------------------


def _bench_args(p: argparse.ArgumentParser) -> None:
    _model(p)
    p.add_argument("--pruned", nargs="*", default=[], help="pruned model folders")
    p.add_argument("--mask", nargs="*", default=[], help="masks applied (hard, as each mask says) to --model")
    p.add_argument("--prefill-batch", type=int, default=None, help="prompts per prefill batch (default 4)")
    p.add_argument("--prefill-tokens", type=int, default=None, help="tokens per prompt (default 128)")
    p.add_argument("--decode-tokens", type=int, default=None, help="greedy tokens generated (default 32)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 5)")
    p.add_argument("--llama-cpp", nargs="?", const="auto", default=None, metavar="BUILD",
                   help="also time every model in llama.cpp (float16 GGUF, llama-bench): the build of "
                        "scripts/build_llama_cpp.sh (found by itself), or the folder of another such build")
    p.add_argument("--out", required=True, help="JSON file to write")


def _bench(args: argparse.Namespace) -> int:
    from seap.evaluation.speed import benchmark
    from seap.io import atomic_write_json
    from seap.maths.expert_selection import load_mask
    from seap.model.checkpoint import load_pruned
    from seap.model.surgery import apply_mask

    build = None
    if args.llama_cpp:  # (before any model is loaded)
        from seap.evaluation.llama_cpp_runtime import require_llama_cpp

        build = require_llama_cpp(None if args.llama_cpp == "auto" else args.llama_cpp)
    dense = _load(args)
    models = {"dense": dense}
    for path in args.pruned:
        models[f"pruned:{path}"] = load_pruned(path, device=args.device, dtype=args.dtype)
    for path in args.mask:
        models[f"mask:{path}"] = apply_mask(dense, load_mask(path), "hard")
    if len(models) < 2:
        raise SeapError("nothing to compare with the dense model", "pass --pruned DIR or --mask DIR")
    sizes = {"prefill_batch_size": args.prefill_batch, "prefill_tokens": args.prefill_tokens,
             "decode_tokens": args.decode_tokens, "repeats": args.repeats}
    result = benchmark(models, **{k: v for k, v in sizes.items() if v is not None})
    if build is not None:
        from seap.evaluation.speed import llama_cpp_speed

        result["llama_cpp"] = llama_cpp_speed(models, build, args.prefill_tokens or 128, args.decode_tokens or 32,
                                              args.repeats or 5)
    atomic_write_json(args.out, result)
    for name, m in result["models"].items():
        line = (f"{name}: realised {m['realised_sparsity']:.3f}  PyTorch prefill {m['prefill_tokens_per_s']:.0f} tok/s "
                f"(x{m['prefill_speedup']:.2f})  decode {m['decode_tokens_per_s']:.1f} tok/s (x{m['decode_speedup']:.2f})")
        if build is not None:
            c = result["llama_cpp"]["models"][name]
            line += (f"  llama.cpp prefill {c['prefill_tokens_per_s']:.0f} (x{c['prefill_speedup']:.2f})  "
                     f"decode {c['decode_tokens_per_s']:.1f} (x{c['decode_speedup']:.2f})")
        print(line)
    print(f"wrote {args.out}")
    return 0


def _router_args(p: argparse.ArgumentParser) -> None:
    _model(p)
    _tasks(p)
    p.add_argument("--prompts", type=_positive, default=500, help="training prompts per task (balanced to the smallest)")
    p.add_argument("--layer", type=int, default=0, help="0: input embeddings; k: hidden state after layer k")
    p.add_argument("--threshold", type=float, default=0.5, help="below this confidence, use the general mask")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")


def _router(args: argparse.Namespace) -> int:
    from seap.data.catalogue import TaskCatalogue
    from seap.evaluation.harness import training_prompts
    from seap.evaluation.router import train_router

    _check_out(args, args.model, args.data_dir)
    catalogue = TaskCatalogue(args.data_dir)
    specs = catalogue.resolve(args.tasks)
    loaded = _load(args)
    router = train_router(loaded, training_prompts(catalogue, specs, args.prompts, args.seed), args.layer,
                          seed=args.seed, threshold=args.threshold)
    router.save(args.out, overwrite=args.overwrite)
    print(f"held-out accuracy {router.meta['heldout_accuracy']:.3f} on {router.meta['n_heldout']} prompts")
    for task, acc in router.meta["heldout_accuracy_per_task"].items():
        print(f"  {task}: {acc:.3f}")
    print(f"wrote {args.out}")
    return 0


def _route_args(p: argparse.ArgumentParser) -> None:
    _model(p)
    p.add_argument("--router", required=True)
    p.add_argument("--experts", nargs="+", required=True, help="expert mask folders (one per router task)")
    p.add_argument("--general", default=None, help="general mask folder (the low-confidence fallback)")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--max-new-tokens", type=_positive, default=32)


def _route(args: argparse.Namespace) -> int:
    from seap.evaluation.routed import ExpertBank, RoutedModel
    from seap.evaluation.router import Router
    from seap.maths.expert_selection import load_mask

    router = Router.load(args.router)
    experts = {m.task: m for m in (load_mask(p) for p in args.experts)}
    general = load_mask(args.general) if args.general else None
    loaded = _load(args)
    routed = RoutedModel(ExpertBank(loaded, experts, general), router, args.threshold if general else None)
    for item in routed.generate(args.prompt, args.max_new_tokens):
        print(json.dumps(item, ensure_ascii=False))
    return 0


# -- registry -----------------------------------------------------------------------------


def _register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", required=True, help="the pipeline's results folder (results.json, results.md...)")
    p.add_argument("--registry", required=True, help="the local registry folder the pipeline wrote")
    p.add_argument("--experiment", default="seap")
    _tracking(p)


def _register(args: argparse.Namespace) -> int:
    from seap.registry.mlflow_code import mlflow_registry
    from seap.registry.records import check_registration

    check_registration(args.results, args.registry)  # before MLflow is imported or touched

    reg = mlflow_registry()
    out = reg.register_results(args.results, registry_dir=args.registry, tracking_uri=args.tracking_uri,
                               local_dir=args.mlflow_dir, experiment=args.experiment, progress=_progress(args))
    print(reg.main_json(out))
    return 0


def _promote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="registered model, e.g. seap-smollm2-135m-capitals")
    p.add_argument("version", type=_version, help="version number")
    p.add_argument("--to", dest="stage", required=True, choices=["candidate", "staging", "production"])
    p.add_argument("--policy", default=None, help="promotion gates (default: mlflow/promotion.yaml)")
    p.add_argument("--no-verify-base", dest="verify_base", action="store_false",
                   help="skip loading the base model to check its fingerprint (the bundle is still checked)")
    _tracking(p)


def _version(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"version must be a positive whole number (1, 2, ...), got {text!r}")
    return int(text)


def _registry(args: argparse.Namespace) -> Any:
    from seap.registry.mlflow_code import mlflow_registry

    reg = mlflow_registry()
    reg.connect(args.tracking_uri, args.mlflow_dir)
    return reg


def _promote(args: argparse.Namespace) -> int:
    reg = _registry(args)
    print(reg.main_json(reg.promote(args.name, args.version, args.stage, args.policy, args.verify_base)))
    return 0


def _rollback_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    _tracking(p)


def _rollback(args: argparse.Namespace) -> int:
    reg = _registry(args)
    print(reg.main_json(reg.rollback(args.name)))
    return 0


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default=None)
    p.add_argument("--filter", default="", help="MLflow filter, e.g. \"tags.task = 'capitals'\"")
    p.add_argument("--json", action="store_true")
    _tracking(p)


def _models(args: argparse.Namespace) -> int:
    reg = _registry(args)
    rows = reg.search(args.filter, args.name)
    print(reg.main_json(rows) if args.json else reg.format_versions(rows))
    return 0


# -- tools --------------------------------------------------------------------------------


def _export_starter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder to write: OUT/<task>/train.jsonl and validation.jsonl")
    p.add_argument("--seed", type=int, default=0, help="starter-suite seed (0: the suite of starter: tasks)")
    p.add_argument("--overwrite", action="store_true")


def _export_starter(args: argparse.Namespace) -> int:
    from seap.data.starter import export_starter

    counts = export_starter(args.out, args.seed, overwrite=args.overwrite)
    for rel, n in counts.items():
        print(f"{rel}: {n} records")
    print(f"wrote {args.out}")
    return 0


EXPORT_FORMATS = ("gguf", "hf")  # checked against seap.export


def _export_model_args(p: argparse.ArgumentParser) -> None:
    _model(p, purpose="the model to export: a pruned folder (`seap apply`/`seap prune`), or any model SEAP loads; ")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="gguf: a file for llama.cpp (any per-layer widths); hf: a folder stock transformers loads "
                        "(one width for all layers)")
    p.add_argument("--out", required=True, help="the .gguf file (gguf) or folder (hf) to write")
    p.add_argument("--gguf-dtype", default="f16", choices=("f16", "f32"),
                   help="gguf: matrices in float16 (default) or float32 (norms stay float32); quantise with "
                        "llama.cpp's llama-quantize")
    p.add_argument("--tokenizer-pre", default=None,
                   help="gguf: llama.cpp's pre-tokenizer name, when it does not recognise the tokenizer by itself")
    p.add_argument("--overwrite", action="store_true")


def _export_model(args: argparse.Namespace) -> int:
    from seap.export.to_gguf import is_seap_gguf

    _check_out(args, args.model, file=args.format == "gguf", recognise=is_seap_gguf if args.format == "gguf" else None)
    loaded = _load(args)
    if args.format == "gguf":
        from seap.export.to_gguf import export_gguf, gguf_layout

        layout = gguf_layout(loaded)
        export_gguf(loaded, args.out, dtype=args.gguf_dtype, overwrite=args.overwrite, tokenizer_pre=args.tokenizer_pre,
                    inputs=(args.model,))
        widths = "one width for all layers" if layout.uniform else "per-layer widths"
        print(f"wrote {args.out} (llama.cpp architecture {layout.architecture}, {widths}, {args.gguf_dtype})")
    else:
        from seap.export.to_transformers import export_transformers

        export_transformers(loaded, args.out, overwrite=args.overwrite, inputs=(args.model,))
        print(f"wrote {args.out} (loads with transformers.AutoModelForCausalLM.from_pretrained, without seap)")
    return 0


def _info(args: argparse.Namespace) -> int:
    loaded = _load(args)
    geo = loaded.adapter.geometry(loaded.model)
    g0 = geo.layers[0]
    print(json.dumps({
        "source": loaded.source, "fingerprint": loaded.fingerprint, "architecture": loaded.adapter.name,
        "layers": geo.num_layers, "hidden_size": geo.hidden_size, "heads": g0.num_heads, "kv_heads": g0.num_kv_heads,
        "head_dim": g0.head_dim, "intermediate_size": g0.intermediate_size, "prunable_params": geo.total_params(),
        "total_params": sum(p.numel() for p in loaded.model.parameters()),
        "pruned": getattr(loaded.model.config, "seap_pruning", None),
    }, indent=2))
    return 0


def _fetch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)


def _fetch(args: argparse.Namespace) -> int:
    from seap.model.loading import BUILTIN_MODELS, fetch_builtin

    if args.model not in BUILTIN_MODELS:
        raise SeapError(f"{args.model!r} is not a built-in model", f"built-in models: {', '.join(BUILTIN_MODELS)}")
    print(fetch_builtin(args.model))
    return 0


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("corpus", "stages", "build per-task calibration corpora (knowledge sentences) from task records",
            _corpus_args, _corpus),
    Command("stats", "stages", "collect activation statistics of o_proj/down_proj inputs for each task",
            _stats_args, _stats),
    Command("merge-stats", "stages", "merge statistics of corpus shards (exactly equal to one pass)", _merge_args, _merge),
    Command("scores", "stages", "score heads and MLP channels from statistics", _scores_args, _scores),
    Command("masks", "stages", "allocate per-layer sparsity and build an expert or the general mask", _masks_args,
            _masks),
    Command("apply", "stages", "prune a model with a mask (soft or hard) and save it", _apply_args, _apply),
    Command("prune", "stages", "one shot: corpus -> stats -> scores -> mask -> hard-pruned model", _prune_args, _prune),
    Command("eval", "pipeline", "run the whole plan in this process: dense, SEAP expert/general/routed, baselines "
            "(Table 1, plot, registry)", _run_args, _eval),
    Command("study", "pipeline", "the quality study of docs/results.md: settings chosen on held-out train items, "
            "every method x compensation x sparsity, CIs, paired tests, KL, perplexity", _study_args, _study),
    Command("plan", "pipeline", "show the jobs a configuration plans (what eval, dvc repro and the flow run)",
            _plan_args, _plan),
    Command("stage", "pipeline", "run one stage of the DVC pipeline (dvc.yaml) with the parameters of params.yaml",
            _stage_args, _stage),
    Command("bench", "tools", "prefill and decode speed of dense against pruned models", _bench_args, _bench),
    Command("router", "tools", "train the task router on the tasks' training prompts", _router_args, _router),
    Command("route", "tools", "generate with routed experts (router + expert masks + general mask)", _route_args,
            _route),
    Command("export-starter", "tools", "write the built-in starter suite as a jsonl task folder (the DVC data)",
            _export_starter_args, _export_starter),
    Command("export", "tools", "write a pruned model for llama.cpp (GGUF) or stock transformers (HF folder)",
            _export_model_args, _export_model),
    Command("info", "tools", "model fingerprint, architecture and prunable parameters", _model, _info),
    Command("fetch", "tools", "download and convert a built-in model once (e.g. smollm2-135m)", _fetch_args, _fetch),
    Command("register", "registry", "track a pipeline run and register its experts as MLflow model versions",
            _register_args, _register),
    Command("promote", "registry", "move a version to candidate, staging or production (gated by "
            "mlflow/promotion.yaml)", _promote_args, _promote),
    Command("rollback", "registry", "put the previous production version back", _rollback_args, _rollback),
    Command("models", "registry", "search registered versions by name and tags", _models_args, _models),
)}
GROUPS = {"stages": "stages (in this order, or all at once with `seap prune`)",
          "pipeline": "pipeline (one plan behind seap eval, dvc repro and the Prefect flow)",
          "tools": "tools", "registry": "registry (MLflow; tracking URI from --tracking-uri, $MLFLOW_TRACKING_URI or "
                                        "runs/mlflow/mlflow.db)"}


def _epilog() -> str:
    lines = []
    for group, title in GROUPS.items():
        lines.append(f"{title}:")
        lines.extend(f"  {c.name:<15}{c.summary}" for c in COMMANDS.values() if c.group == group)
    return "\n".join(lines)


class _LazyParsers(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Sub-parsers whose arguments are added only when that command is parsed, so ``seap --help``
    and ``seap CMD --help`` import nothing but the command's own parser code."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        name = values[0] if values else None
        if name in COMMANDS and name in self.choices and not getattr(self.choices[name], "_filled", False):
            COMMANDS[name].arguments(self.choices[name])
            self.choices[name]._filled = True  # type: ignore[attr-defined]
        super().__call__(parser, namespace, values, option_string)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seap", description="Sparse Expert Activation Pruning for causal LMs (with Wanda-sp and FLAP baselines).",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", dest="verbose_logs", action="store_true", help="log progress details")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.register("action", "lazy_parsers", _LazyParsers)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", action="lazy_parsers")
    for command in COMMANDS.values():
        sub.add_parser(command.name, help=command.summary, description=command.summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO if args.verbose_logs else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("seap").setLevel(logging.INFO)  # one-time steps (download, conversion) say what they do
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return COMMANDS[args.command].handler(args)
    except SeapError as exc:
        print(f"seap {args.command}: error: {exc.problem}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial output was kept", file=sys.stderr)
        return 130
    except ImportError as exc:  # an optional driver, e.g. for a database tracking URI
        print(f"seap {args.command}: error: a package this needs is not installed: {exc.name or exc}", file=sys.stderr)
        print(f"  fix: install it (pip install {exc.name or '...'}), or use another backend", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user gave: missing, read-only, under a file, a full disk
        where = f" {exc.filename}" if exc.filename else ""
        print(f"seap {args.command}: error: cannot use{where}: {exc.strerror or exc}", file=sys.stderr)
        print("  fix: check the path, its permissions and the free space", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: one line here, the whole trace in a log file
        log = _crash_log(args.command)
        print(f"seap {args.command}: internal error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
              file=sys.stderr)
        print(f"  the full trace is in {log}; please report it", file=sys.stderr)
        return 1


def _crash_log(command: str) -> Path:
    """Write the current exception's trace to a log file (``$SEAP_LOG_DIR``, else ``runs/logs``,
    else the temp folder) and return where."""
    import tempfile
    import time
    import traceback

    name = f"seap-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (os.environ.get("SEAP_LOG_DIR"), "runs/logs", tempfile.gettempdir()):
        if not folder:
            continue
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            path = Path(folder) / name
            from seap.io import redact_uri

            path.write_text(redact_uri(traceback.format_exc()), encoding="utf-8")
            return path.resolve()
        except OSError:
            continue
    return Path("(could not write a log file)")


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["COMMANDS", "Command", "build_parser", "main"]
