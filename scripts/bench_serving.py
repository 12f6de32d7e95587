"""Serving throughput of the registered routed bundle against the dense model, in one run.

A batch of 32 mixed-task prompts (the starter suite's evaluation questions, interleaved) goes
through the routed model's MLflow pyfunc ``predict`` (route every prompt, group by expert,
generate each group in batches) and through the dense base model with the same batched greedy
generation; so does a batch of 32 prompts of one task (one group: what grouping costs is the
difference). Requests/s = 32 / wall time of the whole batch; median of ``--repeats`` after one
warm-up, all interleaved.

    PYTHONPATH=. .venv/bin/python scripts/bench_serving.py                # after the main job
    PYTHONPATH=. .venv/bin/python scripts/bench_serving.py --sparsity 0.2 --out runs/serving.json

The routed version is looked up in the main job's MLflow registry (``--tracking-uri``, default
``sqlite:///runs/mlflow/mlflow.db``) by its ``sparsity`` tag.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def mixed_prompts(n: int = 32, tasks: list[str] | None = None) -> list[str]:
    from seap.data.starter import STARTER_TASKS, starter_records

    per_task = {t: [r["question"] for r in starter_records(t, "evaluation")] for t in tasks or STARTER_TASKS}
    prompts: list[str] = []
    i = 0
    while len(prompts) < n:
        for task in per_task:
            if len(prompts) < n:
                prompts.append(per_task[task][i])
        i += 1
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracking-uri", default="sqlite:///runs/mlflow/mlflow.db")
    parser.add_argument("--model-name", default="seap-smollm2-135m-routed")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    args = parser.parse_args()

    import mlflow
    import torch

    from seap.evaluation.routed import generate_greedy
    from seap.model.loading import load_model

    mlflow.set_tracking_uri(args.tracking_uri)
    client = mlflow.MlflowClient()
    versions = [v for v in client.search_model_versions(f"name='{args.model_name}'")
                if abs(float(v.tags.get("sparsity", -1)) - args.sparsity) < 1e-9]
    if not versions:
        raise SystemExit(f"no version of {args.model_name} with sparsity {args.sparsity} in {args.tracking_uri}: "
                         "run the main job first (bash scripts/main.sh)")
    version = max(versions, key=lambda v: int(v.version))
    routed = mlflow.pyfunc.load_model(f"models:/{args.model_name}/{version.version}")
    dense = load_model("smollm2-135m", device="cpu")
    batches = {"mixed": mixed_prompts(args.requests), "one-task": mixed_prompts(args.requests, ["capitals"])}
    params = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}

    def run_routed(prompts: list[str]) -> float:
        start = time.perf_counter()
        out = routed.predict(prompts, params=params)
        assert len(out) == len(prompts)
        return time.perf_counter() - start

    def run_dense(prompts: list[str]) -> float:
        start = time.perf_counter()
        generate_greedy(dense, prompts, args.max_new_tokens, args.batch_size)
        return time.perf_counter() - start

    runs = {f"{engine}/{batch}": (fn, prompts) for batch, prompts in batches.items()
            for engine, fn in (("dense", run_dense), ("routed", run_routed))}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.repeats + 1):
        for name, (fn, prompts) in runs.items():
            t = fn(prompts)
            if round_:
                times[name].append(t)
    experts = {batch: routed.predict(prompts, params={**params, "max_new_tokens": 1})["expert"].value_counts().to_dict()
               for batch, prompts in batches.items()}
    result: dict = {name: {"seconds": t, "requests_per_s": args.requests / statistics.median(t)} for name, t in times.items()}
    for batch in batches:
        result[f"routed/{batch}"]["x_dense"] = (result[f"routed/{batch}"]["requests_per_s"]
                                                / result[f"dense/{batch}"]["requests_per_s"])
    result["setup"] = {"requests": args.requests, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                       "repeats": args.repeats, "statistic": "median", "model": f"{args.model_name} v{version.version}",
                       "sparsity": args.sparsity, "experts_used": experts, "torch_threads": torch.get_num_threads()}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
