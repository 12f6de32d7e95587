"""Expert bundles: what a registered model version holds, and how it becomes a model again.

A bundle is a small folder, like a PEFT adapter: the masks (and, for a routed bundle, the
router) plus ``bundle.json``, a reference to the base model with its fingerprint. It never
holds the base weights. :func:`load_bundle` loads the base, checks its fingerprint and
derives the pruned expert (or every expert and the router) from it::

    bundle.json        {"format": "seap-bundle", "kind": "expert"|"general"|"routed", "task": ...,
                        "base": {"reference": "smollm2-135m", "fingerprint": "sha256:...", ...},
                        "masks": {"capitals": "masks/capitals"}, "router": null, ...}
    masks/<name>/      mask artifacts (safetensors + JSON)
    router/            router artifact (routed bundles)

The MLflow pyfunc model (``mlflow/seap_model.py``) is a thin wrapper over this module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seap.errors import ArtifactError, ModelMismatchError, SeapError
from seap.io import atomic_directory, copy_artifact, read_json, short_hash
from seap.registry.records import ExpertRecord

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "seap-bundle"
BUNDLE_VERSION = 1
#: overrides where the base model is read from when loading a bundle (the fingerprint is still checked)
BASE_OVERRIDE_ENV = "SEAP_BASE_MODEL"


def base_reference(model: str) -> str:
    """How a bundle refers to its base: a hub id or built-in alias as given, a local path made absolute."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def write_bundle(record: ExpertRecord, out: str | Path, dtype: str = "auto") -> Path:
    """Write the bundle of ``record`` (copies of its masks and router, and bundle.json) atomically."""
    with atomic_directory(out, overwrite=True) as tmp:
        masks = {}
        for name, path in sorted(record.masks.items()):
            copy_artifact(path, tmp / "masks" / name)
            masks[name] = f"masks/{name}"
        if record.router:
            copy_artifact(record.router, tmp / "router")
        data = {
            "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "name": record.name, "kind": record.kind,
            "task": record.task, "tasks": record.evaluated_tasks, "method": record.method,
            "sparsity": record.sparsity, "realised_sparsity": record.realised_sparsity, "score": record.score,
            "schedule": record.schedule, "masks": masks, "router": "router" if record.router else None,
            "base": {"reference": base_reference(record.base_model), "fingerprint": record.base_fingerprint,
                     "dtype": dtype},
            "metrics": record.metrics, "version_key": record.version_key(),
        }
        (tmp / BUNDLE_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return Path(out)


@dataclass
class Bundle:
    """A bundle read from disk (paths resolved), not yet loaded."""

    path: Path
    data: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.data["kind"])

    @property
    def base_fingerprint(self) -> str:
        return str(self.data["base"]["fingerprint"])

    @property
    def base_reference(self) -> str:
        return str(self.data["base"]["reference"])

    @property
    def masks(self) -> dict[str, Path]:
        return {name: self.path / rel for name, rel in self.data["masks"].items()}

    @property
    def router(self) -> Path | None:
        return self.path / self.data["router"] if self.data.get("router") else None


def read_bundle(path: str | Path) -> Bundle:
    """Read ``bundle.json`` and check that every mask and the router belong to the recorded base."""
    from seap.maths.mask_formats import load_mask
    from seap.evaluation.router import Router

    folder = Path(path)
    data = read_json(folder / BUNDLE_FILE, "expert bundle")
    if data.get("format") != BUNDLE_FORMAT:
        raise ArtifactError(f"{folder} is not a SEAP expert bundle (format {data.get('format')!r})",
                            "pass the folder of a registered SEAP version")
    if int(data.get("format_version", 0)) > BUNDLE_VERSION:
        raise ArtifactError(f"bundle format version {data['format_version']} is newer than this seap "
                            f"({BUNDLE_VERSION})", "upgrade seap")
    bundle = Bundle(folder, data)
    for name, mask_dir in bundle.masks.items():
        mask = load_mask(mask_dir)
        if mask.base_fingerprint != bundle.base_fingerprint:
            raise ModelMismatchError(
                f"bundle {folder}: mask {name!r} was built on base {short_hash(mask.base_fingerprint)}, "
                f"but the bundle names base {short_hash(bundle.base_fingerprint)}",
                "re-register the expert from the pipeline's results (`seap register`)")
    if bundle.router is not None:
        router = Router.load(bundle.router)
        if router.base_fingerprint != bundle.base_fingerprint:
            raise ModelMismatchError(
                f"bundle {folder}: the router was trained on base {short_hash(router.base_fingerprint)}, "
                f"but the bundle names base {short_hash(bundle.base_fingerprint)}",
                "re-register the routed bundle from the pipeline's results (`seap register`)")
    return bundle


def load_base(bundle: Bundle, device: str | None = "auto", base_model: str | None = None) -> Any:
    """Load the bundle's base model (``base_model`` or ``$SEAP_BASE_MODEL`` overrides the
    location) and refuse it unless its fingerprint is the recorded one."""
    from seap.model.loading import load_model

    reference = base_model or os.environ.get(BASE_OVERRIDE_ENV) or bundle.base_reference
    try:
        base = load_model(reference, device=device, dtype=bundle.data["base"].get("dtype", "auto"))
    except SeapError as exc:
        raise SeapError(f"cannot load the base model of this expert ({reference}): {exc.problem}",
                        f"{exc.fix}; or set {BASE_OVERRIDE_ENV} to where the base model is") from None
    if base.fingerprint != bundle.base_fingerprint:
        raise ModelMismatchError(
            f"base model {reference} has fingerprint {short_hash(base.fingerprint)}, but this expert was "
            f"built on {short_hash(bundle.base_fingerprint)}",
            f"point {BASE_OVERRIDE_ENV} at the exact base model the pipeline pruned, or re-run the pipeline "
            "on this base")
    return base


MAX_NEW_TOKENS = 4096  # the most new tokens one request may ask for
EXPERT_CACHE_ENV = "SEAP_EXPERT_CACHE"  # most experts a served routed bundle keeps materialised (default: all)


class BundleModel:
    """A loaded bundle: the pruned expert (or routed experts) ready to generate."""

    def __init__(self, bundle: Bundle, device: str | None = "auto", base_model: str | None = None,
                 cache_size: int | None = None) -> None:
        from seap.maths.mask_formats import load_mask
        from seap.model.masking import apply_mask
        from seap.evaluation.router import Router
        from seap.evaluation.routed import GENERAL, ExpertBank, RoutedModel

        self.bundle = bundle
        self.base = load_base(bundle, device, base_model)
        masks = {name: load_mask(p) for name, p in bundle.masks.items()}
        self.routed = None
        self.expert = None
        if bundle.kind == "routed":
            general = masks.pop(GENERAL, None)
            # a server keeps every expert materialised by default (a mixed batch uses them all; each holds
            # only its own pruned layers); SEAP_EXPERT_CACHE caps how many stay in memory
            limit = cache_size or int(os.environ.get(EXPERT_CACHE_ENV, 0)) or len(masks) + (general is not None)
            bank = ExpertBank(self.base, masks, general, cache_size=limit)
            self.routed = RoutedModel(bank, Router.load(bundle.router))  # type: ignore[arg-type]
        else:
            (name, mask), = masks.items()
            self.name = name
            self.expert = apply_mask(self.base, mask, "hard", bias_compensation=mask.has_bias_compensation)

    @property
    def tasks(self) -> list[str]:
        """The experts a request may name (``task``): a routed bundle's, the general mask's, or the one expert's."""
        if self.routed is not None:
            return sorted(self.routed.bank.masks)
        return [self.name]

    def check_request(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int | None,
                      task: str | None) -> None:
        """Refuse a request that cannot be answered, naming why (the server answers it with 400):
        no prompts, an empty prompt, a prompt that leaves no room for ``max_new_tokens`` in the
        model's context, a bad count, an unknown ``task``."""
        if not prompts:
            raise SeapError("the request holds no prompts", 'send {"inputs": ["a prompt", ...]}')
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise SeapError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}", "pass e.g. 32")
        if batch_size is not None and batch_size < 1:
            raise SeapError(f"batch_size must be at least 1, got {batch_size}", "pass e.g. 16")
        if task is not None and task not in self.tasks:
            raise SeapError(f"unknown task {task!r}", f"name one of: {', '.join(self.tasks)}, or leave task out to route")
        context = int(getattr(self.base.adapter.text_config(self.base.config), "max_position_embeddings", 0) or 0)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise SeapError(f"prompt {i} is empty", "send a non-empty string for every prompt")
            if context:
                tokens = len(self.base.tokenizer(prompt)["input_ids"])
                if tokens + max_new_tokens > context:
                    raise SeapError(f"prompt {i} is {tokens} tokens long; with max_new_tokens {max_new_tokens} it "
                                    f"exceeds the model's context of {context}",
                                    "shorten the prompt, or ask for fewer new tokens")

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32,
                 batch_size: int | None = None, task: str | None = None) -> list[dict[str, Any]]:
        """Greedy continuation of each prompt: ``{"text", "expert", "confidence"}`` per prompt. A routed
        bundle routes the whole batch, groups the prompts by expert and generates each group in
        batches of ``batch_size`` (default :data:`seap.evaluation.routed.DEFAULT_GENERATE_BATCH`);
        ``task`` sends every prompt to that expert instead. A request that cannot be answered is
        refused first (:meth:`check_request`)."""
        from seap.evaluation.routed import DEFAULT_GENERATE_BATCH, generate_greedy

        self.check_request(prompts, max_new_tokens, batch_size, task)
        size = batch_size or DEFAULT_GENERATE_BATCH
        if self.routed is not None and task is not None:
            texts = generate_greedy(self.routed.bank.get(task), list(prompts), max_new_tokens, size)
            return [{"text": text, "expert": task, "confidence": 1.0} for text in texts]
        if self.routed is not None:
            return [{"text": r["text"], "expert": r["expert"], "confidence": r["confidence"]}
                    for r in self.routed.generate(prompts, max_new_tokens=max_new_tokens, batch_size=size)]
        assert self.expert is not None
        return [{"text": text, "expert": self.name, "confidence": 1.0}
                for text in generate_greedy(self.expert, prompts, max_new_tokens, size)]


def load_bundle(path: str | Path, device: str | None = "auto", base_model: str | None = None) -> BundleModel:
    """Read, verify and load a bundle folder."""
    return BundleModel(read_bundle(path), device, base_model)


def bundle_summary(bundle: Bundle) -> Mapping[str, Any]:
    """What a bundle is, for messages and model descriptions."""
    d = bundle.data
    return {"kind": d["kind"], "task": d["task"], "sparsity": d["sparsity"], "base": d["base"]["reference"],
            "fingerprint": short_hash(d["base"]["fingerprint"]), "masks": sorted(d["masks"])}


__all__ = ["BASE_OVERRIDE_ENV", "BUNDLE_FILE", "Bundle", "BundleModel", "base_reference", "bundle_summary",
           "load_base", "load_bundle", "read_bundle", "write_bundle"]
