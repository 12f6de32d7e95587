"""Evaluation time with and without shared-context loglikelihoods, side by side in one run.

    .venv/bin/python benchmarks/shared_context_eval.py [--model smollm2-135m] [--data-dir data]
        [--mask work/masks/flap@0.5/output] [--limit N]

Evaluates the dense model (and, with --mask, the model pruned by that mask) on the tasks of
params.yaml through lm-eval twice: plain ``HFLM`` and :class:`SharedContextHFLM`. Prints the
seconds of each, their ratio, the largest loglikelihood difference and whether every
accuracy agrees. Ratios hold across machines; absolute seconds belong to the machine.
"""

from __future__ import annotations

import argparse
import time

from seap.data.catalogue import TaskCatalogue
from seap.evaluation.harness import evaluate_lm, hflm
from seap.maths.masks import PruningMask
from seap.model.loading import load_model
from seap.model.masking import apply_mask
from seap.run.config import load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--mask", action="append", default=[], help="a mask folder (repeatable)")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    config = load_params("params.yaml")
    loaded = load_model(args.model or config.model.model, device="cpu")
    catalogue = TaskCatalogue(args.data_dir or config.data.data_dir, "runs/work")
    specs = catalogue.resolve(list(config.data.tasks))
    batch = config.evaluate.eval_batch_size
    models = {"dense": loaded}
    for path in args.mask:
        models[path] = apply_mask(loaded, PruningMask.load(path), "hard")
    for name, model in models.items():
        seconds, results = {}, {}
        for shared in (False, True):
            start = time.perf_counter()
            results[shared] = evaluate_lm(hflm(model, batch, shared_context=shared), catalogue,
                                          specs, args.limit)
            seconds[shared] = time.perf_counter() - start
        diff = max(abs(a[0] - b[0])
                   for task in results[False]["items"]
                   for x, y in zip(results[False]["items"][task], results[True]["items"][task], strict=True)
                   for a, b in zip(x["resps"], y["resps"], strict=True))
        same = all(results[False]["tasks"][t]["acc"] == results[True]["tasks"][t]["acc"] for t in results[False]["tasks"])
        print(f"{name}: plain {seconds[False]:.1f} s, shared context {seconds[True]:.1f} s, "
              f"ratio {seconds[True] / seconds[False]:.2f}; max |dLL| {diff:.2e}; same accuracies: {same}")


if __name__ == "__main__":
    main()
