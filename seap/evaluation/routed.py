"""Routed inference: the router picks an expert mask per input, falling back to the general mask.

The base model is loaded once. :class:`ExpertBank` derives each expert from its mask on
demand (sharing the base's unpruned tensors) and keeps a small LRU cache of materialised
experts, so switching never reloads anything from disk. :class:`RoutedLM` plugs the bank
and the router into lm-eval: every document is routed on its own prompt text (never on
its task label), so the accuracy it reports includes routing errors.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from seap.errors import SeapError
from seap.maths.mask_formats import Mask
from seap.model.loaded import LoadedModel
from seap.model.masking import apply_mask
from seap.evaluation.router import Router, RoutingDecision

GENERAL = "general"


class ExpertBank:
    """Experts derived from one base model and their masks, with an LRU cache."""

    def __init__(self, base: LoadedModel, experts: Mapping[str, Mask], general: Mask | None = None,
                 cache_size: int = 2, mode: str = "hard") -> None:
        if cache_size < 1:
            raise SeapError(f"cache size must be at least 1, got {cache_size}", "pass --cache-size 1 or more")
        self.base = base
        self.masks: dict[str, Mask] = dict(experts)
        if general is not None:
            self.masks[GENERAL] = general
        for name, mask in self.masks.items():
            try:
                mask.check_model(base.fingerprint)
            except SeapError as exc:
                raise type(exc)(f"expert {name!r}: {exc.problem}", exc.fix) from None
        self.cache_size = cache_size
        self.mode = mode
        self._cache: OrderedDict[str, LoadedModel] = OrderedDict()
        self.materialisations: dict[str, int] = {name: 0 for name in self.masks}

    @property
    def tasks(self) -> list[str]:
        return sorted(n for n in self.masks if n != GENERAL)

    def get(self, name: str) -> LoadedModel:
        """The materialised expert ``name`` (derived from the in-memory base on a cache miss)."""
        if name not in self.masks:
            raise SeapError(f"no expert {name!r}", f"experts: {', '.join(self.masks)}")
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        expert = apply_mask(self.base, self.masks[name], self.mode)
        self.materialisations[name] += 1
        self._cache[name] = expert
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return expert


def _common_prefix(texts: Sequence[str]) -> str:
    return os.path.commonprefix(list(texts)) if len(texts) > 1 else texts[0]


class PatternRouter:
    """TAER (PreMoe's task-adaptive expert retrieval) as a router of a routed model: each task's
    expert mask stores its routing pattern (the first MoE layer's mean router probabilities on
    the task's corpus); a query's pattern is taken from its first ``prefix_tokens`` tokens in one
    forward pass of the base, and the nearest stored task wins
    (:func:`seap.maths.expert_selection.nearest_pattern`), the general mask below ``threshold``."""

    def __init__(self, patterns: Mapping[str, Any], base_fingerprint: str, threshold: float = 0.1,
                 prefix_tokens: int = 32) -> None:
        import torch

        self.patterns = {task: torch.as_tensor(p, dtype=torch.float64) for task, p in patterns.items()}
        self.base_fingerprint, self.threshold, self.prefix_tokens = base_fingerprint, threshold, prefix_tokens
        self.tasks = sorted(self.patterns)

    @classmethod
    def from_masks(cls, experts: Mapping[str, Any], threshold: float = 0.1, prefix_tokens: int = 32) -> PatternRouter:
        """From each task's expert mask (an :class:`~seap.maths.expert_selection.ExpertMask` with a stored pattern)."""
        missing = [t for t, m in experts.items() if not (getattr(m, "meta", None) or {}).get("pattern")]
        if missing:
            raise SeapError(f"expert masks of {', '.join(missing)} store no routing pattern",
                            "rebuild them from router statistics (an MoE model, any unit), or use the feature router")
        (fingerprint,) = {m.base_fingerprint for m in experts.values()}
        return cls({t: m.meta["pattern"] for t, m in experts.items()}, fingerprint, threshold, prefix_tokens)

    def check_model(self, fingerprint: str) -> None:
        if fingerprint != self.base_fingerprint:
            from seap.errors import ModelMismatchError

            raise ModelMismatchError("the stored expert patterns come from another base model",
                                     "rebuild the expert masks on this model")

    def check_tasks(self, tasks: Sequence[str]) -> None:
        if sorted(tasks) != self.tasks:
            raise SeapError(f"patterns are stored for tasks {self.tasks}, the experts are for {sorted(tasks)}",
                            "pass the experts whose patterns are stored")

    def route(self, loaded: LoadedModel, texts: Sequence[str], threshold: float | None = None) -> list[RoutingDecision]:
        from seap.data.corpus import CalibrationCorpus
        from seap.maths.expert_selection import nearest_pattern, pattern_vector
        from seap.model.expert_pruning import collect_router_statistics

        cut = self.threshold if threshold is None else threshold
        out = []
        for text in texts:
            stats = collect_router_statistics(loaded, CalibrationCorpus("query", [text]), batch_size=1,
                                              max_tokens=self.prefix_tokens, reap=False, progress=False)
            task, confidence, _ = nearest_pattern(pattern_vector(stats), self.patterns)
            out.append(RoutingDecision(task if confidence >= cut else None, task, confidence))
        return out


DEFAULT_GENERATE_BATCH = 16  # prompts per generate() call


def generate_greedy(loaded: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 32,
                    batch_size: int = DEFAULT_GENERATE_BATCH, **kwargs: Any) -> list[str]:
    """Greedy continuations of ``prompts`` with one model, ``batch_size`` prompts per ``generate``
    call (left-padded, so every prompt ends where its continuation starts); in input order."""
    import torch

    if batch_size < 1:
        raise SeapError(f"batch size must be at least 1, got {batch_size}", "pass e.g. 16")
    tokenizer = loaded.tokenizer
    device = next(loaded.model.parameters()).device
    side = tokenizer.padding_side
    out: list[str] = []
    try:
        tokenizer.padding_side = "left"
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True).to(device)
            with torch.inference_mode():
                ids = loaded.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                            pad_token_id=tokenizer.pad_token_id, **kwargs)
            width = batch["input_ids"].shape[1]
            out += [tokenizer.decode(row[width:], skip_special_tokens=True) for row in ids]
    finally:
        tokenizer.padding_side = side
    return out


class RoutedModel:
    """Router + expert bank: pick an expert per input and run it."""

    def __init__(self, bank: ExpertBank, router: Router | PatternRouter, threshold: float | None = None) -> None:
        router.check_model(bank.base.fingerprint)
        router.check_tasks(bank.tasks)
        if threshold is not None and GENERAL not in bank.masks:
            raise SeapError("a confidence threshold needs a general mask to fall back to", "pass the general mask")
        self.bank, self.router = bank, router
        self.threshold = router.threshold if threshold is None else threshold
        self.routing_seconds = 0.0

    def choose(self, texts: Sequence[str]) -> list[RoutingDecision]:
        start = time.perf_counter()
        decisions = self.router.route(self.bank.base, texts, self.threshold)
        if GENERAL not in self.bank.masks:  # no fallback: always the top expert
            decisions = [RoutingDecision(d.predicted, d.predicted, d.confidence) for d in decisions]
        self.routing_seconds += time.perf_counter() - start
        return decisions

    def expert_for(self, decision: RoutingDecision) -> str:
        return decision.task if decision.task is not None else GENERAL

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = DEFAULT_GENERATE_BATCH,
                 **kwargs: Any) -> list[dict[str, Any]]:
        """Greedy generation, each prompt with its routed expert: the prompts are routed together,
        grouped by expert, and each group generated in batches (every expert materialised once per
        call); the answers come back in input order."""
        decisions = self.choose(prompts)
        groups: dict[str, list[int]] = {}
        for i, decision in enumerate(decisions):
            groups.setdefault(self.expert_for(decision), []).append(i)
        texts: dict[int, str] = {}
        for name, members in groups.items():
            answers = generate_greedy(self.bank.get(name), [prompts[i] for i in members], max_new_tokens, batch_size,
                                      **kwargs)
            texts.update(zip(members, answers, strict=True))
        return [{"prompt": prompt, "expert": self.expert_for(d), "confidence": d.confidence, "text": texts[i]}
                for i, (prompt, d) in enumerate(zip(prompts, decisions, strict=True))]


def make_routed_lm(routed: RoutedModel, task_of: Mapping[str, str], batch_size: int = 64,
                   known: Mapping[tuple[str, int], Sequence[Sequence[Any]]] | None = None) -> Any:
    """An lm-eval ``LM`` that routes each document; ``task_of`` maps lm-eval task names to task names.

    ``known`` holds, per ``(task, doc_id)``, the responses of that task's own expert (from its
    evaluation row, one ``[loglikelihood, is_greedy]`` per choice): a document the router
    sends to its own task's expert is answered from them instead of being computed again,
    since that expert would compute the same numbers. Every document is still routed.
    """
    reuse = dict(known or {})
    from seap.evaluation.harness import dispatching_lm_class, hflm

    class RoutedLM(dispatching_lm_class()):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.log: list[dict[str, Any]] = []
            self.reused = 0  # documents answered from the own expert's stored responses
            self._lms: dict[int, Any] = {}

        def _lm_for(self, name: str) -> Any:
            expert = routed.bank.get(name)
            key = id(expert.model)
            if key not in self._lms:
                self._lms = {k: v for k, v in self._lms.items() if k in {id(m.model) for m in routed.bank._cache.values()}}
                self._lms[key] = hflm(expert, batch_size)
            return self._lms[key]

        def _dispatch(self, requests: list[Any], method: str) -> list[Any]:
            docs: dict[tuple[str, int], list[int]] = {}
            for i, req in enumerate(requests):
                docs.setdefault((req.task_name, req.doc_id), []).append(i)
            keys = list(docs)
            texts = [_common_prefix([requests[i].args[0] for i in docs[k]]) for k in keys]
            decisions = routed.choose(texts)
            groups: dict[str, list[int]] = {}
            for key, decision in zip(keys, decisions, strict=True):
                expert = routed.expert_for(decision)
                groups.setdefault(expert, []).extend(docs[key])
                self.log.append({"task": task_of.get(key[0], key[0]), "doc_id": key[1], "expert": expert,
                                 "predicted": decision.predicted, "confidence": decision.confidence})
            results: list[Any] = [None] * len(requests)
            if method == "loglikelihood" and reuse:
                answered: set[int] = set()
                for key, decision in zip(keys, decisions, strict=True):
                    task = task_of.get(key[0], key[0])
                    stored = reuse.get((task, key[1]))
                    idxs = docs[key]
                    if routed.expert_for(decision) != task or stored is None or len(stored) != len(idxs):
                        continue
                    for i in idxs:
                        ll, greedy = stored[requests[i].idx]
                        results[i] = (float(ll), bool(greedy))
                    self.reused += 1
                    answered.update(idxs)
                groups = {e: [i for i in idxs if i not in answered] for e, idxs in groups.items()}
            return self._answer(requests, groups, self._lm_for, method, results)

    return RoutedLM()


def routing_summary(log: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """Routing accuracy per task (own expert chosen), fallback rate, and where documents went."""
    per_task: dict[str, Any] = {}
    for task in tasks:
        rows = [r for r in log if r["task"] == task]
        if not rows:
            continue
        per_task[task] = {
            "docs": len(rows),
            "routed_to_own_expert": sum(r["expert"] == task for r in rows) / len(rows),
            "predicted_own_task": sum(r["predicted"] == task for r in rows) / len(rows),
            "fallback_to_general": sum(r["expert"] == GENERAL for r in rows) / len(rows),
            "experts": {e: sum(r["expert"] == e for r in rows) for e in sorted({r["expert"] for r in rows})},
        }
    n = len(log)
    return {
        "docs": n,
        "routing_accuracy": sum(r["predicted"] == r["task"] for r in log) / n if n else None,
        "own_expert_rate": sum(r["expert"] == r["task"] for r in log) / n if n else None,
        "fallback_rate": sum(r["expert"] == GENERAL for r in log) / n if n else None,
        "per_task": per_task,
    }
