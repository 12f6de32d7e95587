"""Stock-loading check on the embedded default (docs/results.md §5.3).

SmolLM2-135M pruned with one width for all layers (``--same-width``, SEAP on the built-in
suite, reconstruction on) at 20% and 50%, exported with ``seap export --format hf``, then loaded
in a fresh Python process that never imports seap, with plain
``AutoModelForCausalLM.from_pretrained``; its logits are compared with seap's pruned model,
and the per-layer-width (logistic) mask at the same sparsity is shown to be refused.

    PYTHONPATH=. .venv/bin/python scripts/check_stock_export.py --out runs/stock
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STOCK = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = tok(sys.argv[2], return_tensors="pt")["input_ids"]
with torch.no_grad():
    torch.save(model(input_ids=ids).logits[0], sys.argv[3])
assert not any(m == "seap" or m.startswith("seap.") for m in sys.modules)
print(json.dumps({"heads": model.config.num_attention_heads, "kv_heads": model.config.num_key_value_heads,
                  "intermediate_size": model.config.intermediate_size,
                  "params": sum(p.numel() for p in model.parameters())}))
"""
PROMPT = "The capital of France is Paris. The capital of Italy is"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/stock")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    args = parser.parse_args()

    import torch

    from seap.errors import SeapError
    from seap.export.to_transformers import export_transformers
    from seap.model.checkpoint import load_pruned
    from seap.model.loading import load_model
    from seap.run.commands import prune

    base = load_model("smollm2-135m", device="cpu", dtype="float32")
    report = {}
    for sparsity in args.sparsities:
        pruned_dir = Path(args.out) / f"same-width-{sparsity}"
        if not (pruned_dir / "config.json").is_file():
            prune(base, "builtin", sparsity, pruned_dir, progress=False, samples=32, same_width=True)
        pruned = load_pruned(pruned_dir, device="cpu", dtype="float32")
        stock_dir = Path(args.out) / f"stock-{sparsity}"
        export_transformers(pruned, stock_dir, overwrite=stock_dir.exists())
        ids = pruned.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = pruned.model(input_ids=ids).logits[0]
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-c", STOCK, str(stock_dir.resolve()), PROMPT, f"{tmp}/l.pt"], check=True,
                                 capture_output=True, text=True, cwd=tmp)
            got = torch.load(f"{tmp}/l.pt", weights_only=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["max_abs_logit_difference"] = float((got - want).abs().max())
        row["realised_sparsity"] = pruned.config.seap_pruning.get("realised_sparsity")
        try:
            logistic_dir = Path(args.out) / f"logistic-{sparsity}"
            if not (logistic_dir / "config.json").is_file():
                prune(base, "builtin", sparsity, logistic_dir, progress=False, samples=16)
            export_transformers(load_pruned(logistic_dir, device="cpu"), Path(args.out) / f"refused-{sparsity}")
            row["logistic"] = "exported (unexpected)"
        except SeapError as exc:
            row["logistic"] = f"refused: {exc.problem}"
        report[str(sparsity)] = row
        print(sparsity, json.dumps(row))
    Path(args.out, "stock-check.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
