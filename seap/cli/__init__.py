"""The ``seap`` command line: a table of commands, each a parser builder and a handler.

The commands live in one module per group (:mod:`seap.cli.step_commands`,
:mod:`~seap.cli.pipeline_commands`, :mod:`~seap.cli.serving_commands`,
:mod:`~seap.cli.registry_commands`, :mod:`~seap.cli.export_commands`); this module holds the
dispatch table and the entry point. Nothing heavy is imported until a handler runs, so
``seap --help`` and ``seap CMD --help`` answer at once (torch alone takes seconds to import).
Errors a user can fix are printed as ``seap CMD: error: <problem>`` and ``fix: <what to do>``
with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seap.cli import export_commands, pipeline_commands, registry_commands, serving_commands, step_commands
from seap.cli.arguments import SCHEDULE_NAMES, SCORE_NAMES, Command
from seap.errors import SeapError

COMMANDS: dict[str, Command] = {c.name: c for group in (step_commands, pipeline_commands, serving_commands,
                                                           export_commands, registry_commands)
                                for c in group.COMMANDS}
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


def _attach_dashed_values(argv: Sequence[str]) -> list[str]:
    """``--shard -1/2`` as ``--shard=-1/2``: argparse takes a value that starts with a dash for an
    option (and says the argument is missing), so the shard's own check never saw it."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--shard" and arg.startswith("-") and arg[1:2].isdigit():
            out[-1] = f"--shard={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_attach_dashed_values(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO if args.verbose_logs else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("seap").setLevel(logging.INFO)  # one-time steps (download, conversion) say what they do
    logging.raiseExceptions = False  # (a log file on a full disk is dropped quietly, never a trace on the screen)
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



__all__ = ["COMMANDS", "Command", "SCHEDULE_NAMES", "SCORE_NAMES", "build_parser", "main"]
