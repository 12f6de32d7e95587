"""Benchmark: the streamed engine on one GPU, on a random-weight model of Llama-3-8B's shape.

What it does, in one process (no download: the model is built on the device):

1. builds a Llama with Llama-3-8B's shape (hidden 4096, MLP 14336, 32 heads, 8 key/value
   heads, 32 layers, vocabulary 128256) with random weights in bfloat16 on the GPU and saves it as
   sharded safetensors, with a small word-level tokenizer and a calibration file of random words;
2. ``seap prune`` at 20% and then 50% (``--device cuda``, the default streamed path: each layer read
   from the checkpoint onto the GPU once, every calibration batch through it, its second moments
   built, used by the refit and freed; the pruned checkpoint written layer by layer). The 50% run
   reuses the statistics of the 20% run (the plan's cache);
3. prefill and decode speed of the pruned models against the dense one, in bfloat16.

It reports, as JSON (``--json``) and a table: the peak GPU memory of each prune above what was
allocated before it (``torch.cuda.max_memory_allocated``), the peak RSS of the process, the time
of each stage and per layer, and the prefill (tokens/s) and decode (tokens/s) of dense and pruned.

Run it with ``bash benchmarks/gpu.sh`` on a machine with one GPU (under 8 minutes on an H100).
``--shape tiny --device cpu`` runs the same steps on a small model, to check the script anywhere.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=32, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=256, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2,
                 num_hidden_layers=8, vocab_size=4096, max_position_embeddings=2048),
}
WORDS = 2000  # the tokenizer's vocabulary (ids below the model's)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def build_model(folder: Path, shape: str, device: str, dtype: str) -> int:
    """A random-weight Llama of ``shape`` built on ``device`` and saved to ``folder``, with a
    word-level tokenizer; returns its parameter count."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="4GB")
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(WORDS - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(folder)
    return params


def write_calibration(path: Path, records: int, words: int) -> None:
    import random

    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(records):
            f.write(json.dumps({"task": "bench", "text": " ".join(f"w{rng.randrange(3, WORDS)}" for _ in range(words))})
                    + "\n")


def prune_once(model: Path, calib: Path, sparsity: float, out: Path, workdir: Path, device: str, samples: int
               ) -> dict:
    """One ``seap prune`` in this process: its stage timings and the GPU memory it used."""
    import torch

    from seap.run.oneshot import prune

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = prune(str(model), str(calib), sparsity, out, progress=False, device=device, samples=samples,
                   workdir=str(workdir))
    wall = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - before) if cuda else 0
    return {"sparsity": sparsity, "realised": result.realised_sparsity, "wall_s": round(wall, 1),
            "timings_s": {k: round(v, 1) for k, v in result.timings.items()}, "reused": result.cached,
            "peak_gpu_gib": round(peak / 2**30, 2), "dense_params": result.dense_params,
            "pruned_params": result.pruned_params}


def speed(model_dir: Path, pruned: dict[str, Path], device: str, dtype: str, prompt: int, new_tokens: int) -> dict:
    """Prefill and decode tokens/s of the dense model and each pruned one (best of three)."""
    import torch

    from seap.evaluation.speed import time_generate, time_prefill
    from seap.model.checkpoint import load_pruned
    from seap.model.loading import load_model

    ids = torch.randint(3, WORDS, (1, prompt))
    out = {}
    for name, path in {"dense": model_dir, **pruned}.items():
        loaded = load_model(str(path), device=device, dtype=dtype) if name == "dense" else \
            load_pruned(path, device=device, dtype=dtype)
        time_prefill(loaded, ids)  # warm-up
        time_generate(loaded, ids[:, :16], 4)
        prefill = min(time_prefill(loaded, ids) for _ in range(3))
        decode = min(time_generate(loaded, ids[:, :16], new_tokens) for _ in range(3))
        out[name] = {"prefill_tok_s": round(prompt / prefill, 1), "decode_tok_s": round(new_tokens / decode, 1)}
        del loaded
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b", help="default: %(default)s")
    parser.add_argument("--device", default="cuda", help="default: %(default)s")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--records", type=int, default=64, help="calibration records (default: %(default)s)")
    parser.add_argument("--words", type=int, default=256, help="words per record (default: %(default)s)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--prompt", type=int, default=1024, help="prefill tokens (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decoded tokens (default: %(default)s)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args(argv)
    if args.records < 1 or args.words < 1 or args.prompt < 1 or args.new_tokens < 1:
        _fail("--records, --words, --prompt and --new-tokens must be at least 1")
    if any(not 0 < s < 1 for s in args.sparsities):
        _fail("every sparsity must be in (0, 1)")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        _fail(f"--device {args.device}: no CUDA device here (use --shape tiny --device cpu to check the script)")
    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="seap-gpu-"))
    scratch.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                                "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"},
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "shape": args.shape}
    try:
        start = time.perf_counter()
        model = scratch / "model"
        report["params"] = build_model(model, args.shape, args.device, args.dtype)
        report["build_s"] = round(time.perf_counter() - start, 1)
        print(f"built {args.shape}: {report['params'] / 1e9:.2f} B parameters in {report['build_s']} s", flush=True)
        calib = scratch / "calib.jsonl"
        write_calibration(calib, args.records, args.words)
        runs, pruned = [], {}
        for sparsity in args.sparsities:
            out = scratch / f"pruned-{sparsity:g}"
            runs.append(prune_once(model, calib, sparsity, out, scratch / "work", args.device, args.records))
            pruned[f"pruned@{sparsity:g}"] = out
            print(json.dumps(runs[-1]), flush=True)
        layers = SHAPES[args.shape]["num_hidden_layers"]
        for run in runs:
            run["per_layer_s"] = {k: round(v / layers, 2) for k, v in run["timings_s"].items()
                                  if k in ("statistics", "refits", "checkpoint")}
        report["prune"] = runs
        report["speed"] = speed(model, pruned, args.device, args.dtype, args.prompt, args.new_tokens)
        report["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        report["total_s"] = round(time.perf_counter() - start, 1)
    finally:
        if args.workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{report['machine']['device']}, {args.shape}, {report['date']}; peak RSS {report['peak_rss_gib']} GiB, "
          f"{report['total_s']} s in all")
    print("| sparsity | realised | wall (s) | statistics / refits / checkpoint per layer (s) | peak GPU (GiB) |")
    print("|---|---|---|---|---|")
    for run in report["prune"]:
        per = run["per_layer_s"]
        print(f"| {run['sparsity']:.0%} | {run['realised']:.3f} | {run['wall_s']} | "
              f"{per.get('statistics', 0)} / {per.get('refits', 0)} / {per.get('checkpoint', 0)} | {run['peak_gpu_gib']} |")
    print("\n| model | prefill (tok/s) | decode (tok/s) |\n|---|---|---|")
    for name, s in report["speed"].items():
        print(f"| {name} | {s['prefill_tok_s']} | {s['decode_tok_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
