"""``router_flow``: router training only, the router job of the plan (cached like every job),
printing the held-out accuracy per task.

    python -m flows.router --model smollm2-135m --tasks capitals antonyms arithmetic
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import flow

from flows.pipeline import _D, run_plan
from seap.run.config import RunConfig
from seap.run.plan import make_plan


@flow(name="seap-router", log_prints=True)
def router_flow(
    model: str = _D.model,
    tasks: list[str] = _D.tasks,
    data_dir: str | None = _D.data_dir,
    router_prompts: int = _D.router_prompts,
    router_layer: int = _D.router_layer,
    router_threshold: float = _D.router_threshold,
    seed: int = _D.seed,
    workdir: str = _D.workdir,
) -> dict[str, Any]:
    from seap.evaluation.router import Router

    config = RunConfig.from_mapping(
        {"model": model, "tasks": tasks, "data_dir": data_dir, "router_prompts": router_prompts,
         "router_layer": router_layer, "router_threshold": router_threshold, "seed": seed, "workdir": workdir,
         "methods": ["seap-routed"]}, front="flow").validate()
    outputs = run_plan(make_plan(config).upstream_of(["router"]))
    router = Router.load(outputs["router"]["path"])
    print(f"router: {outputs['router']['path']}")
    print(f"held-out accuracy {router.meta['heldout_accuracy']:.3f} on {router.meta['n_heldout']} prompts")
    for task, acc in router.meta["heldout_accuracy_per_task"].items():
        print(f"  {task}: {acc:.3f}")
    return {"router": outputs["router"], "heldout_accuracy": router.meta["heldout_accuracy"],
            "per_task": router.meta["heldout_accuracy_per_task"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the task router (cached).")
    parser.add_argument("--model", default=_D.model)
    parser.add_argument("--tasks", nargs="+", default=_D.tasks)
    parser.add_argument("--data-dir", default=_D.data_dir)
    parser.add_argument("--router-prompts", type=int, default=_D.router_prompts)
    parser.add_argument("--router-layer", type=int, default=_D.router_layer)
    parser.add_argument("--router-threshold", type=float, default=_D.router_threshold)
    parser.add_argument("--workdir", default=_D.workdir)
    router_flow(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
