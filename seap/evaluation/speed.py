"""Speed: dense against pruned models in one run, on the same prompts.

* **prefill**: a batch of ``prefill_batch`` prompts of exactly ``prefill_tokens`` tokens,
  one forward pass that returns only the next-token logits (what ``generate`` does before
  decoding); tokens/s = batch x tokens / time.
* **decode**: batch 1, greedy, ``decode_tokens`` new tokens with the KV cache; the time of
  a 1-token generation (the prefill) is subtracted, so tokens/s counts generated tokens only.

Every repeat runs all models back to back (interleaved) and the median is reported, with
each model's ratio to the first (the dense model).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from seap.errors import SeapError
from seap.model.loaded import LoadedModel

DEFAULT_PROMPTS = (
    "The history of the city begins with a small settlement on the river, where traders from the north and the "
    "south met to exchange grain, salt and cloth. Over the centuries the market grew into a town with walls, a "
    "cathedral and a university, and its scholars became known across the continent for their work on astronomy, "
    "medicine and law. Today the old quarter attracts visitors from all over the world, who come to see the narrow "
    "streets, the painted houses and the great clock in the main square, which has marked the hours since the "
    "fifteenth century and still draws a crowd every day at noon."
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prefill_batch(tokenizer: Any, batch: int, tokens: int, prompts: Sequence[str] = (DEFAULT_PROMPTS,)) -> torch.Tensor:
    """``[batch, tokens]`` ids cut from the prompts (repeated as needed), different rows per prompt offset."""
    ids: list[int] = []
    while len(ids) < tokens + batch:
        for p in prompts:
            ids.extend(tokenizer(p)["input_ids"])
    return torch.tensor([ids[i : i + tokens] for i in range(batch)], dtype=torch.long)


def time_prefill(loaded: LoadedModel, input_ids: torch.Tensor) -> float:
    device = next(loaded.model.parameters()).device
    ids = input_ids.to(device)
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        loaded.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        _sync(device)
    return time.perf_counter() - start


def time_generate(loaded: LoadedModel, input_ids: torch.Tensor, new_tokens: int) -> float:
    device = next(loaded.model.parameters()).device
    ids = input_ids.to(device)
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
        _sync(device)
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError("generate() stopped early")
    return time.perf_counter() - start


def prunable_parameters(loaded: LoadedModel) -> int:
    """What pruning can remove: the q/k/v/o/gate/up/down weights, or an MoE model's routed experts."""
    from seap.model.adapters.moe import MoeAdapter

    if isinstance(loaded.adapter, MoeAdapter):
        return sum(int(m.experts.gate_up_proj.numel() + m.experts.down_proj.numel())
                   for m in loaded.adapter.moe_layers(loaded.model).values())
    return loaded.adapter.geometry(loaded.model).total_params()


def benchmark(
    models: Mapping[str, LoadedModel],
    prefill_batch_size: int = 4,
    prefill_tokens: int = 128,
    decode_tokens: int = 32,
    decode_prompt_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    prompts: Sequence[str] = (DEFAULT_PROMPTS,),
) -> dict[str, Any]:
    """Median prefill and decode tokens/s of each model, and ratios to the first one."""
    if not models:
        raise SeapError("nothing to benchmark", "pass at least one model")
    if min(prefill_batch_size, prefill_tokens, decode_tokens, repeats) < 1 or decode_tokens < 2:
        raise SeapError("benchmark sizes must be positive (decode_tokens >= 2)", "check the bench options")
    first = next(iter(models.values()))
    prefill_ids = prefill_batch(first.tokenizer, prefill_batch_size, prefill_tokens, prompts)
    decode_ids = prefill_batch(first.tokenizer, 1, decode_prompt_tokens, prompts)
    times: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in models}
    for round_ in range(warmup + repeats):
        for name, loaded in models.items():
            prefill = time_prefill(loaded, prefill_ids)
            gen_one = time_generate(loaded, decode_ids, 1)
            gen_all = time_generate(loaded, decode_ids, decode_tokens)
            if round_ >= warmup:
                times[name]["prefill"].append(prefill)
                times[name]["decode"].append(max(gen_all - gen_one, 1e-9))
    results: dict[str, Any] = {}
    base = None
    for name, t in times.items():
        prefill_tps = prefill_batch_size * prefill_tokens / statistics.median(t["prefill"])
        decode_tps = (decode_tokens - 1) / statistics.median(t["decode"])
        loaded = models[name]
        results[name] = {
            "prefill_tokens_per_s": prefill_tps,
            "decode_tokens_per_s": decode_tps,
            "prefill_seconds": t["prefill"],
            "decode_seconds": t["decode"],
            "params": sum(p.numel() for p in loaded.model.parameters()),
            "bytes": sum(p.numel() * p.element_size() for p in loaded.model.parameters()),
            "prunable_params": prunable_parameters(loaded),
            "realised_sparsity": (getattr(loaded.model.config, "seap_pruning", None) or {}).get("realised_sparsity", 0.0),
        }
        if base is None:
            base = results[name]
        results[name]["prefill_speedup"] = prefill_tps / base["prefill_tokens_per_s"]
        results[name]["decode_speedup"] = decode_tps / base["decode_tokens_per_s"]
    device = next(first.model.parameters()).device
    return {
        "models": results,
        "reference": next(iter(models)),
        "setup": {
            "prefill": f"batch {prefill_batch_size} x {prefill_tokens} tokens, next-token logits only",
            "decode": f"batch 1, greedy, {decode_tokens} new tokens after a {decode_prompt_tokens}-token prompt, "
                      "prefill time subtracted",
            "repeats": repeats, "warmup": warmup, "statistic": "median",
            "device": str(device), "dtype": str(next(first.model.parameters()).dtype),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
        },
    }


def llama_cpp_speed(models: Mapping[str, LoadedModel], build: Any, prompt_tokens: int = 128, gen_tokens: int = 32,
                    repetitions: int = 5, threads: int | None = None) -> dict[str, Any]:
    """The same models in llama.cpp, in one ``llama-bench`` run: each exported to a float16 GGUF file
    (:func:`seap.export.to_gguf.export_gguf`) in a temporary folder; prompt processing of
    ``prompt_tokens`` and generation of ``gen_tokens`` tokens/s, and ratios to the first model."""
    import tempfile
    from pathlib import Path

    from seap.export.to_gguf import export_gguf

    with tempfile.TemporaryDirectory(prefix="seap-bench-gguf-") as tmp:
        paths = {name: export_gguf(loaded, Path(tmp) / f"model-{i}.gguf") for i, (name, loaded) in enumerate(models.items())}
        return llama_cpp_speed_of_files(paths, build, prompt_tokens, gen_tokens, repetitions, threads)


def llama_cpp_speed_of_files(paths: Mapping[str, Any], build: Any, prompt_tokens: int = 128, gen_tokens: int = 32,
                             repetitions: int = 5, threads: int | None = None) -> dict[str, Any]:
    """GGUF files (name -> path, the first the reference) timed in one ``llama-bench`` run, as
    :func:`llama_cpp_speed` reports them."""
    from seap.evaluation.llama_cpp_runtime import llama_bench

    models = list(paths)
    rows = llama_bench(build, list(paths.values()), prompt_tokens, gen_tokens, repetitions, threads)
    results: dict[str, Any] = {}
    first = rows[0]
    for name, row in zip(models, rows, strict=True):
        results[name] = {k: row[k] for k in ("prefill_tokens_per_s", "prefill_tokens_per_s_sd", "decode_tokens_per_s",
                                            "decode_tokens_per_s_sd", "params", "bytes")}
        results[name]["prefill_speedup"] = row["prefill_tokens_per_s"] / first["prefill_tokens_per_s"]
        results[name]["decode_speedup"] = row["decode_tokens_per_s"] / first["decode_tokens_per_s"]
    return {"models": results, "setup": {
        "engine": build.describe(), "tool": "llama-bench", "format": "GGUF float16",
        "prefill": f"{prompt_tokens}-token prompt processing", "decode": f"{gen_tokens} generated tokens",
        "repetitions": repetitions, "statistic": "mean", "threads": first.get("threads"),
        "cpu": platform.processor() or platform.machine()}}
