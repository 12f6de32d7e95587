"""The task router: mean-pooled input embeddings into a multinomial logistic regression.

As in SEAP (method notes §8): each prompt is embedded with the model's own input embedding
table (layer 0) or, optionally, the hidden state after decoder layer ``feature_layer``,
mean-pooled over its tokens, standardised, and classified by a multinomial logistic
regression trained with scikit-learn. The trained router is stored as a tensor artifact
(weights, bias, standardisation) and applied with plain torch, so loading it never
unpickles anything.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from seap.artifacts import ArtifactKind, read_artifact, require, write_artifact
from seap.model.batching import length_batches, pad_batch
from seap.errors import ModelMismatchError, SeapError
from seap.io import short_hash
from seap.model.loaded import LoadedModel

ROUTER_ARTIFACT = ArtifactKind("seap-router", 1, "router.safetensors", "router.json", "retrain it with `seap router`")
DEFAULT_THRESHOLD = 0.5


def featurize(loaded: LoadedModel, texts: Sequence[str], feature_layer: int = 0, batch_size: int = 16,
              max_tokens: int = 256) -> torch.Tensor:
    """Mean-pooled features ``[len(texts), hidden]`` (float32, on CPU)."""
    hidden = loaded.adapter.text_config(loaded.model.config).hidden_size
    if not texts:
        return torch.zeros(0, hidden)
    n_layers = len(loaded.adapter.decoder_layers(loaded.model))
    if not 0 <= feature_layer <= n_layers:
        raise SeapError(f"feature layer {feature_layer} is outside 0..{n_layers}", "use 0 (input embeddings) or a layer index")
    ids = [loaded.tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"] or [loaded.tokenizer.pad_token_id]
           for t in texts]
    device = next(loaded.model.parameters()).device
    out = torch.zeros(len(texts), hidden)
    embed = loaded.model.get_input_embeddings()
    backbone = loaded.adapter.backbone(loaded.model)
    with torch.inference_mode():
        for batch in length_batches([len(x) for x in ids], batch_size):
            input_ids, mask = pad_batch([ids[j] for j in batch], loaded.tokenizer.pad_token_id or 0, device)
            if feature_layer == 0:
                hidden = embed(input_ids)
            else:
                hidden = backbone(input_ids=input_ids, attention_mask=mask, output_hidden_states=True,
                                  use_cache=False).hidden_states[feature_layer]
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
            out[batch] = pooled.float().cpu()
    return out


@dataclass
class RoutingDecision:
    task: str | None  # None: below the threshold, use the general mask
    predicted: str  # the most probable task, even below the threshold
    confidence: float


@dataclass
class Router:
    """A trained router; ``tasks[i]`` is class ``i``."""

    tasks: list[str]
    weight: torch.Tensor  # [K, D]
    bias: torch.Tensor  # [K]
    mean: torch.Tensor  # [D] feature standardisation
    scale: torch.Tensor  # [D]
    feature_layer: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def base_fingerprint(self) -> str:
        return str(self.meta["base_fingerprint"])

    @property
    def threshold(self) -> float:
        return float(self.meta.get("threshold", DEFAULT_THRESHOLD))

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        z = (features.float() - self.mean) / self.scale
        if len(self.tasks) == 1:
            return torch.ones(features.shape[0], 1)
        return torch.softmax(z @ self.weight.T + self.bias, dim=-1)

    def check_model(self, fingerprint: str) -> None:
        if fingerprint != self.base_fingerprint:
            raise ModelMismatchError(
                f"router was trained on base model {short_hash(self.base_fingerprint)}, not {short_hash(fingerprint)}",
                "retrain the router on this model (`seap router`)",
            )

    def check_tasks(self, tasks: Sequence[str]) -> None:
        if sorted(tasks) != sorted(self.tasks):
            raise SeapError(f"router was trained for tasks {self.tasks}, the experts are for {sorted(tasks)}",
                            "retrain the router for these tasks, or pass the matching experts")

    def route(self, loaded: LoadedModel, texts: Sequence[str], threshold: float | None = None,
              batch_size: int = 16) -> list[RoutingDecision]:
        """The expert task for each text, or ``None`` (general) below the confidence threshold."""
        cut = self.threshold if threshold is None else threshold
        probs = self.probabilities(featurize(loaded, texts, self.feature_layer, batch_size))
        conf, idx = probs.max(dim=-1)
        return [RoutingDecision(self.tasks[i] if c >= cut else None, self.tasks[i], float(c))
                for c, i in zip(conf.tolist(), idx.tolist(), strict=True)]

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        tensors = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "scale": self.scale}
        meta = {**self.meta, "tasks": self.tasks, "feature_layer": self.feature_layer}
        return write_artifact(ROUTER_ARTIFACT, path, tensors, meta, overwrite)

    @classmethod
    def load(cls, path: str | Path) -> Router:
        t, meta = read_artifact(ROUTER_ARTIFACT, path)
        tasks = list(meta.pop("tasks"))
        layer = int(meta.pop("feature_layer"))
        get = [require(t, k, ROUTER_ARTIFACT) for k in ("weight", "bias", "mean", "scale")]
        return cls(tasks, *get, feature_layer=layer, meta=meta)


def train_router(
    loaded: LoadedModel,
    prompts: Mapping[str, Sequence[str]],
    feature_layer: int = 0,
    holdout: float = 0.2,
    seed: int = 0,
    balance: bool = True,
    C: float = 1.0,
    threshold: float = DEFAULT_THRESHOLD,
) -> Router:
    """Train on prompts per task; report held-out accuracy overall and per task.

    With ``balance`` every task is down-sampled to the smallest one (as SEAP does).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    tasks = sorted(prompts)
    if len(tasks) < 2:
        raise SeapError("a router needs at least two tasks", "pass prompts of two or more tasks")
    if not 0 < holdout < 1:
        raise SeapError(f"holdout must be in (0, 1), got {holdout}", "e.g. 0.2")
    rng = random.Random(seed)
    n_min = min(len(prompts[t]) for t in tasks)
    if n_min < 5:
        raise SeapError(f"task {min(tasks, key=lambda t: len(prompts[t]))!r} has only {n_min} router prompts",
                        "give every task at least 5 prompts")
    texts, labels = [], []
    for k, task in enumerate(tasks):
        items = list(prompts[task])
        if balance and len(items) > n_min:
            items = rng.sample(items, n_min)
        texts.extend(items)
        labels.extend([k] * len(items))
    start = time.perf_counter()
    features = featurize(loaded, texts, feature_layer)
    feature_seconds = time.perf_counter() - start
    y = torch.tensor(labels)
    idx_train, idx_test = train_test_split(list(range(len(texts))), test_size=holdout, random_state=seed, stratify=labels)
    x_train = features[idx_train]
    mean = x_train.mean(dim=0)
    scale = x_train.std(dim=0).clamp(min=1e-6)
    clf = LogisticRegression(max_iter=1000, C=C, random_state=seed)
    clf.fit(((x_train - mean) / scale).numpy(), y[idx_train].numpy())
    router = Router(tasks, torch.tensor(clf.coef_, dtype=torch.float32), torch.tensor(clf.intercept_, dtype=torch.float32),
                    mean, scale, feature_layer)
    if router.weight.shape[0] == 1:  # sklearn's binary case: one row for class 1
        router.weight = torch.cat([-router.weight / 2, router.weight / 2])
        router.bias = torch.cat([-router.bias / 2, router.bias / 2])
    pred = router.probabilities(features[idx_test]).argmax(dim=-1)
    truth = y[idx_test]
    per_task = {t: float((pred[truth == k] == k).float().mean()) for k, t in enumerate(tasks)}
    confusion = [[int(((truth == a) & (pred == b)).sum()) for b in range(len(tasks))] for a in range(len(tasks))]
    router.meta = {
        "base_fingerprint": loaded.fingerprint,
        "threshold": threshold,
        "heldout_accuracy": float((pred == truth).float().mean()),
        "heldout_accuracy_per_task": per_task,
        "confusion": confusion,
        "n_train": len(idx_train),
        "n_heldout": len(idx_test),
        "per_task_samples": n_min if balance else {t: len(prompts[t]) for t in tasks},
        "C": C,
        "seed": seed,
        "feature_seconds": round(feature_seconds, 3),
    }
    return router
