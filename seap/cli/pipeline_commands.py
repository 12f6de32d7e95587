"""The pipeline commands: ``seap eval`` (the whole plan in this process), ``plan`` (its jobs),
``stage`` (one DVC stage), ``study`` (the quality study) and ``cache`` (what the work folder holds)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from seap.cli.arguments import Command, positive, show_progress


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
        execute(plan, StageContext(Path(config.outputs.workdir) / "task-files", progress=False),
                on_event=lambda e: [v(e) for v in views])  # publishes the results to --out after the report

    def summary(_: Any) -> list[str]:
        from pathlib import Path

        from seap.evaluation.report import RESULT_FILES, table1

        out = Path(config.outputs.out)
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
    p.add_argument("--samples", type=positive, default=d.samples, help="calibration records per task")
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
    p.add_argument("--channel-multiple", type=positive, default=d.channel_multiple,
                   help="kept MLP channels per layer, a multiple of this (default %(default)s: free widths, as the "
                        "study's first runs; 64 is the product's default)")
    p.add_argument("--cache-max-size", default=None,
                   help="the most the work folder may hold (e.g. 20G): each run evicts least recently used outputs "
                        "after every job (default: no cap; the study registers nothing)")


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
                           base={"cache_max_size": args.cache_max_size} if args.cache_max_size else {},
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
    from seap.run.plan import PIPELINE_STAGES

    p.add_argument("name", choices=list(PIPELINE_STAGES), help="the stage, as named in dvc.yaml")
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    p.add_argument("--root", default=".", help="project root the stage paths are relative to (default: .)")


def _stage(args: argparse.Namespace) -> int:
    from seap.run.dvc import run_stage

    run_stage(args.name, args.params, args.root, progress=show_progress(args))
    return 0

def _cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", default="list", choices=("list", "prune"),
                   help="list (default): what the work folder holds per stage; prune: remove outputs")
    p.add_argument("--workdir", default="runs/work", help="the work folder (default: %(default)s)")
    p.add_argument("--registry-dir", default=None, help="also list this local registry (never pruned here)")
    p.add_argument("--max-size", default=None, help="prune: least recently used outputs go until the folder holds at "
                   "most this (e.g. 20G)")
    p.add_argument("--older-than", default=None, help="prune: outputs unused for this long go (e.g. 7d, 12h)")
    p.add_argument("--include-newest", action="store_true",
                   help="prune: the newest run's outputs may go too (by default they stay: a re-run needs them)")
    p.add_argument("--dry-run", action="store_true", help="prune: say what would go, remove nothing")
    p.add_argument("--json", action="store_true", help="list: as JSON")


def _cache(args: argparse.Namespace) -> int:
    from pathlib import Path

    from seap.errors import SeapError
    from seap.run.cache_entries import entries, human, iter_lines, parse_age, parse_size, prune, summary

    max_size = parse_size(args.max_size) if args.max_size is not None else None
    older = parse_age(args.older_than) if args.older_than is not None else None
    workdir = Path(args.workdir)
    if not workdir.is_dir():
        raise SeapError(f"the work folder {workdir} does not exist", "pass the run's --workdir (default runs/work)")
    if args.action == "list":
        if max_size is not None or older is not None or args.include_newest or args.dry_run:
            raise SeapError("--max-size, --older-than, --include-newest and --dry-run are options of prune",
                            "run `seap cache prune ...`")
        if args.json:
            print(json.dumps({"workdir": str(workdir), "stages": summary(workdir),
                              "entries": [{"entry": e.rel, "bytes": e.bytes, "last_used": e.last_used, "runs": e.runs,
                                           "newest_run": e.newest} for e in entries(workdir)]}, indent=2))
        else:
            print("\n".join(iter_lines(workdir, args.registry_dir)))
        return 0
    if max_size is None and older is None:
        raise SeapError("prune needs a limit", "pass --max-size SIZE (e.g. 20G), --older-than AGE (e.g. 7d), or both")
    before = sum(e.bytes for e in entries(workdir))
    gone = prune(workdir, max_size, older, args.include_newest, dry_run=args.dry_run)
    freed = sum(e.bytes for e in gone)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(gone)} outputs ({human(freed)}); the work folder {'would hold' if args.dry_run else 'holds'} "
          f"{human(before - freed)}")
    for e in gone[:20]:
        print(f"  {e.rel}  {human(e.bytes)}")
    left = before - freed
    if max_size is not None and left > max_size:
        print(f"the newest run's outputs keep it above {human(max_size)}; --include-newest lets them go too")
    return 0


COMMANDS = [
    Command("eval", "pipeline", "run the whole plan in this process: dense, SEAP expert/general/routed, baselines "
            "(Table 1, plot, registry)", _run_args, _eval),
    Command("study", "pipeline", "the quality study of docs/results.md: settings chosen on held-out train items, "
            "every method x compensation x sparsity, CIs, paired tests, KL, perplexity", _study_args, _study),
    Command("plan", "pipeline", "show the jobs a configuration plans (what eval, dvc repro and the flow run)",
            _plan_args, _plan),
    Command("stage", "pipeline", "run one stage of the DVC pipeline (dvc.yaml) with the parameters of params.yaml",
            _stage_args, _stage),
    Command("cache", "pipeline", "what the work folder holds (per stage: size, last use, the newest run's share), "
            "and pruning it by age or size", _cache_args, _cache),
]


__all__ = ["COMMANDS"]
