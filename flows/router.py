"""``router_flow``: router training only, the router job of the plan (cached like every job),
printing the held-out accuracy per task.

    python -m flows.router --model smollm2-135m --tasks capitals antonyms arithmetic
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import flow

from flows.pipeline import DEFAULTS, run_plan
from seap.run.config import RunConfig, add_arguments, given_arguments
from seap.run.plan import make_plan


ROUTER_OPTIONS = ("model", "tasks", "data_dir", "router_prompts", "router_layer", "router_threshold", "seed",
                  "workdir")  # the flow's parameters: RunConfig fields


@flow(name="seap-router", log_prints=True)
def router_flow(
    model: str = DEFAULTS.model,
    tasks: list[str] = DEFAULTS.tasks,
    data_dir: str | None = DEFAULTS.data_dir,
    router_prompts: int = DEFAULTS.router_prompts,
    router_layer: int = DEFAULTS.router_layer,
    router_threshold: float = DEFAULTS.router_threshold,
    seed: int = DEFAULTS.seed,
    workdir: str = DEFAULTS.workdir,
) -> dict[str, Any]:
    given = {name: value for name, value in locals().items() if name in ROUTER_OPTIONS}
    config = RunConfig.from_mapping({**given, "methods": ["seap-routed"]}, front="flow").validate()
    from seap.evaluation.router import Router

    outputs = run_plan(make_plan(config).upstream_of(["router"]))
    router = Router.load(outputs["router"]["path"])
    print(f"router: {outputs['router']['path']}")
    print(f"held-out accuracy {router.meta['heldout_accuracy']:.3f} on {router.meta['n_heldout']} prompts")
    for task, acc in router.meta["heldout_accuracy_per_task"].items():
        print(f"  {task}: {acc:.3f}")
    return {"router": outputs["router"], "heldout_accuracy": router.meta["heldout_accuracy"],
            "per_task": router.meta["heldout_accuracy_per_task"]}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flows.router``."""
    parser = argparse.ArgumentParser(description="Train the task router (cached).")
    add_arguments(parser, only=ROUTER_OPTIONS)
    return parser


def main(argv: list[str] | None = None) -> None:
    router_flow(**given_arguments(build_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
