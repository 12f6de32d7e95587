"""The registry commands (MLflow): ``seap register``, ``promote``, ``rollback`` and ``models``."""

from __future__ import annotations

import argparse
from typing import Any

from seap.cli.arguments import Command, show_progress, tracking_arguments


def _register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", required=True, help="the pipeline's results folder (results.json, results.md...)")
    p.add_argument("--registry", required=True, help="the local registry folder the pipeline wrote")
    from seap.run.config import declared_defaults

    p.add_argument("--experiment", default=declared_defaults()["experiment"], help="default: %(default)s")
    tracking_arguments(p)


def _register(args: argparse.Namespace) -> int:
    from seap.registry.mlflow_code import mlflow_registry
    from seap.registry.records import check_registration

    check_registration(args.results, args.registry)  # before MLflow is imported or touched

    reg = mlflow_registry()
    out = reg.register_results(args.results, registry_dir=args.registry, tracking_uri=args.tracking_uri,
                               local_dir=args.mlflow_dir, experiment=args.experiment, progress=show_progress(args))
    print(reg.main_json(out))
    return 0


def _promote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="registered model, e.g. seap-smollm2-135m-capitals")
    p.add_argument("version", type=_version, help="version number")
    p.add_argument("--to", dest="stage", required=True, choices=["candidate", "staging", "production"])
    p.add_argument("--policy", default=None, help="promotion gates (default: mlflow/promotion.yaml)")
    p.add_argument("--no-verify-base", dest="verify_base", action="store_false",
                   help="skip loading the base model to check its fingerprint (the bundle is still checked)")
    tracking_arguments(p)


def _version(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"version must be a positive whole number (1, 2, ...), got {text!r}")
    return int(text)


def _registry(args: argparse.Namespace, existing: bool = True) -> Any:
    """The registry module, connected; ``existing``: a local registry must already be there."""
    from seap.registry.mlflow_code import mlflow_registry

    reg = mlflow_registry()
    reg.connect(args.tracking_uri, args.mlflow_dir, existing=existing)
    return reg


def _promote(args: argparse.Namespace) -> int:
    reg = _registry(args)
    print(reg.main_json(reg.promote(args.name, args.version, args.stage, args.policy, args.verify_base)))
    return 0


def _rollback_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    tracking_arguments(p)


def _rollback(args: argparse.Namespace) -> int:
    reg = _registry(args)
    print(reg.main_json(reg.rollback(args.name)))
    return 0


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default=None)
    p.add_argument("--filter", default="", help="MLflow filter, e.g. \"tags.task = 'capitals'\"")
    p.add_argument("--json", action="store_true")
    tracking_arguments(p)


def _models(args: argparse.Namespace) -> int:
    reg = _registry(args)
    rows = reg.search(args.filter, args.name)
    print(reg.main_json(rows) if args.json else reg.format_versions(rows))
    return 0

COMMANDS = [
    Command("register", "registry", "track a pipeline run and register its experts as MLflow model versions",
            _register_args, _register),
    Command("promote", "registry", "move a version to candidate, staging or production (gated by "
            "mlflow/promotion.yaml)", _promote_args, _promote),
    Command("rollback", "registry", "put the previous production version back", _rollback_args, _rollback),
    Command("models", "registry", "search registered versions by name and tags", _models_args, _models),
]


__all__ = ["COMMANDS"]
