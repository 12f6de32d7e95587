"""Mixture-of-experts models: router statistics from a corpus, and expert masks applied to a
model (the glue between the MoE adapters, owned hooks and :mod:`seap.maths.expert_selection`).

* :func:`collect_router_statistics` walks the model one decoder layer at a time (a checkpoint
  is never loaded whole), hooks each MoE block's input, recomputes the router's logits on the
  real tokens (padding excluded), routes them as the family does, and, for REAP, runs each
  expert on the tokens routed to it to take its output norm;
* :func:`apply_expert_mask` removes experts (``hard``: smaller tensors, smaller router) or
  switches them off (``soft``: same shapes) in a structural copy of the base model, which is
  never modified. A token whose dense top-k experts are all kept gets the dense output.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from seap.data.corpus import DEFAULT_MAX_TOKENS, CalibrationCorpus
from seap.errors import SeapError, UnsupportedArchitectureError
from seap.maths.expert_selection import (
    CHANNEL_FIELDS,
    ROUTER_FIELDS,
    ExpertMask,
    LayerRouterStatistics,
    RouterStatistics,
    router_sums,
    validate_expert_mask,
)
from seap.model.adapters.moe import MoeLayerModules, moe_adapter
from seap.model.batching import shard_texts, tokenize_corpus
from seap.model.hooks import HookManager
from seap.model.loaded import LoadedModel, model_fingerprint
from seap.model.pruning import check_mode, check_unpruned, share_copy
from seap.model.surgery import expert_pruning_record, prune_layer_experts


def expert_output_norms(mods: MoeLayerModules, x: torch.Tensor, index: torch.Tensor,
                        channels: LayerRouterStatistics | None = None) -> torch.Tensor:
    """[T, E]: the L2 norm of each routed expert's output on each token (0 where not routed).
    With ``channels`` (unit both), each expert's down_proj inputs on its routed tokens are
    also added to its channel sums (in place)."""
    experts = mods.experts
    norms = torch.zeros(x.shape[0], mods.num_experts, dtype=torch.float64, device=x.device)
    for e in torch.unique(index).tolist():
        tokens = (index == e).any(dim=-1).nonzero()[:, 0]
        gate, up = torch.nn.functional.linear(x[tokens], experts.gate_up_proj[e]).chunk(2, dim=-1)
        hidden = experts.act_fn(gate) * up
        out = torch.nn.functional.linear(hidden, experts.down_proj[e])
        norms[tokens, e] = torch.linalg.vector_norm(out.to(torch.float64), dim=-1)
        if channels is not None:
            h = hidden.to(torch.float64).cpu()
            channels.channel_sum[e] += h.sum(0)  # type: ignore[index]
            channels.channel_sq_sum[e] += (h * h).sum(0)  # type: ignore[index]
    return norms


def collect_router_statistics(model: Any, corpus: CalibrationCorpus, batch_size: int = 8,
                              max_tokens: int | None = DEFAULT_MAX_TOKENS, shard: tuple[int, int] | None = None,
                              reap: bool = True, progress: bool = True, channels: bool = False,
                              work: Path | None = None) -> RouterStatistics:
    """Run the corpus through the model one decoder layer at a time
    (:func:`seap.model.layer_stream.walk_layers`; ``model``: a loaded model, a layer source or
    a checkpoint folder read layer by layer) and sum, per MoE layer, what the router does on the
    real tokens (:class:`RouterStatistics`); with ``channels`` (unit both) also each expert's
    channel sums over the tokens routed to it. ``shard=(i, n)`` takes texts ``i, i+n, ...``;
    merged shards equal one pass. With ``work`` the walk keeps its hidden states there and
    resumes after a kill. Hooks are removed even on error."""
    from seap.model.layer_stream import calibration_batches, open_layers, walk_layers

    if batch_size < 1:
        raise SeapError(f"batch size must be at least 1, got {batch_size}", "pass --batch-size 1 or more")
    source = open_layers(model)
    adapter = moe_adapter(source)
    routed = adapter.moe_layers(source.model)  # (which layers route, and their shapes: no weight is read)
    if not routed:
        raise UnsupportedArchitectureError("the model has no MoE layers", "pass a mixture-of-experts checkpoint")
    texts = shard_texts(corpus.texts, shard)
    token_ids = tokenize_corpus(source.tokenizer, texts, max_tokens) if texts else []
    if not token_ids:
        raise SeapError(f"task {corpus.task!r} has no calibration tokens{' in this shard' if shard else ''}",
                        "add calibration records, or use fewer shards")
    normalise = adapter.normalises_top_k(source.model.config)
    top_k = {i: adapter.top_k(m) for i, m in routed.items()}
    start = time.perf_counter()
    batches = calibration_batches(source, [token_ids], batch_size, work)
    current: dict[str, LayerRouterStatistics] = {}
    sums: dict[int, LayerRouterStatistics] = {}

    def watch(i: int, layer: torch.nn.Module) -> dict[torch.nn.Module, Any]:
        mods = adapter.moe_modules(layer)
        if mods is None:
            return {}
        current["sums"] = LayerRouterStatistics.zeros(mods.num_experts, mods.expert_intermediate if channels else None)
        if channels:
            current["sums"].down_sq_l2 = mods.experts.down_proj.detach().to(torch.float64).pow(2).sum(dim=1).cpu()

        def hook(batch: Any, x: torch.Tensor) -> None:
            flat = x.reshape(-1, x.shape[-1])
            if batch.token_weights is not None:
                flat = flat[batch.token_weights.reshape(-1).bool()]
            logits = torch.nn.functional.linear(flat, adapter.router_weight(mods))
            norms, extra = None, None
            if reap or channels:
                _, index = torch.topk(torch.softmax(logits.to(torch.float64), dim=-1), top_k[i], dim=-1)
                extra = LayerRouterStatistics.zeros(mods.num_experts, mods.expert_intermediate) if channels else None
                norms = expert_output_norms(mods, flat, index, extra)
            part = router_sums(logits, top_k[i], normalise, norms if reap else None)
            if extra is not None:
                part.channel_sum, part.channel_sq_sum = extra.channel_sum, extra.channel_sq_sum
                part.down_sq_l2 = current["sums"].down_sq_l2
            current["sums"] = current["sums"].merge(part)

        return {mods.block: hook}

    def finish(_i: int, _layer: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        layer_sums = current.pop("sums", None)
        if layer_sums is None:  # (a dense layer of an MoE model)
            return {}, {}
        return {f: getattr(layer_sums, f) for f in (*ROUTER_FIELDS, *CHANNEL_FIELDS)
                if getattr(layer_sums, f) is not None}, {"tokens": layer_sums.tokens}

    def keep(i: int, result: tuple[Any, dict[str, Any]]) -> None:
        tensors, info = result
        if tensors:
            sums[i] = LayerRouterStatistics(info["tokens"], *(tensors[f] for f in ROUTER_FIELDS),
                                            *(tensors[f] if f in tensors else None for f in CHANNEL_FIELDS))

    identity = {"walk": "router statistics", "model": source.fingerprint, "corpus": corpus.digest(),
                "batch_size": batch_size, "max_tokens": max_tokens, "shard": shard, "reap": reap, "channels": channels}
    walk_layers(source, batches, watch, finish, keep, f"router statistics [{corpus.task}]", progress, work, identity)
    meta = {"fingerprint": source.fingerprint, "task": corpus.task, "model_source": source.source,
            "corpus_digest": corpus.digest(), "num_texts": len(token_ids), "max_tokens": max_tokens,
            "shard": list(shard) if shard else None, "reap": reap, "channels": channels, "normalise_top_k": normalise,
            "expert_params": {str(i): int(m.experts.gate_up_proj[0].numel() + m.experts.down_proj[0].numel())
                              for i, m in routed.items()},
            "seconds": round(time.perf_counter() - start, 3)}
    return RouterStatistics(sums, top_k, meta)


def expert_parameters(loaded: LoadedModel) -> dict[int, int]:
    """Parameters of one routed expert, per MoE layer."""
    return {i: int(m.experts.gate_up_proj[0].numel() + m.experts.down_proj[0].numel())
            for i, m in moe_adapter(loaded).moe_layers(loaded.model).items()}


def apply_expert_mask(loaded: LoadedModel, mask: ExpertMask, mode: str = "hard", inplace: bool = False) -> LoadedModel:
    """The model with ``mask``'s experts removed (``hard``) or switched off (``soft``). Unless
    ``inplace``, the base is untouched: the result is a structural copy sharing its unpruned
    tensors. Refused when the mask was built on another model."""
    check_mode(mode)
    adapter = moe_adapter(loaded)
    mask.check_model(loaded.fingerprint)
    check_unpruned(loaded)
    layers = adapter.moe_layers(loaded.model)
    validate_expert_mask(mask, {i: m.num_experts for i, m in layers.items()})
    model = loaded.model if inplace else share_copy(loaded.model)
    normalise = adapter.normalises_top_k(model.config)
    decoder = adapter.decoder_layers(model)
    with torch.no_grad():
        for i in sorted(mask.experts):
            prune_layer_experts(adapter, decoder[i], mask, i, mode == "hard", normalise)
    model.config.seap_pruning = expert_pruning_record(
        mask, mode, {i: adapter.experts_record(decoder[i]) for i in sorted(mask.experts)})
    return LoadedModel(model, loaded.tokenizer, adapter, f"{loaded.source}+experts:{mask.task}", model_fingerprint(model))


def model_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Parameters and bytes of a model (what an expert mask saves in memory)."""
    params = list(model.parameters())
    return {"parameters": sum(p.numel() for p in params), "bytes": sum(p.numel() * p.element_size() for p in params)}


def routed_experts(loaded: LoadedModel, input_ids: torch.Tensor) -> dict[int, set[int]]:
    """MoE layer -> the experts the model's router selects for any token of ``input_ids``."""
    adapter = moe_adapter(loaded)
    layers = adapter.moe_layers(loaded.model)
    found: dict[int, set[int]] = {i: set() for i in layers}

    def make_hook(i: int, mods: MoeLayerModules) -> Any:
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            found[i].update(output[2].reshape(-1).tolist())

        return hook

    with HookManager() as hooks, torch.inference_mode():
        for i, mods in layers.items():
            hooks.add_forward_hook(mods.router, make_hook(i, mods))
        loaded.model(input_ids=input_ids)
    return found


__all__ = ["apply_expert_mask", "collect_router_statistics", "expert_output_norms", "expert_parameters",
           "model_bytes", "moe_adapter", "routed_experts"]

