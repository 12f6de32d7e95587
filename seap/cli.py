"""The ``seap`` command line: one subcommand per pipeline stage plus the one-shot ``prune``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from seap.errors import SeapError

STAGES_HELP = """stages (run in this order, or all at once with `seap prune`):
  corpus       build per-task calibration corpora (knowledge sentences) from task records
  stats        collect activation statistics of o_proj/down_proj inputs for each task
  merge-stats  merge statistics of corpus shards (exactly equal to one pass)
  scores       score heads and MLP channels from statistics
  masks        allocate per-layer sparsity and build an expert or the general mask
  apply        prune a model with a mask (soft or hard) and save it
  prune        one shot: corpus -> stats -> scores -> mask -> hard-pruned model
  eval         compare dense, SEAP expert/general/routed, Wanda-sp and FLAP on tasks (Table 1, plot)
  bench        prefill and decode speed of dense against pruned models
  router       train the task router on the tasks' training prompts
  route        generate with routed experts (router + expert masks + general mask)
  stage        run one stage of the DVC pipeline (dvc.yaml) with the parameters of params.yaml
registry (MLflow; tracking URI from --tracking-uri, $MLFLOW_TRACKING_URI or runs/mlflow/mlflow.db):
  register     track a pipeline run and register its experts as MLflow model versions
  promote      move a version to candidate, staging or production (gated by mlflow/promotion.yaml)
  rollback     put the previous production version back
  models       search registered versions by name and tags
tools:
  export-starter  write the built-in starter suite as a jsonl task folder (e.g. the DVC data folder)
  info         model fingerprint, architecture and prunable parameters
  fetch        download and convert a built-in model once (e.g. smollm2-135m)
"""


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shard must look like I/N (e.g. 0/4), got {text!r}") from None
    return index, count


def _add_model(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, default=None if required else "smollm2-135m",
                   help="hub id (org/name), local HF folder, .gguf file, or alias smollm2-135m")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")


def _add_schedule(p: argparse.ArgumentParser) -> None:
    from seap.maths.geometry import GQA_MODES

    p.add_argument("--sparsity", type=float, required=True, help="target fraction of prunable weights to remove, in [0, 1)")
    p.add_argument("--gqa-mode", default="kv-groups", choices=GQA_MODES,
                   help="GQA pruning unit: whole key/value groups (default) or the same number of query heads per group")
    p.add_argument("--k", type=float, default=None, help="logistic steepness (default 1.0)")
    p.add_argument("--x0", type=float, default=None, help="logistic inflection point in [0, 1] (default 0.3)")
    p.add_argument("--protect-first", type=int, default=None, help="logistic: first layers kept dense (default 2)")
    p.add_argument("--protect-last", type=int, default=None, help="logistic: last layers kept dense (default 2)")


def _add_tasks(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", nargs="+", default=["capitals", "antonyms", "arithmetic", "sentiment", "categories"],
                   help="task names, optionally with a source prefix (hub:, local:, jsonl:, starter:); "
                        "default: the built-in starter suite")
    p.add_argument("--data-dir", default=None, help="folder of local tasks (e.g. ../shared/benchmarks)")


def _schedule_options(args: argparse.Namespace) -> dict[str, Any]:
    opts = {"k": args.k, "x0": args.x0, "protect_first": args.protect_first, "protect_last": args.protect_last}
    return {k: v for k, v in opts.items() if v is not None}


def build_parser() -> argparse.ArgumentParser:
    from seap.data.corpus import DEFAULT_MAX_TOKENS, DEFAULT_SAMPLES_PER_TASK, DEFAULT_SEED
    from seap.run.stages import METHODS
    from seap.maths.schedules import SCHEDULES
    from seap.maths.scores import SCORES

    parser = argparse.ArgumentParser(
        prog="seap", description="Sparse Expert Activation Pruning for causal LMs (with Wanda-sp and FLAP baselines).",
        epilog=STAGES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = parser.add_subparsers(dest="command", metavar="STAGE")

    p = sub.add_parser("corpus", help="build calibration corpora from task records")
    p.add_argument("--records", required=True, help="JSON/JSONL task records, or 'builtin' for the starter suite")
    p.add_argument("--task", action="append", dest="tasks", help="task(s) to keep (default: all in the records)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES_PER_TASK, help="records sampled per task")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="token cap per text, used by `stats`")
    p.add_argument("--out", required=True, help="corpus JSONL file to write")

    p = sub.add_parser("stats", help="collect activation statistics per task")
    _add_model(p)
    p.add_argument("--corpus", required=True, help="corpus JSONL (from `seap corpus`)")
    p.add_argument("--task", action="append", dest="tasks")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="token cap (default: the corpus's)")
    p.add_argument("--shard", type=_shard, default=None, help="process shard I of N (I/N), merge with merge-stats")
    p.add_argument("--accumulate-dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--out", required=True, help="folder; one sub-folder per task")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("merge-stats", help="merge statistics of shards")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--task", default=None, help="name of the merged task (needed if the inputs differ)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("scores", help="score heads and channels of one task")
    p.add_argument("--stats", required=True, help="statistics folder of one task")
    p.add_argument("--score", default="seap-sf", choices=sorted(SCORES))
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("masks", help="build an expert mask (one scores folder) or the general mask (--general)")
    p.add_argument("--scores", nargs="+", required=True, help="scores folder(s)")
    p.add_argument("--schedule", default="logistic", choices=SCHEDULES)
    _add_schedule(p)
    p.add_argument("--general", action="store_true", help="combine the tasks' scores into the general mask")
    p.add_argument("--weight", action="append", help="general-mask weight TASK=W (default: wikitext 3, others 2)")
    p.add_argument("--bias-compensation-stats", default=None,
                   help="statistics folder whose means the mask stores for FLAP bias compensation")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("apply", help="prune a model with a mask and save it")
    _add_model(p)
    p.add_argument("--mask", required=True)
    p.add_argument("--mode", default="hard", choices=("hard", "soft"))
    p.add_argument("--bias-compensation", action="store_true", help="fold removed channels' means into biases")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("prune", help="one shot: calibration file -> hard-pruned model")
    _add_model(p)
    p.add_argument("--calib", required=True, help="JSON/JSONL task records (or texts), or 'builtin'")
    p.add_argument("--task", action="append", dest="tasks", help="prune for this task only (an expert mask)")
    p.add_argument("--method", default="seap", choices=sorted(METHODS),
                   help="preset: seap (seap-sf, logistic), wanda-sp (wanda-sp, uniform), flap (flap, flap-adaptive, bias comp.)")
    p.add_argument("--score", default=None, choices=sorted(SCORES), help="override the method's score")
    p.add_argument("--schedule", default=None, choices=SCHEDULES, help="override the method's schedule")
    bias = p.add_mutually_exclusive_group()
    bias.add_argument("--bias-compensation", dest="bias_compensation", action="store_true", default=None)
    bias.add_argument("--no-bias-compensation", dest="bias_compensation", action="store_false")
    _add_schedule(p)
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES_PER_TASK, help="calibration records per task")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--weight", action="append", help="general-mask weight TASK=W")
    p.add_argument("--out", required=True, help="folder for the pruned model")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    from seap.run.experiment import ALL_METHODS, DEFAULT_METHODS

    p = sub.add_parser("eval", help="evaluate methods x sparsities on tasks; writes JSON, Markdown and a plot")
    _add_model(p)
    _add_tasks(p)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=ALL_METHODS)
    p.add_argument("--limit", type=int, default=None, help="at most this many evaluation items per task")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--metric", default="acc", choices=("acc", "acc_norm", "paper"),
                   help="metric of the table (paper: acc_norm for OBQA/HellaSwag/PIQA/ARC-c, acc elsewhere)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES_PER_TASK, help="calibration records per task")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--score", default="seap-sf", choices=sorted(SCORES), help="SEAP's score")
    p.add_argument("--router-threshold", type=float, default=0.5)
    p.add_argument("--router-layer", type=int, default=0)
    p.add_argument("--perplexity", action="store_true", help="also WikiText-2 perplexity (needs --data-dir)")
    p.add_argument("--perplexity-windows", type=int, default=40)
    p.add_argument("--bench", action="store_true", help="also measure speed of the task-agnostic masks")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--out", required=True, help="folder for results.json, results.md, the plot and artifacts")

    p = sub.add_parser("bench", help="prefill/decode tokens per second, dense vs pruned, in one run")
    _add_model(p)
    p.add_argument("--pruned", nargs="*", default=[], help="pruned model folders")
    p.add_argument("--mask", nargs="*", default=[], help="masks applied (hard) to --model")
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", required=True, help="JSON file to write")

    p = sub.add_parser("router", help="train the task router")
    _add_model(p)
    _add_tasks(p)
    p.add_argument("--prompts", type=int, default=500, help="training prompts per task (balanced to the smallest)")
    p.add_argument("--layer", type=int, default=0, help="0: input embeddings; k: hidden state after layer k")
    p.add_argument("--threshold", type=float, default=0.5, help="below this confidence, use the general mask")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("route", help="generate with the expert the router picks for each prompt")
    _add_model(p)
    p.add_argument("--router", required=True)
    p.add_argument("--experts", nargs="+", required=True, help="expert mask folders (one per router task)")
    p.add_argument("--general", default=None, help="general mask folder (the low-confidence fallback)")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)

    from seap.run.dvc import PARAMS_FILE, STAGES

    p = sub.add_parser("stage", help="run one stage of the DVC pipeline (dvc.yaml) with params.yaml")
    p.add_argument("name", choices=list(STAGES), help="the stage, as named in dvc.yaml")
    p.add_argument("--params", default=str(PARAMS_FILE), help="parameters file (default: params.yaml)")
    p.add_argument("--root", default=".", help="project root the stage paths are relative to (default: .)")

    p = sub.add_parser("export-starter", help="write the built-in starter suite as a jsonl task folder")
    p.add_argument("--out", required=True, help="folder to write: OUT/<task>/train.jsonl and validation.jsonl")
    p.add_argument("--seed", type=int, default=0, help="starter-suite seed (0: the suite of starter: tasks)")
    p.add_argument("--overwrite", action="store_true")

    def _tracking(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tracking-uri", default=None,
                       help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite in --mlflow-dir)")
        p.add_argument("--mlflow-dir", default="runs/mlflow", help="local MLflow store when no URI is set")

    p = sub.add_parser("register", help="track a pipeline run in MLflow and register its experts")
    p.add_argument("--results", required=True, help="the pipeline's results folder (results.json, results.md...)")
    p.add_argument("--registry", required=True, help="the local registry folder the pipeline wrote")
    p.add_argument("--experiment", default="seap")
    _tracking(p)
    p = sub.add_parser("promote", help="promote a registered version (candidate -> staging -> production)")
    p.add_argument("name", help="registered model, e.g. seap-smollm2-135m-capitals")
    p.add_argument("version", help="version number")
    p.add_argument("--to", dest="stage", required=True, choices=["candidate", "staging", "production"])
    p.add_argument("--policy", default=None, help="promotion gates (default: mlflow/promotion.yaml)")
    p.add_argument("--no-verify-base", dest="verify_base", action="store_false",
                   help="skip loading the base model to check its fingerprint (the bundle is still checked)")
    _tracking(p)
    p = sub.add_parser("rollback", help="put the previous production version of a registered model back")
    p.add_argument("name")
    _tracking(p)
    p = sub.add_parser("models", help="list registered versions (filter by name and tags)")
    p.add_argument("--name", default=None)
    p.add_argument("--filter", default="", help="MLflow filter, e.g. \"tags.task = 'capitals'\"")
    p.add_argument("--json", action="store_true")
    _tracking(p)

    p = sub.add_parser("info", help="fingerprint and architecture of a model")
    _add_model(p)

    p = sub.add_parser("fetch", help="download and convert a built-in model")
    p.add_argument("--model", default="smollm2-135m")
    return parser


def _load(args: argparse.Namespace) -> Any:
    from seap.model.loading import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


def run(args: argparse.Namespace) -> int:
    from . import pipeline

    progress = not (args.no_progress or os.environ.get("CI"))  # no bars in CI logs
    cmd = args.command
    if cmd == "corpus":
        corpora = pipeline.corpus_stage(args.records, args.out, args.tasks, args.samples, args.seed, args.max_tokens)
        for task, corpus in corpora.items():
            print(f"{task}: {len(corpus)} texts  {corpus.digest()[:19]}")
        print(f"wrote {args.out}")
    elif cmd == "stats":
        loaded = _load(args)
        written = pipeline.stats_stage(loaded, args.corpus, args.out, args.tasks, args.batch_size, args.max_tokens,
                                       args.shard, args.accumulate_dtype, args.overwrite, progress)
        for task, path in written.items():
            print(f"{task}: {path}")
    elif cmd == "merge-stats":
        print(pipeline.merge_stats_stage(args.inputs, args.out, args.task, args.overwrite))
    elif cmd == "scores":
        print(pipeline.scores_stage(args.stats, args.out, args.score, args.overwrite))
    elif cmd == "masks":
        mask = pipeline.mask_stage(args.scores, args.out, args.sparsity, args.schedule, args.general,
                                   pipeline.parse_weights(args.weight), args.gqa_mode, args.bias_compensation_stats,
                                   args.overwrite, **_schedule_options(args))
        print(f"{mask.meta['kind']} mask '{mask.task}': target {mask.meta['target_sparsity']:.4f}, "
              f"realised {mask.meta['realised_sparsity']:.4f} -> {args.out}")
    elif cmd == "apply":
        from seap.maths.masks import PruningMask
        from seap.model.surgery import apply_mask
        from seap.model.checkpoint import save_pruned

        mask = PruningMask.load(args.mask)
        loaded = _load(args)
        pruned = apply_mask(loaded, mask, args.mode, bias_compensation=args.bias_compensation, inplace=True)
        if args.mode == "hard":
            save_pruned(pruned, args.out, mask, overwrite=args.overwrite)
        else:
            from seap.io import atomic_directory

            with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
                pruned.model.save_pretrained(tmp)
                pruned.tokenizer.save_pretrained(tmp)
        print(f"{args.mode}-pruned with '{mask.task}' (realised sparsity {mask.realised_sparsity():.4f}) -> {args.out}")
    elif cmd == "prune":
        result = pipeline.prune(
            args.model, args.calib, args.sparsity, args.out, method=args.method, score=args.score,
            schedule=args.schedule, bias_compensation=args.bias_compensation, gqa_mode=args.gqa_mode,
            tasks=args.tasks, samples=args.samples, seed=args.seed, max_tokens=args.max_tokens,
            batch_size=args.batch_size, weights=pipeline.parse_weights(args.weight), overwrite=args.overwrite,
            progress=progress, device=args.device, dtype=args.dtype, **_schedule_options(args),
        )
        if args.json:
            print(json.dumps({"out": str(result.out_dir), "target_sparsity": result.target_sparsity,
                              "realised_sparsity": result.realised_sparsity, "tasks": result.tasks,
                              "dense_params": result.dense_params, "pruned_params": result.pruned_params,
                              "timings": result.timings}, indent=2))
        else:
            print("\n".join(result.summary_lines()))
            print(f"load it with: seap.load_pruned({str(result.out_dir)!r})")
    elif cmd == "eval":
        from seap.run.experiment import Experiment, ExperimentConfig, save_results

        config = ExperimentConfig(
            model=args.model, tasks=args.tasks, data_dir=args.data_dir, sparsities=args.sparsities,
            methods=args.methods, limit=args.limit, num_fewshot=args.num_fewshot, samples=args.samples, seed=args.seed,
            max_tokens=args.max_tokens, seap_score=args.score, router_threshold=args.router_threshold,
            router_layer=args.router_layer, perplexity=args.perplexity, perplexity_windows=args.perplexity_windows,
            bench=args.bench, metric=args.metric, eval_batch_size=args.eval_batch_size, device=args.device,
            dtype=args.dtype,
        )
        results = Experiment(config, args.out, progress=progress, verbose=True).run()
        paths = save_results(results, args.out)
        from seap.evaluation.report import table1

        print(table1(results))
        for kind, path in paths.items():
            print(f"{kind}: {path}")
    elif cmd == "bench":
        from seap.evaluation.speed import benchmark
        from seap.io import atomic_write_json
        from seap.maths.masks import PruningMask
        from seap.model.surgery import apply_mask
        from seap.model.checkpoint import load_pruned

        dense = _load(args)
        models = {"dense": dense}
        for path in args.pruned:
            models[f"pruned:{path}"] = load_pruned(path, device=args.device, dtype=args.dtype)
        for path in args.mask:
            models[f"mask:{path}"] = apply_mask(dense, PruningMask.load(path), "hard")
        if len(models) < 2:
            raise SeapError("nothing to compare with the dense model", "pass --pruned DIR or --mask DIR")
        result = benchmark(models, args.prefill_batch, args.prefill_tokens, args.decode_tokens, repeats=args.repeats)
        atomic_write_json(args.out, result)
        for name, m in result["models"].items():
            print(f"{name}: realised {m['realised_sparsity']:.3f}  prefill {m['prefill_tokens_per_s']:.0f} tok/s "
                  f"(x{m['prefill_speedup']:.2f})  decode {m['decode_tokens_per_s']:.1f} tok/s (x{m['decode_speedup']:.2f})")
        print(f"wrote {args.out}")
    elif cmd == "router":
        from seap.evaluation.harness import training_prompts
        from seap.evaluation.router import train_router
        from seap.data.catalogue import TaskCatalogue

        registry = TaskCatalogue(args.data_dir)
        specs = registry.resolve(args.tasks)
        loaded = _load(args)
        router = train_router(loaded, training_prompts(registry, specs, args.prompts, args.seed), args.layer,
                              seed=args.seed, threshold=args.threshold)
        router.save(args.out, overwrite=args.overwrite)
        print(f"held-out accuracy {router.meta['heldout_accuracy']:.3f} on {router.meta['n_heldout']} prompts")
        for task, acc in router.meta["heldout_accuracy_per_task"].items():
            print(f"  {task}: {acc:.3f}")
        print(f"wrote {args.out}")
    elif cmd == "route":
        from seap.maths.masks import PruningMask
        from seap.evaluation.router import Router
        from seap.evaluation.routed import ExpertBank, RoutedModel

        router = Router.load(args.router)
        experts = {m.task: m for m in (PruningMask.load(p) for p in args.experts)}
        general = PruningMask.load(args.general) if args.general else None
        loaded = _load(args)
        routed = RoutedModel(ExpertBank(loaded, experts, general), router, args.threshold if general else None)
        for item in routed.generate(args.prompt, args.max_new_tokens):
            print(json.dumps(item, ensure_ascii=False))
    elif cmd == "stage":
        from seap.run.dvc import run_stage

        run_stage(args.name, args.params, args.root, progress=progress)
    elif cmd == "export-starter":
        from seap.run.dvc import export_starter

        counts = export_starter(args.out, args.seed, overwrite=args.overwrite)
        for rel, n in counts.items():
            print(f"{rel}: {n} records")
        print(f"wrote {args.out}")
    elif cmd in ("register", "promote", "rollback", "models"):
        from seap.registry.mlflow_code import mlflow_registry

        reg = mlflow_registry()
        if cmd == "register":
            out = reg.register_results(args.results, registry_dir=args.registry, tracking_uri=args.tracking_uri,
                                       local_dir=args.mlflow_dir, experiment=args.experiment, progress=progress)
            print(reg.main_json(out))
            return 0
        reg.connect(args.tracking_uri, args.mlflow_dir)
        if cmd == "promote":
            print(reg.main_json(reg.promote(args.name, args.version, args.stage, args.policy, args.verify_base)))
        elif cmd == "rollback":
            print(reg.main_json(reg.rollback(args.name)))
        else:
            rows = reg.search(args.filter, args.name)
            print(reg.main_json(rows) if args.json else reg.format_versions(rows))
    elif cmd == "info":
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
    elif cmd == "fetch":
        from seap.model.loading import BUILTIN_MODELS, fetch_builtin

        if args.model not in BUILTIN_MODELS:
            raise SeapError(f"{args.model!r} is not a built-in model", f"built-in models: {', '.join(BUILTIN_MODELS)}")
        print(fetch_builtin(args.model))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("seap").setLevel(logging.INFO)  # one-time steps (download, conversion) say what they do
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return run(args)
    except SeapError as exc:
        print(f"seap {args.command}: error: {exc.problem}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial output was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
