"""``router_flow``: router training only (cached like every stage), printing the held-out
accuracy per task.

    python -m flows.router --model smollm2-135m --tasks capitals antonyms arithmetic
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import flow

from flows.pipeline import DEFAULT_TASKS, PipelineParams
from tasks.stages import default_workdir, ref, resolve_model, train_router


@flow(name="seap-router", log_prints=True)
def router_flow(
    model: str = "smollm2-135m",
    tasks: list[str] | None = None,
    data_dir: str | None = None,
    prompts_per_task: int = 500,
    feature_layer: int = 0,
    threshold: float = 0.5,
    seed: int = 42,
    workdir: str | None = None,
) -> dict[str, Any]:
    from seap.evaluation.router import Router

    p = PipelineParams(model=model, tasks=list(tasks or DEFAULT_TASKS), data_dir=data_dir, router=True,
                       router_prompts=prompts_per_task, router_layer=feature_layer, router_threshold=threshold,
                       seed=seed, workdir=workdir, baselines=[])
    p.validate()
    data = ref(p.data_dir) if p.data_dir else None
    router_ref = train_router(resolve_model(p.model), p.tasks, data, p.router_prompts, p.router_layer, p.seed,
                              p.router_threshold, p.work)
    router = Router.load(router_ref["path"])
    print(f"router: {router_ref['path']}")
    print(f"held-out accuracy {router.meta['heldout_accuracy']:.3f} on {router.meta['n_heldout']} prompts")
    for task, acc in router.meta["heldout_accuracy_per_task"].items():
        print(f"  {task}: {acc:.3f}")
    return {"router": router_ref, "heldout_accuracy": router.meta["heldout_accuracy"],
            "per_task": router.meta["heldout_accuracy_per_task"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the task router (cached).")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--prompts-per-task", type=int, default=500)
    parser.add_argument("--feature-layer", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--workdir", default=default_workdir())
    router_flow(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
