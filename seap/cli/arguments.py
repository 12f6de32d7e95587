"""What the ``seap`` commands share: the :class:`Command` record, argument builders used by
several command groups, and the few helpers every handler needs (loading the model, checking
``--out``). Imports nothing heavy at module level."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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



def positive(text: str) -> int:
    """A whole number of at least 1 (counts, sizes, caps): checked when the command line is read."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if not (count >= 1 and 0 <= index < count):
        raise argparse.ArgumentTypeError(f"shard {text!r}: shards are numbered 0..N-1, e.g. 0/4")
    return index, count


def model_arguments(p: argparse.ArgumentParser, required: bool = True, default: str | None = DEFAULT_MODEL,
           purpose: str = "") -> None:
    """``--model`` (required, or ``default`` when not) with ``--device`` and ``--dtype``."""
    p.add_argument("--model", required=required, default=None if required else default,
                   help=f"{purpose}hub id (org/name), local HF folder, .gguf file, or alias smollm2-135m")
    from seap.run.config import declared_defaults

    defaults = declared_defaults()
    p.add_argument("--device", default=defaults["device"], help="auto (every visible GPU, else the CPU), cpu, cuda, cuda:1, a list cuda:0,cuda:1 ...")
    p.add_argument("--dtype", default=defaults["dtype"],
                   help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")


def schedule_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparsity", type=float, required=True, help="target fraction of prunable weights to remove, in [0, 1)")
    from seap.maths.geometry import DEFAULT_GQA_MODE, GQA_MODES

    p.add_argument("--gqa-mode", default=DEFAULT_GQA_MODE, choices=GQA_MODES,
                   help="GQA pruning unit: whole key/value groups (default) or the same number of query heads per group")
    p.add_argument("--k", type=float, default=None, help="logistic steepness (default 1.0)")
    p.add_argument("--x0", type=float, default=None, help="logistic inflection point in [0, 1] (default 0.3)")
    p.add_argument("--protect-first", type=int, default=None, help="logistic: first layers kept dense (default 2)")
    p.add_argument("--protect-last", type=int, default=None, help="logistic: last layers kept dense (default 2)")
    p.add_argument("--channel-multiple", type=positive, default=None,
                   help="every pruned layer keeps a multiple of this many MLP channels, for fast kernels "
                        "(default 64; 1: any width)")
    p.add_argument("--same-width", action="store_true",
                   help="every layer keeps the same widths (uniform allocation), so that stock transformers "
                        "loads the pruned model (`seap export --format hf`)")


def schedule_options(args: argparse.Namespace) -> dict[str, Any]:
    opts = {"k": args.k, "x0": args.x0, "protect_first": args.protect_first, "protect_last": args.protect_last,
            "channel_multiple": args.channel_multiple, "same_width": args.same_width or None}
    return {k: v for k, v in opts.items() if v is not None}


def refit_arguments(p: argparse.ArgumentParser) -> None:
    """``--reconstruct`` / ``--no-reconstruct`` and the refit options, as the run configuration defines them."""
    from seap.run.config import add_arguments

    add_arguments(p, only=("reconstruct", "refit_alpha", "refit_prior", "refit_bias", "refit_sequential"))


def given_reconstruct(args: argparse.Namespace) -> bool | None:
    """``--reconstruct`` (True), ``--no-reconstruct`` (False) or neither (None: the default)."""
    from seap.run.config import given_arguments

    return given_arguments(args).get("reconstruct")


def refit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The refit options given (left out: :class:`RefitOptions` defaults)."""
    from seap.run.config import given_arguments

    given = given_arguments(args)
    opts = {"alpha": given.get("refit_alpha"), "prior": given.get("refit_prior"), "bias": given.get("refit_bias"),
            "sequential": given.get("refit_sequential")}
    return {k: v for k, v in opts.items() if v is not None}


def task_arguments(p: argparse.ArgumentParser) -> None:
    from seap.run.config import DEFAULT_TASKS

    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS),
                   help="task names, optionally with a source prefix (hub:, local:, jsonl:, starter:); "
                        "default: the built-in starter suite")
    p.add_argument("--data-dir", default=None, help="folder of local tasks (e.g. ../shared/benchmarks)")


def tracking_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite in --mlflow-dir)")
    p.add_argument("--mlflow-dir", default="runs/mlflow", help="local MLflow store when no URI is set")


def show_progress(args: argparse.Namespace) -> bool:
    return not (args.no_progress or os.environ.get("CI"))  # no bars in CI logs


def load_model_of(args: argparse.Namespace) -> Any:
    from seap.model.loading import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


def layers_of(args: argparse.Namespace) -> Any:
    """The model of ``--model`` as a layer source: a checkpoint read one decoder layer at a time
    (:func:`seap.model.layer_stream.open_layers`), so the dense model is never loaded whole."""
    from seap.model.layer_stream import open_layers

    return open_layers(args.model, device=args.device, dtype=args.dtype)


def check_out(args: argparse.Namespace, *inputs: Any, file: bool = False,
               recognise: Callable[[Path], str | None] | None = None) -> None:
    """Everything about ``--out`` and ``--device`` that can be checked before a model is loaded."""
    from seap.io import check_output
    from seap.model.loaded import resolve_device

    if getattr(args, "device", None) is not None:
        resolve_device(args.device)
    check_output(args.out, [i for i in inputs if isinstance(i, str)], getattr(args, "overwrite", False), file=file,
                 recognise=recognise)
