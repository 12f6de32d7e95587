"""Benchmark: cost of activation-statistics collection against a plain forward pass.

Runs the same batches through the model's decoder twice per repeat, once plain and once
with the statistics hooks (SEAP's o_proj/down_proj input moments, collected while the loaded
model is walked one decoder layer at a time), and reports

* time ratio  = hooked time / plain time (target <= 1.15),
* peak memory during statistics against the model size (target: model + 1 GiB),

as ratios within one run. Usage::

    .venv/bin/python benchmarks/stats_overhead.py [--model smollm2-135m] [--batch-size 8]
        [--calib builtin | FILE.jsonl] [--samples 200] [--max-tokens 512] [--repeats 3]
        [--json OUT]

Statistics hold no second moments any more: a refit builds them for one layer at a time
while it walks the model (``seap.model.refitting.reconstruct_mask``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import psutil
import torch

from seap.model.batching import length_batches, pad_batch, tokenize_corpus
from seap.model.calibration import collect_statistics
from seap.data.corpus import CalibrationCorpus
from seap.model.loading import load_model
from seap.data.corpus import build_corpora


class PeakRSS:
    """Samples this process's resident memory in a thread and keeps the maximum."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process(os.getpid())

    def __enter__(self) -> "PeakRSS":
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def plain_pass(loaded, corpus: CalibrationCorpus, batch_size: int, max_tokens: int) -> float:
    """The forward the statistics pass makes, without hooks: decoder only, same batches."""
    ids = tokenize_corpus(loaded.tokenizer, corpus.texts, max_tokens)
    device = next(loaded.model.parameters()).device
    backbone = loaded.adapter.backbone(loaded.model)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in length_batches([len(x) for x in ids], batch_size):
            input_ids, mask = pad_batch([ids[j] for j in batch], loaded.tokenizer.pad_token_id, device)
            backbone(input_ids=input_ids, attention_mask=mask, use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def hooked_pass(loaded, corpus: CalibrationCorpus, batch_size: int, max_tokens: int, dtype: str) -> float:
    start = time.perf_counter()
    collect_statistics(loaded, corpus, batch_size, max_tokens, accumulate_dtype=dtype, progress=False)
    if next(loaded.model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="builtin")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accumulate-dtype", default="float64")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    corpora = build_corpora(args.calib, samples=args.samples)
    corpus = CalibrationCorpus("all", [t for c in corpora.values() for t in c.texts])
    n_tokens = sum(len(x) for x in tokenize_corpus(loaded.tokenizer, corpus.texts, args.max_tokens))
    model_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())

    plain_pass(loaded, corpus, args.batch_size, args.max_tokens)  # warm-up
    plain, hooked = [], []
    for _ in range(args.repeats):  # interleaved, so drift affects both alike
        plain.append(plain_pass(loaded, corpus, args.batch_size, args.max_tokens))
        hooked.append(hooked_pass(loaded, corpus, args.batch_size, args.max_tokens, args.accumulate_dtype))

    device = next(loaded.model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        hooked_pass(loaded, corpus, args.batch_size, args.max_tokens, args.accumulate_dtype)
        peak = torch.cuda.max_memory_allocated()
        baseline = model_bytes
        memory_kind = "cuda max_memory_allocated"
    else:
        baseline = psutil.Process(os.getpid()).memory_info().rss
        with PeakRSS() as rss:
            hooked_pass(loaded, corpus, args.batch_size, args.max_tokens, args.accumulate_dtype)
        peak = rss.peak
        memory_kind = "process RSS"

    p, h = statistics.median(plain), statistics.median(hooked)
    result = {
        "model": args.model,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "texts": len(corpus.texts),
        "tokens": n_tokens,
        "batch_size": args.batch_size,
        "accumulate_dtype": args.accumulate_dtype,
        "plain_forward_s": plain,
        "statistics_s": hooked,
        "median_plain_s": round(p, 3),
        "median_statistics_s": round(h, 3),
        "time_ratio": round(h / p, 3),
        "time_ratio_target": 1.15,
        "memory_kind": memory_kind,
        "model_bytes": model_bytes,
        "memory_before_statistics_bytes": baseline,
        "peak_memory_during_statistics_bytes": peak,
        "peak_minus_model_gib": round((peak - model_bytes) / 2**30, 3),
        "peak_increase_during_statistics_gib": round((peak - baseline) / 2**30, 3),
        "memory_target": "peak <= model size + 1 GiB",
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
