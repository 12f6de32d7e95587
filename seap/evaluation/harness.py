"""Evaluation in memory through lm-eval, and WikiText-2 perplexity under a stated protocol.

Any model object runs through lm-eval's ``HFLM`` without a save-and-reload: the dense
model, a soft- or hard-pruned one, or a routed bundle (:class:`seap.evaluation.routed.RoutedLM`).
Results carry acc and acc_norm per task, the number of items and of few-shot examples,
the lm-eval version and a fingerprint of the evaluation data.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from seap.errors import SeapError
from seap.evaluation.metrics import chance
from seap.io import sha256_file
from seap.model.loaded import LoadedModel
from seap.data.catalogue import TaskCatalogue, TaskSpec

DEFAULT_EVAL_BATCH_SIZE = 64  # packed rows per forward (SharedContextHFLM); sequences for plain HFLM
METRICS = ("acc", "acc_norm")


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def data_fingerprint(specs: Sequence[TaskSpec], limit: int | None, num_fewshot: int) -> str:
    """Hash of what was evaluated: task sources, evaluation files, limit and shots."""
    h = hashlib.sha256()
    for spec in sorted(specs, key=lambda s: s.name):
        h.update(f"{spec.name}|{spec.source}|{spec.lm_eval_task}|{spec.eval_split}|".encode())
        if spec.eval_file is not None:
            h.update(sha256_file(spec.eval_file).encode())
        elif spec.hub is not None:
            h.update(f"hub:{spec.hub}".encode())
    h.update(f"|limit={limit}|shots={num_fewshot}".encode())
    return "sha256:" + h.hexdigest()


def hflm(loaded: LoadedModel, batch_size: int = DEFAULT_EVAL_BATCH_SIZE, max_length: int | None = None,
         shared_context: bool = True) -> Any:
    """lm-eval's HFLM around a model object (no save/reload). With ``shared_context`` (the
    default), the multiple-choice loglikelihoods score each shared context once
    (:class:`seap.evaluation.loglikelihood.SharedContextHFLM`: the same numbers, fewer tokens)."""
    if shared_context:
        from seap.evaluation.loglikelihood import SharedContextHFLM as lm_class
    else:
        from lm_eval.models.huggingface import HFLM as lm_class

    kwargs: dict[str, Any] = {"pretrained": loaded.model, "tokenizer": loaded.tokenizer, "batch_size": batch_size}
    if max_length:
        kwargs["max_length"] = max_length
    return lm_class(**kwargs)


@functools.cache
def dispatching_lm_class() -> type:
    """The base of lm-eval ``LM`` s that hand groups of requests to other LMs: a subclass
    defines ``_dispatch(requests, method)`` and may use ``_answer`` to run each group on its LM
    and put the answers back in request order (lm-eval is imported on first use)."""
    from lm_eval.api.model import LM

    class DispatchingLM(LM):
        def _dispatch(self, requests: list[Any], method: str) -> list[Any]:
            raise NotImplementedError

        @staticmethod
        def _answer(requests: list[Any], groups: Mapping[Any, list[int]], lm_for: Any, method: str,
                    results: list[Any]) -> list[Any]:
            for name, idxs in groups.items():
                if not idxs:
                    continue
                outs = getattr(lm_for(name), method)([requests[i] for i in idxs])
                for i, out in zip(idxs, outs, strict=True):
                    results[i] = out
            return results

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            return self._dispatch(requests, "loglikelihood")

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            return self._dispatch(requests, "loglikelihood_rolling")

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            return self._dispatch(requests, "generate_until")

    return DispatchingLM


def evaluate_lm(
    lm: Any,
    registry: TaskCatalogue,
    specs: Sequence[TaskSpec],
    limit: int | None = None,
    num_fewshot: int = 0,
) -> dict[str, Any]:
    """Run lm-eval on ``specs`` with any lm-eval LM; returns metrics per task name."""
    from lm_eval import simple_evaluate

    if limit is not None and limit < 1:
        raise SeapError(f"limit must be at least 1, got {limit}", "pass --limit 1 or more, or no limit")
    if not specs:
        raise SeapError("no tasks to evaluate", "name at least one task")
    by_lm_name = {s.lm_eval_task: s for s in specs}
    start = time.perf_counter()
    try:
        raw = simple_evaluate(
            model=lm, tasks=list(by_lm_name), task_manager=registry.task_manager(), num_fewshot=num_fewshot,
            limit=limit, log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
            torch_random_seed=0, fewshot_random_seed=0,
        )
    except (ConnectionError, OSError) as exc:
        hub = [s.name for s in specs if s.source == "hub"]
        if not hub:
            raise
        raise SeapError(
            f"could not load hub task(s) {hub}: {str(exc).splitlines()[0][:200]}",
            "the Hugging Face hub is unreachable: pass a local copy with --data-dir (local:NAME)",
        ) from exc
    elapsed = time.perf_counter() - start
    tasks: dict[str, Any] = {}
    items: dict[str, list[dict[str, Any]]] = {}
    for lm_name, spec in by_lm_name.items():
        metrics = raw["results"].get(lm_name, {})
        n = raw.get("n-samples", {}).get(lm_name, {})
        entry: dict[str, Any] = {
            "n": int(n.get("effective", 0)) if n else None,
            "num_fewshot": int(raw.get("n-shot", {}).get(lm_name, num_fewshot)),
            "lm_eval_task": lm_name,
            "source": spec.source,
            "split": spec.eval_split,
        }
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name.endswith("_stderr") or name in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            entry[name] = float(value)
        if entry["n"] == 0:
            raise SeapError(f"task {spec.name!r} evaluated no items", "check its evaluation split and --limit")
        items[spec.name] = [_item(s) for s in raw.get("samples", {}).get(lm_name, [])]
        level = chance(items[spec.name])
        if level is not None:
            entry["chance"] = level
        tasks[spec.name] = entry
    return {
        "tasks": tasks,
        "items": items,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "lm_eval_version": lm_eval_version(),
        "data_fingerprint": data_fingerprint(specs, limit, num_fewshot),
        "seconds": round(elapsed, 2),
    }


def _item(sample: dict[str, Any]) -> dict[str, Any]:
    """One evaluated document: its id, per-item metrics and each choice's (loglikelihood, greedy)."""
    out: dict[str, Any] = {"doc_id": int(sample["doc_id"])}
    for name in METRICS:
        if isinstance(sample.get(name), (int, float)):
            out[name] = float(sample[name])
    resps = sample.get("filtered_resps") or []
    if resps and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in resps):
        out["resps"] = [[float(r[0]), bool(r[1])] for r in resps]
    return out


def evaluate(
    loaded: LoadedModel,
    registry: TaskCatalogue,
    specs: Sequence[TaskSpec],
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
) -> dict[str, Any]:
    """Evaluate one model (dense, soft- or hard-pruned) on the tasks, in memory."""
    multiple = [s for s in specs if s.kind != "multiple_choice"]
    if multiple:
        raise SeapError(f"task(s) {[s.name for s in multiple]} are not multiple-choice",
                        "evaluate WikiText-2 with seap.evaluation.harness.wikitext_perplexity; generative tasks are not supported yet")
    result = evaluate_lm(hflm(loaded, batch_size), registry, specs, limit, num_fewshot)
    result["model_fingerprint"] = loaded.fingerprint
    return result


# ---------------------------------------------------------------------------------------
# perplexity

PPL_PROTOCOL = ("WikiText-2 raw test, lines joined with '\\n\\n', tokenized once; windows of context_length tokens "
                "starting every stride tokens; a window scores the tokens after its first one that no earlier window "
                "scored (with stride = context_length: non-overlapping windows, as in SEAP's evaluate_ppl.py); "
                "perplexity = exp(mean negative log-likelihood per scored token).")


def wikitext_text(data_dir: str | Path) -> str:
    """The WikiText-2 raw test text from a benchmarks folder (line-level file preferred)."""
    from seap.data.corpus import read_records

    base = Path(data_dir) / "wikitext"
    line_level = base / "line_level" / "test.jsonl"
    if line_level.is_file():
        return "\n\n".join(str(r["text"]) for r in read_records(line_level))
    pages = base / "test.jsonl"
    if pages.is_file():
        return "\n\n".join(str(r["page"]) for r in read_records(pages))
    raise SeapError(f"no WikiText-2 test file under {base}", "put wikitext/line_level/test.jsonl (or test.jsonl) there")


def perplexity(
    loaded: LoadedModel,
    text: str,
    context_length: int = 512,
    stride: int = 512,
    max_windows: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Token-level perplexity of ``text`` with strided windows (see :data:`PPL_PROTOCOL`)."""
    if context_length < 2 or not 1 <= stride <= context_length:
        raise SeapError("need context_length >= 2 and 1 <= stride <= context_length",
                        "e.g. --context-length 512 --stride 512")
    ids = torch.tensor(loaded.tokenizer(text)["input_ids"], dtype=torch.long)
    if ids.numel() < 2:
        raise SeapError("the perplexity text has fewer than two tokens", "pass a longer text")
    device = next(loaded.model.parameters()).device
    nll_sum, scored, windows, prev_end = 0.0, 0, 0, 0
    starts = list(range(0, ids.numel() - 1, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    with torch.inference_mode():
        for begin in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
            end = min(begin + context_length, ids.numel())
            new = end - max(prev_end, begin + 1) if prev_end > begin else end - begin - 1
            if new <= 0:
                continue
            window = ids[begin:end].unsqueeze(0).to(device)
            logits = loaded.model(input_ids=window).logits[0, :-1].float()
            targets = window[0, 1:]
            losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            nll_sum += float(losses[-new:].sum())
            scored += new
            windows += 1
            prev_end = end
            if end == ids.numel():
                break
    return {"perplexity": math.exp(nll_sum / scored), "tokens_scored": scored, "windows": windows,
            "context_length": context_length, "stride": stride, "protocol": PPL_PROTOCOL}


def wikitext_perplexity(loaded: LoadedModel, data_dir: str | Path, context_length: int = 512, stride: int = 512,
                        max_windows: int | None = None, progress: bool = True) -> dict[str, Any]:
    result = perplexity(loaded, wikitext_text(data_dir), context_length, stride, max_windows, progress)
    result["dataset"] = "wikitext-2-raw-v1 test"
    return result


def training_prompts(registry: TaskCatalogue, specs: Sequence[TaskSpec], per_task: int = 500,
                     seed: int = 0) -> dict[str, list[str]]:
    """Router training texts: lm-eval's zero-shot context of training documents, per task.

    They are built exactly like the contexts the router sees at evaluation time (for tasks
    with one context per choice, such as WinoGrande, their common prefix), and come from
    the train split only.
    """
    import random

    from lm_eval.tasks import get_task_dict

    task_dict = get_task_dict([s.lm_eval_task for s in specs], registry.task_manager())
    prompts: dict[str, list[str]] = {}
    for spec in specs:
        task = task_dict[spec.lm_eval_task]
        if not task.has_training_docs():
            raise SeapError(f"task {spec.name!r} has no training split for the router", "give it a train split")
        docs = list(task.training_docs())
        if len(docs) > per_task:
            docs = random.Random(seed).sample(docs, per_task)
        texts = []
        for doc in docs:
            ctx = task.fewshot_context(doc, 0)
            texts.append(ctx if isinstance(ctx, str) else os.path.commonprefix(list(ctx)))
        prompts[spec.name] = texts
    return prompts
