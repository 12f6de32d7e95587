"""Evaluation and serving tools: ``seap bench`` (speed), ``router`` (train the task router) and
``route`` (generate through the routed experts)."""

from __future__ import annotations

import argparse
import json

from seap.cli.arguments import Command, check_out, load_model_of, model_arguments, positive, task_arguments
from seap.errors import SeapError


def _bench_args(p: argparse.ArgumentParser) -> None:
    model_arguments(p)
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
    from seap.maths.mask_formats import load_mask
    from seap.model.checkpoint import load_pruned
    from seap.model.masking import apply_mask

    build = None
    if args.llama_cpp:  # (before any model is loaded)
        from seap.evaluation.llama_cpp_runtime import require_llama_cpp

        build = require_llama_cpp(None if args.llama_cpp == "auto" else args.llama_cpp)
    dense = load_model_of(args)
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
    model_arguments(p)
    task_arguments(p)
    from seap.run.config import declared_defaults

    d = declared_defaults()  # the pipeline's router job takes the same
    p.add_argument("--prompts", type=positive, default=d["router_prompts"],
                   help="training prompts per task (balanced to the smallest; default: %(default)s)")
    p.add_argument("--layer", type=int, default=d["router_layer"],
                   help="0: input embeddings; k: hidden state after layer k (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=d["router_threshold"],
                   help="below this confidence, use the general mask (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"], help="default: %(default)s")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")


def _router(args: argparse.Namespace) -> int:
    from seap.data.catalogue import TaskCatalogue
    from seap.evaluation.harness import training_prompts
    from seap.evaluation.router import train_router

    check_out(args, args.model, args.data_dir)
    catalogue = TaskCatalogue(args.data_dir)
    specs = catalogue.resolve(args.tasks)
    loaded = load_model_of(args)
    router = train_router(loaded, training_prompts(catalogue, specs, args.prompts, args.seed), args.layer,
                          seed=args.seed, threshold=args.threshold)
    router.save(args.out, overwrite=args.overwrite)
    print(f"held-out accuracy {router.meta['heldout_accuracy']:.3f} on {router.meta['n_heldout']} prompts")
    for task, acc in router.meta["heldout_accuracy_per_task"].items():
        print(f"  {task}: {acc:.3f}")
    print(f"wrote {args.out}")
    return 0


def _route_args(p: argparse.ArgumentParser) -> None:
    model_arguments(p)
    p.add_argument("--router", required=True)
    p.add_argument("--experts", nargs="+", required=True, help="expert mask folders (one per router task)")
    p.add_argument("--general", default=None, help="general mask folder (the low-confidence fallback)")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--max-new-tokens", type=positive, default=32)


def _route(args: argparse.Namespace) -> int:
    from seap.evaluation.routed import ExpertBank, RoutedModel
    from seap.evaluation.router import Router
    from seap.maths.mask_formats import load_mask

    router = Router.load(args.router)
    experts = {m.task: m for m in (load_mask(p) for p in args.experts)}
    general = load_mask(args.general) if args.general else None
    loaded = load_model_of(args)
    routed = RoutedModel(ExpertBank(loaded, experts, general), router, args.threshold if general else None)
    for item in routed.generate(args.prompt, args.max_new_tokens):
        print(json.dumps(item, ensure_ascii=False))
    return 0

COMMANDS = [
    Command("bench", "tools", "prefill and decode speed of dense against pruned models", _bench_args, _bench),
    Command("router", "tools", "train the task router on the tasks' training prompts", _router_args, _router),
    Command("route", "tools", "generate with routed experts (router + expert masks + general mask)", _route_args,
            _route),
]


__all__ = ["COMMANDS"]
