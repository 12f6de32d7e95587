"""The step commands: one artifact at a time (``seap corpus``, ``stats``, ``merge-stats``,
``scores``, ``masks``, ``apply``) and all of them at once (``seap prune``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from seap.cli.arguments import (SCHEDULE_NAMES, SCORE_NAMES, Command, check_out, given_reconstruct, layers_of, load_model_of,
                                model_arguments, positive, refit_arguments, refit_options, schedule_arguments,
                                schedule_options, shard, show_progress)
from seap.errors import SeapError


def _corpus_args(p: argparse.ArgumentParser) -> None:
    from seap.data.corpus import DEFAULT_MAX_TOKENS, DEFAULT_SAMPLES_PER_TASK, DEFAULT_SEED

    p.add_argument("--records", required=True, help="JSON/JSONL task records, or 'builtin' for the starter suite")
    p.add_argument("--task", action="append", dest="tasks", help="task(s) to keep (default: all in the records)")
    p.add_argument("--samples", type=positive, default=DEFAULT_SAMPLES_PER_TASK, help="records sampled per task")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--max-tokens", type=positive, default=DEFAULT_MAX_TOKENS, help="token cap per text, used by `stats`")
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
    model_arguments(p)
    p.add_argument("--corpus", required=True, help="corpus JSONL (from `seap corpus`)")
    p.add_argument("--task", action="append", dest="tasks")
    from seap.run.config import declared_defaults

    p.add_argument("--batch-size", type=positive, default=declared_defaults()["stats_batch_size"],
                   help="texts per forward pass (default: %(default)s)")
    p.add_argument("--max-tokens", type=positive, default=None, help="token cap (default: the corpus's)")
    p.add_argument("--shard", type=shard, default=None, help="process shard I of N (I/N), merge with merge-stats")
    p.add_argument("--accumulate-dtype", default="float64", choices=("float64", "float32"))
    from seap.run.methods import UNITS

    p.add_argument("--unit", default=declared_defaults()["unit"], choices=("auto", *UNITS),
                   help="a mixture-of-experts model: what its router statistics serve (auto and experts: whole "
                        "experts; neurons and both: also each expert's channel sums)")
    p.add_argument("--out", required=True, help="folder; one sub-folder per task")
    p.add_argument("--overwrite", action="store_true")


def _stats(args: argparse.Namespace) -> int:
    from seap.run.commands import make_statistics

    check_out(args, args.model, args.corpus)
    written = make_statistics(layers_of(args), args.corpus, args.out, args.tasks, args.batch_size, args.max_tokens,
                              args.shard, args.accumulate_dtype, args.overwrite, show_progress(args), unit=args.unit)
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
    from seap.run.methods import SEAP_SCORE

    p.add_argument("--score", default=SEAP_SCORE, choices=SCORE_NAMES, help="default: %(default)s")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")


def _scores(args: argparse.Namespace) -> int:
    from seap.run.commands import make_scores

    print(make_scores(args.stats, args.out, args.score, args.overwrite))
    return 0


def _masks_args(p: argparse.ArgumentParser) -> None:
    from seap.run.config import add_arguments

    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--scores", nargs="+", help="scores folder(s) of a dense model (`seap scores`)")
    source.add_argument("--stats", nargs="+", help="router statistics folder(s) of a mixture-of-experts model "
                        "(`seap stats` on it; --general merges several)")
    from seap.run.methods import SEAP_SCHEDULE

    p.add_argument("--schedule", default=SEAP_SCHEDULE, choices=SCHEDULE_NAMES, help="default: %(default)s")
    schedule_arguments(p)
    add_arguments(p, only=("unit", "expert_score", "allow_k_reduction"))
    p.add_argument("--general", action="store_true", help="combine the tasks' scores into the general mask")
    p.add_argument("--weight", action="append", help="general-mask weight TASK=W (default: wikitext 3, others 2)")
    p.add_argument("--bias-compensation-stats", default=None,
                   help="statistics folder whose means the mask stores, so applying it adds FLAP's bias compensation")
    refit_arguments(p)
    p.add_argument("--refit-corpus", nargs="+", default=None,
                   help="corpus files (`seap corpus`) to refit on: the first one's --refit-task texts (default: "
                        "all; an expert: its own task's) and every text of the others (e.g. generic text), run "
                        "through --model one layer at a time. Given, the mask is refitted (the default) unless "
                        "--no-reconstruct")
    p.add_argument("--refit-task", nargs="+", default=None, help="tasks of the first --refit-corpus file to refit on")
    model_arguments(p, required=False, default=None, purpose="with --reconstruct: the base the scores came from; ")
    from seap.run.config import declared_defaults

    p.add_argument("--batch-size", type=positive, default=declared_defaults()["stats_batch_size"],
                   help="with --reconstruct: texts per forward pass of the refit (default: %(default)s)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")


def _masks(args: argparse.Namespace) -> int:
    from seap.run.commands import make_mask, parse_weights
    from seap.run.config import RunConfig, given_arguments
    from seap.run.job_params import MaskParams
    from seap.run.methods import SEAP_SCORE

    given = given_arguments(args)
    defaults = RunConfig()
    unit = given.get("unit", defaults.masks.unit)
    moe = args.stats is not None
    if not moe and unit in ("experts", "both"):
        raise SeapError(f"--unit {unit} prunes the experts of a mixture-of-experts model, chosen from its router "
                        "statistics", "pass --stats DIR (from `seap stats` on the MoE model) instead of --scores")
    check_out(args, *(args.scores or args.stats), args.bias_compensation_stats, *(args.refit_corpus or []), args.model)
    refit: dict[str, Any] = {}
    options: dict[str, Any] | None = None
    # reconstruction is the default where there is something to refit on (--refit-corpus);
    # --reconstruct without it is an error, --no-reconstruct builds a plain mask
    reconstruct = given_reconstruct(args)
    if reconstruct is True or (reconstruct is None and args.refit_corpus):
        if moe:
            raise SeapError("masks of a mixture-of-experts model are not refitted", "drop the refit options")
        options = refit_options(args)
        if not args.refit_corpus or not args.model:
            raise SeapError("--reconstruct runs the calibration text through the base model",
                            "pass --model (the base) and --refit-corpus FILE (from `seap corpus`)")
        from seap.run.commands import read_refit_corpus

        parts, cap = read_refit_corpus(args.refit_corpus, args.refit_task)
        refit = {"refit_parts": parts, "refit_max_tokens": cap, "refit_batch_size": args.batch_size,
                 "refit_model": layers_of(args)}
    kind = "general" if args.general else "expert"
    params = MaskParams(method=f"seap-{kind}", row=f"seap-{kind}@{args.sparsity:g}", mask=kind, kind=kind,
                        sparsity=args.sparsity,
                        score=given.get("expert_score", defaults.masks.expert_score) if moe else SEAP_SCORE,
                        schedule=args.schedule, schedule_options=schedule_options(args), gqa_mode=args.gqa_mode,
                        weights=parse_weights(args.weight), refit=options, moe=moe,
                        unit=("experts" if unit == "auto" else unit) if moe else None,
                        allow_k_reduction=given.get("allow_k_reduction", defaults.masks.allow_k_reduction))
    mask = make_mask(args.scores or [], args.out, params, args.bias_compensation_stats, args.overwrite,
                     router_stats_dirs=args.stats or [], **refit)
    done = " (reconstructed)" if mask.is_reconstructed else ""
    print(f"{mask.meta.get('kind', kind)} mask '{mask.task}'{done}: target {mask.meta['target_sparsity']:.4f}, "
          f"realised {mask.realised_sparsity():.4f} -> {args.out}")
    return 0


def _apply_args(p: argparse.ArgumentParser) -> None:
    model_arguments(p)
    p.add_argument("--mask", required=True)
    p.add_argument("--mode", default="hard", choices=("hard", "soft"))
    bias = p.add_mutually_exclusive_group()
    bias.add_argument("--bias-compensation", dest="bias_compensation", action="store_true", default=None,
                      help="fold removed channels' means into biases (default: as the mask says)")
    bias.add_argument("--no-bias-compensation", dest="bias_compensation", action="store_false")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")


def _apply(args: argparse.Namespace) -> int:
    from seap.maths.mask_formats import load_mask
    from seap.model.checkpoint import save_pruned
    from seap.model.masking import apply_mask

    check_out(args, args.model, args.mask)
    mask = load_mask(args.mask)
    if args.mode == "soft" and not hasattr(mask, "kept_geometry"):  # an expert mask of an MoE model
        raise SeapError("soft expert pruning keeps every expert and changes only the routing, which a saved "
                        "checkpoint cannot carry", "apply expert masks with --mode hard")
    loaded = load_model_of(args)
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


PRUNE_OPTIONS = ("unit", "expert_score", "allow_k_reduction", "gqa_mode", "schedule_k", "schedule_x0", "protect_first",
                 "protect_last", "channel_multiple", "same_width", "bias_compensation", "general_weights", "reconstruct",
                 "refit_alpha", "refit_prior", "refit_bias", "refit_sequential", "samples", "seed", "max_tokens",
                 "stats_batch_size", "offload", "workdir", "data_dir", "max_drop", "max_drop_rel", "budget_grid",
                 "budget_search", "budget_step", "budget_confidence",
                 "selection_items", "min_speedup", "speedup_engine", "bench_llama_cpp")  # the run configuration's options `seap prune` takes as they are


def _prune_args(p: argparse.ArgumentParser) -> None:
    from seap.run.config import add_arguments
    from seap.run.methods import METHODS

    model_arguments(p)
    p.add_argument("--calib", default=None, help="JSON/JSONL task records (or texts), or 'builtin' (with an accuracy "
                   "budget: not used, the task's train split calibrates)")
    p.add_argument("--task", action="append", dest="tasks", help="prune for this task only (an expert mask)")
    p.add_argument("--method", default="seap", choices=("seap", *(n for n, m in METHODS.items() if m.builds_masks)),
                   help="seap (the expert of one task, or the general mask of several), or a baseline of the "
                        "method table (wanda-sp, flap and their +logistic variants; moe-frequency)")
    p.add_argument("--score", default=None, choices=SCORE_NAMES, help="SEAP's score (a baseline keeps its own)")
    p.add_argument("--schedule", default=None, choices=SCHEDULE_NAMES, help="SEAP's schedule (a baseline keeps its own)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="target fraction of prunable weights to remove, in [0, 1) (or --max-drop: the budget chooses)")
    add_arguments(p, only=PRUNE_OPTIONS,
                  aliases={"schedule_k": ("--k",), "schedule_x0": ("--x0",), "stats_batch_size": ("--batch-size",),
                           "general_weights": ("--weight",)})
    p.add_argument("--out", required=True, help="folder for the pruned model")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _prune(args: argparse.Namespace) -> int:
    from seap.run.config import given_arguments
    from seap.run.oneshot import prune

    result = prune(args.model, args.calib, args.sparsity, args.out, method=args.method, tasks=args.tasks,
                   overwrite=args.overwrite, progress=show_progress(args), front="cli", score=args.score,
                   schedule=args.schedule, device=args.device, dtype=args.dtype,
                   **{k: v for k, v in given_arguments(args).items() if k in PRUNE_OPTIONS})
    if args.json:
        print(json.dumps({"out": str(result.out_dir), "target_sparsity": result.target_sparsity,
                          "realised_sparsity": result.realised_sparsity, "tasks": result.tasks,
                          "dense_params": result.dense_params, "pruned_params": result.pruned_params,
                          "timings": result.timings, "reused": result.cached}, indent=2))
    else:
        print("\n".join(result.summary_lines()))
        print(f"load it with: seap.load_pruned({str(result.out_dir)!r})")
    return 0


COMMANDS = [
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
]


__all__ = ["COMMANDS"]
