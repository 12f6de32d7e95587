"""Speed of the width options, PyTorch and llama.cpp side by side in one run (docs/results.md §5).

The SEAP general mask of the embedded default (scores of the main job's DVC work folder, all
tasks combined; logistic schedule) at 20% and 50%, with kept MLP channels rounded to multiples
of 1 (free widths), 8, 32, 64 and 128, and with one width for all layers (``same_width``), each
hard-pruned (the widths are what matters for speed; no refit) and timed against the dense model:
PyTorch prefill and decode (``seap.evaluation.speed.benchmark``) and llama.cpp float16 prompt
processing and generation (``llama-bench``, ``seap.evaluation.speed.llama_cpp_speed``).

    bash scripts/build_llama_cpp.sh && dvc repro scores      # once
    PYTHONPATH=. .venv/bin/python scripts/bench_widths.py --out docs/results/widths-speed.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MULTIPLES = (1, 8, 32, 64, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scores", default="work/scores/seap-sf", help="folder of per-task SEAP scores")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    from seap.evaluation.llama_cpp_runtime import require_llama_cpp
    from seap.evaluation.speed import benchmark, llama_cpp_speed
    from seap.maths.masks import build_mask
    from seap.maths.scores import ImportanceScores, combine_scores
    from seap.model.loading import load_model
    from seap.model.masking import apply_mask

    build = require_llama_cpp()
    base = load_model("smollm2-135m", device="cpu", dtype="float32")
    per_task = [ImportanceScores.load(p) for p in sorted(Path(args.scores).iterdir()) if p.is_dir()]
    general = combine_scores(per_task)
    models = {"dense": base}
    widths = {}
    for sparsity in args.sparsities:
        settings = [(f"multiple-{m}", {"channel_multiple": m}) for m in MULTIPLES]
        settings.append(("same-width", {"same_width": True}))
        for name, opts in settings:
            mask = build_mask(general, sparsity, "logistic", **opts)
            key = f"{name}@{sparsity}"
            models[key] = apply_mask(base, mask, "hard", bias_compensation=False)
            geo = models[key].adapter.geometry(models[key].model).layers
            widths[key] = {"realised_sparsity": mask.realised_sparsity(),
                           "mlp_widths": sorted({g.intermediate_size for g in geo}),
                           "heads": sorted({g.num_heads for g in geo})}
    torch_result = benchmark(models, repeats=args.repeats)
    engine = llama_cpp_speed(models, build, repetitions=args.repeats)
    rows = []
    for key in models:
        t, c = torch_result["models"][key], engine["models"][key]
        rows.append({"model": key, **widths.get(key, {"realised_sparsity": 0.0}),
                     "torch_prefill_x": t["prefill_speedup"], "torch_decode_x": t["decode_speedup"],
                     "llama_cpp_prefill_x": c["prefill_speedup"], "llama_cpp_decode_x": c["decode_speedup"],
                     "llama_cpp_prefill_tps": c["prefill_tokens_per_s"], "llama_cpp_decode_tps": c["decode_tokens_per_s"],
                     "torch_prefill_tps": t["prefill_tokens_per_s"], "torch_decode_tps": t["decode_tokens_per_s"]})
    print("| model | realised | PyTorch prefill x | decode x | llama.cpp prefill x | decode x |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['realised_sparsity'] * 100:.1f}% | {r['torch_prefill_x']:.2f} | "
              f"{r['torch_decode_x']:.2f} | {r['llama_cpp_prefill_x']:.2f} | {r['llama_cpp_decode_x']:.2f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "torch": torch_result["setup"], "llama_cpp": engine["setup"]},
                                             indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
