"""Walking a causal LM one decoder layer at a time: the engine's main loop.

Every pass over calibration text (statistics, refits, the pruned checkpoint) visits the
decoder layers in order. For each layer it puts the layer on the compute device once, runs
every calibration batch of every task through it, lets the caller collect what it needs from
that layer (hooks on module inputs), and moves the layer off again; the hidden states go on
to the next layer and wait between layers on the CPU. Peak memory is then one layer, the
hidden states of the calibration tokens and what the caller keeps per layer, whatever the
depth of the model.

Where the layers come from is a :class:`LayerSource`:

* :class:`CheckpointLayers` reads a safetensors checkpoint (one file or shards with an index)
  lazily: the module tree is built without memory (``accelerate.init_empty_weights``), each
  layer's tensors are read when the layer is visited (``safe_open``, copied, the mapping closed)
  and dropped again afterwards. The dense model never sits whole in memory.
* :class:`ResidentLayers` wraps a model already in memory (a test model, a model the caller
  holds); visiting and releasing a layer cost nothing.

:func:`open_layers` picks the lazy source where the checkpoint's tensor names are the module's
own (every dense family in its Hugging Face layout) and falls back to loading the model
otherwise (e.g. an MoE checkpoint whose experts transformers converts at load time).

Each layer's real call arguments (position embeddings, the attention mask of that layer's
kind, position ids) are captured once per batch from the model's own forward, with every
layer's ``forward`` replaced by a recorder (:meth:`LayerSource.capture`), so no argument is
rebuilt by hand.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from seap.errors import ArtifactError, SeapError
from seap.model.hooks import HookManager, StopForward
from seap.model.loaded import (
    LoadedModel,
    fingerprint_of,
    prepare_tokenizer,
    resolve_device,
    resolve_dtype,
)
from seap.model.memory import return_freed_memory
from seap.model.shards import PROGRESS_FILE, checkpoint_files, write_safetensors

log = logging.getLogger(__name__)



def to_device(value: Any, device: torch.device) -> Any:
    """``value`` (a tensor, or tuples, lists and dicts of them) on ``device``; anything else as is."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


@dataclass
class LayerCall:
    """How the model calls one decoder layer for one batch: everything but the hidden states."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's output hidden states for ``hidden`` (arguments moved to its device)."""
        device = hidden.device
        out = layer(hidden, *to_device(self.args, device), **to_device(self.kwargs, device))
        return out[0] if isinstance(out, tuple) else out


@dataclass
class CalibrationBatch:
    """One padded batch of calibration text on its way through the layers: which part of the
    calibration (a task) it belongs to, the token weights (the attention mask; ``None`` when no
    token is padding), its real token count, every layer's call arguments and the hidden states
    entering the next layer (kept on the CPU between layers)."""

    part: int
    token_weights: torch.Tensor | None
    count: int
    calls: list[LayerCall]
    hidden: torch.Tensor


class LayerSource:
    """Where the decoder layers of one model come from; see the module docstring."""

    model: nn.Module  # the module tree (layers may have no memory until visited)
    adapter: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    source: str

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def layers(self) -> list[nn.Module]:
        return self.adapter.decoder_layers(self.model)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    @property
    def location(self) -> str:
        return self.source.split("+", 1)[0].split(":", 1)[-1]

    @property
    def names(self) -> list[str]:
        """The model's parameter names (a tied head once, under the embedding's name)."""
        return [n for n, _ in self.model.named_parameters()]

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` on the CPU, in the working dtype."""
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().to("cpu") for n in names}

    def layer(self, index: int) -> nn.Module:
        """Decoder layer ``index``, its weights on the compute device."""
        raise NotImplementedError

    def release(self, index: int) -> None:
        """Drop layer ``index``'s weights again (a resident model keeps them)."""

    def outer(self, head: bool = False) -> Iterator[None]:
        """A context in which the modules outside the decoder layers (embeddings, final norm;
        with ``head`` the output head too) hold weights."""
        return _nothing()

    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, list[LayerCall]]:
        """The first layer's input hidden states for one batch and every layer's call
        arguments, from the model's own forward with each layer replaced by a recorder (no layer
        runs, the final norm and head are skipped). Call inside :meth:`outer`."""
        layers = self.layers
        calls: list[LayerCall] = []
        first: list[torch.Tensor] = []

        def recorder(index: int) -> Callable[..., torch.Tensor]:
            def record(*args: Any, **kwargs: Any) -> torch.Tensor:
                hidden = args[0] if args else kwargs.pop("hidden_states")
                if index == 0:
                    first.append(hidden)
                calls.append(LayerCall(to_device(tuple(args[1:]), torch.device("cpu")),
                                       to_device(kwargs, torch.device("cpu"))))
                if index == len(layers) - 1:
                    raise StopForward
                return hidden

            return record

        own = [layer.__dict__.get("forward") for layer in layers]  # (a forward set on the instance is restored)
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)  # (an instance attribute shadows the class's forward)
        try:
            at = self.model.get_input_embeddings().weight.device  # (a resident model may stay on the CPU)
            self.adapter.backbone(self.model)(input_ids=input_ids.to(at), attention_mask=attention_mask.to(at),
                                              use_cache=False)
        except StopForward:
            pass
        finally:
            for layer, forward in zip(layers, own, strict=True):
                del layer.forward
                if forward is not None:
                    layer.forward = forward
        if len(calls) != len(layers):
            raise RuntimeError(f"the model called {len(calls)} of its {len(layers)} decoder layers")
        return first[0].to("cpu"), calls

    def close(self) -> None:
        """Release what the source holds (nothing for a resident model)."""


@contextmanager
def _nothing() -> Iterator[None]:
    yield


_REGISTER_PARAMETER = nn.Module.register_parameter
_ON_META = threading.local()  # how deep this thread is in parameters_on_meta
_META_LOCK = threading.Lock()
_META_USERS = [0]  # threads inside parameters_on_meta: the patch is installed while any is


def _register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _REGISTER_PARAMETER(module, name, param)
    if param is not None and getattr(_ON_META, "depth", 0):
        kind = type(module._parameters[name])
        module._parameters[name] = kind(module._parameters[name].to("meta"), requires_grad=param.requires_grad)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside (in this thread) get their parameters on the meta device (no memory)
    and keep real buffers (rotary frequencies are computed at construction), as accelerate's
    ``init_empty_weights(include_buffers=False)`` does, without importing accelerate. Modules
    other threads build meanwhile are not affected."""
    with _META_LOCK:
        if _META_USERS[0] == 0:
            nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign]
        _META_USERS[0] += 1
    _ON_META.depth = getattr(_ON_META, "depth", 0) + 1
    try:
        yield
    finally:
        _ON_META.depth -= 1
        with _META_LOCK:
            _META_USERS[0] -= 1
            if _META_USERS[0] == 0:
                nn.Module.register_parameter = _REGISTER_PARAMETER  # type: ignore[method-assign]


class ResidentLayers(LayerSource):
    """The layers of a model already in memory. With a compute ``device`` other than the model's
    (a model held in CPU memory, layers run on a GPU), each layer is moved there while it is
    visited and back afterwards."""

    def __init__(self, loaded: LoadedModel, device: torch.device | None = None) -> None:
        self.loaded = loaded
        self.model, self.adapter, self.tokenizer = loaded.model, loaded.adapter, loaded.tokenizer
        first = next(loaded.model.parameters())
        self.home, self.dtype, self.source = first.device, first.dtype, loaded.source
        self.device = device or first.device

    @property
    def fingerprint(self) -> str:
        return self.loaded.fingerprint

    def layer(self, index: int) -> nn.Module:
        layer = self.layers[index]
        return layer.to(self.device) if self.device != self.home else layer

    def release(self, index: int) -> None:
        if self.device != self.home:
            self.layers[index].to(self.home)


class NotStreamable(Exception):
    """A checkpoint whose tensor names are not the module's own (converted at load time)."""


class CheckpointLayers(LayerSource):
    """The layers of a safetensors checkpoint, read one at a time (see the module docstring)."""

    def __init__(self, folder: str | Path, device: str | torch.device | None = "auto",
                 dtype: str | torch.dtype | None = "auto", fingerprint: str | None = None) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from seap.model.adapters import adapter_for_model_type
        from seap.model.checkpoint import is_pruned_dir, pruned_skeleton

        self.folder = Path(folder)
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self._recorded: str | None = None  # a pruned folder's fingerprint recorded at save time
        pruned = is_pruned_dir(self.folder)
        if not pruned:  # (the architecture is refused before the weights are looked at)
            config = AutoConfig.from_pretrained(str(self.folder))
            self.adapter = adapter_for_model_type(getattr(config, "model_type", "?"))
            self.adapter.check_config(config)
        self.files = checkpoint_files(self.folder)
        if pruned:  # (written by seap: each layer at its own widths)
            with parameters_on_meta():
                self.model, self.adapter, info = pruned_skeleton(self.folder, self.dtype, self.files.__contains__)
            self.model.eval()
            config = self.model.config
            self._recorded = info.get("pruned_fingerprint") if self.dtype == torch.float32 else None
        else:
            with parameters_on_meta():  # parameters without memory, real buffers (rotary)
                self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype).eval()
        self._tied = bool(getattr(self.adapter.text_config(config), "tie_word_embeddings", False)) and \
            self.model.get_output_embeddings() is not None
        self._retie()
        self._names = [n for n, _ in self.model.named_parameters()]  # (a tied head appears once)
        if pruned:  # (saved under the module's own names)
            self._sources: dict[str, list[tuple[str, str | None]]] = {n: [(n, None)] for n in self._names
                                                                      if n in self.files}
            self._converters: dict[str, Any] = {}
        else:
            self._sources, self._converters = checkpoint_sources(self.model, self.files)
        missing = [n for n in self._names if n not in self._sources]
        unexpected = sorted(set(self.files) - set(self._names) - ({"lm_head.weight"} if self._tied else set()))
        if pruned and unexpected:  # (as load_pruned loads strictly)
            raise ArtifactError(f"{self.folder} does not fit its config (unexpected {unexpected[:5]})",
                                "re-save the pruned model")
        if missing:
            raise NotStreamable(f"{len(missing)} parameter(s) are not in the checkpoint under their module "
                                f"names or transformers' conversions of them (e.g. {missing[0]})")
        self.tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(self.folder)))
        self.source = f"{'pruned' if pruned else 'local'}:{self.folder}"
        self._fingerprint = fingerprint
        self._prefixes = {id(m): n for n, m in self.model.named_modules()}

    @property
    def names(self) -> list[str]:
        return self._names

    def _names_under(self, module: nn.Module) -> list[str]:
        prefix = self._prefixes[id(module)] + "."
        return [n for n in self.names if n.startswith(prefix)]

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The parameters ``names`` from the checkpoint, in the working dtype, as anonymous memory
        on the CPU: each read from its tensor, or made by transformers' own conversion from the
        tensors it is stored as (an MoE layer's experts stacked into one fused parameter)."""
        from copy import deepcopy

        raw = self._read_keys([key for name in names for key, _ in self._sources[name]])
        out: dict[str, torch.Tensor] = {}
        for name in names:
            sources = self._sources[name]
            if len(sources) == 1 and sources[0][1] is None:
                out[name] = raw.pop(sources[0][0])
                continue
            converter = deepcopy(self._converters[sources[0][1]])
            for key, pattern in sources:
                converter.add_tensor(name, key, pattern, raw.pop(key))
            value = converter.convert(name, model=self.model, config=self.model.config)[name]
            out[name] = (value[0] if isinstance(value, list) else value).contiguous()
        return out

    def _read_keys(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors by their stored names, in the working dtype, as anonymous memory on
        the CPU (each file's mapping is closed again)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in keys:
            by_file.setdefault(self.files[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, wanted in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for name in wanted:
                    tensor = handle.get_tensor(name)
                    if tensor.is_floating_point() and tensor.dtype != self.dtype:
                        tensor = tensor.to(self.dtype)
                    else:
                        tensor = tensor.clone()  # own memory, not the file's pages
                    out[name] = tensor
        return out

    def _place(self, names: Sequence[str], device: torch.device | str) -> None:
        values = self.read(names) if str(device) != "meta" else {}
        for name in names:
            owner, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(owner)
            old = module._parameters[leaf]
            value = values[name].to(device) if name in values else torch.empty_like(old, device="meta")
            module._parameters[leaf] = nn.Parameter(value, requires_grad=False)

    def layer(self, index: int) -> nn.Module:
        layer = self.layers[index]
        self._place(self._names_under(layer), self.device)
        return layer

    def release(self, index: int) -> None:
        self._place(self._names_under(self.layers[index]), "meta")

    def _retie(self) -> None:
        """A tied head is the embedding's parameter, as when loaded (again after it was replaced)."""
        if self._tied:
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight

    @contextmanager
    def _outer(self, with_head: bool) -> Iterator[None]:
        in_layers = {n for layer in self.layers for n in self._names_under(layer)}
        head = {n for n in self.names if n.startswith("lm_head.")} if not with_head else set()
        names = [n for n in self.names if n not in in_layers and n not in head]
        self._place(names, self.device)
        self._retie()
        try:
            yield
        finally:
            self._place(names, "meta")
            self._retie()

    def outer(self, head: bool = False) -> Iterator[None]:  # type: ignore[override]
        return self._outer(head)

    @property
    def fingerprint(self) -> str:
        """The model's fingerprint (:func:`seap.model.loaded.model_fingerprint`), computed by
        reading the checkpoint one tensor at a time (once per source)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_of(self.model.config, self.names, lambda n: self.read([n])[n])
            if self._recorded is not None and self._fingerprint != self._recorded:  # (as load_pruned checks)
                raise ArtifactError(f"{self.folder}: the weights do not match the fingerprint recorded at save time",
                                    "re-save the pruned model")
        return self._fingerprint


def checkpoint_sources(model: nn.Module, keys: Sequence[str] | Mapping[str, Any]
                       ) -> tuple[dict[str, list[tuple[str, str | None]]], dict[str, Any]]:
    """Each parameter of ``model`` -> the checkpoint tensors (name, conversion pattern or None)
    it is loaded from, by transformers' own rules for the architecture
    (``get_model_conversion_mapping``: renamed keys, an MoE checkpoint's per-expert tensors fused
    at load time), in the order ``from_pretrained`` reads them; and the converters by pattern."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    own = dict(model.named_parameters())
    sources: dict[str, list[tuple[str, str | None]]] = {}
    for key in sorted(keys, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, own)
        if target not in own and key in own:  # (as from_pretrained: a key that needs no renaming)
            target, pattern = key, None
        if target in own:
            sources.setdefault(target, []).append((key, pattern))
    return sources, {p: c for c in converters for p in c.source_patterns}


def open_layers(model: str | Path | LoadedModel | LayerSource, device: str | None = "auto",
                dtype: str | torch.dtype | None = "auto", fingerprint: str | None = None) -> LayerSource:
    """A :class:`LayerSource` for ``model``: a source as is, a loaded model's resident layers, or
    a model folder's checkpoint read layer by layer (loaded whole only when its tensor names
    are not the module's own)."""
    if isinstance(model, LayerSource):
        return model
    if isinstance(model, LoadedModel):
        return ResidentLayers(model)
    from seap.model.loading import load_model, resolve_model_path

    location, _ = resolve_model_path(str(model))  # (a hub id: its snapshot, fetched once)
    try:
        return CheckpointLayers(location, device, dtype, fingerprint)
    except NotStreamable as exc:
        log.info("%s is loaded whole: %s", model, exc)
    return ResidentLayers(load_model(str(model), device=device, dtype=dtype))


def calibration_batches(source: LayerSource, parts: Sequence[Sequence[Sequence[int]]], batch_size: int,
                        work: Path | None = None) -> list[CalibrationBatch]:
    """The batches of every part (each a list of token id sequences), in part order, each part
    batched by length (:func:`seap.model.batching.length_batches`), with the first layer's
    input and every layer's call arguments captured. With ``work`` (the folder the walk over
    them will use), each batch's first-layer input is written there as soon as it is captured
    (:class:`HiddenStates`), so the calibration's hidden states are never all in memory."""
    from seap.model.batching import length_batches, pad_batch

    pad_id = source.tokenizer.pad_token_id if source.tokenizer.pad_token_id is not None else 0
    batches: list[CalibrationBatch] = []
    with torch.inference_mode(), source.outer():
        for part, token_ids in enumerate(parts):
            for batch in length_batches([len(x) for x in token_ids], batch_size):
                input_ids, attention_mask = pad_batch([token_ids[j] for j in batch], pad_id, "cpu")
                count = int(attention_mask.sum())
                hidden, calls = source.capture(input_ids, attention_mask)
                # no padding in this batch (common: batches are sorted by length): plain sums
                weights = None if count == attention_mask.numel() else attention_mask
                batches.append(CalibrationBatch(part, weights, count, calls, hidden))
                if work is not None:
                    HiddenStates(batches, work / HIDDEN_FOLDER).put(-1, len(batches) - 1, hidden)
                    del hidden
    return batches


HIDDEN_FOLDER = "hidden"  # under a walk's work folder: the hidden states between layers
InputHook = Callable[[CalibrationBatch, torch.Tensor], None]
LayerResult = tuple[Mapping[str, torch.Tensor], dict[str, Any]]  # what a walk keeps of one layer: tensors, JSON


class HiddenStates:
    """Where the hidden states of the calibration batches wait between layers: in memory, or on
    disk (``folder``: one safetensors file per batch and layer parity, so the outputs of the
    last finished layer are intact while the next one is written; read back one batch at a time)."""

    def __init__(self, batches: Sequence[CalibrationBatch], folder: Path | None) -> None:
        self.batches, self.folder = batches, folder
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SeapError(f"cannot create the offload folder {folder}: {exc.strerror or exc}",
                                "choose a writable work folder (--workdir), or --offload cpu") from None

    def _file(self, layer: int, index: int) -> Path:
        assert self.folder is not None  # (the first layer's inputs apart: rewritten by every capture)
        return self.folder / f"hidden-{'input' if layer < 0 else layer % 2}-{index:06d}.safetensors"

    def put(self, layer: int, index: int, hidden: torch.Tensor) -> None:
        """Batch ``index``'s output of ``layer`` (its input to ``layer + 1``)."""
        if self.folder is None:
            self.batches[index].hidden = hidden
            return
        write_safetensors({"hidden": hidden}, self._file(layer, index))
        self.batches[index].hidden = None  # type: ignore[assignment]

    def get(self, layer: int, index: int) -> torch.Tensor:
        """Batch ``index``'s input to ``layer``."""
        hidden = self.batches[index].hidden
        if hidden is not None or self.folder is None:
            return hidden
        from safetensors import safe_open

        with safe_open(str(self._file(layer - 1, index)), framework="pt") as handle:
            return handle.get_tensor("hidden")


class WalkProgress:
    """The finished layers of one walk, in a folder of its own: each layer's result
    (``layer-NNNNN.safetensors`` with its JSON in the metadata) and a record of how many layers
    are done, for a walk with the same ``identity`` (model, text, options). A walk killed
    part-way and started again resumes after its last finished layer; another identity starts
    afresh (the folder is cleared), so results are never mixed."""

    def __init__(self, folder: Path, identity: Mapping[str, Any]) -> None:
        import shutil

        self.folder, self.identity = folder, json.loads(json.dumps(identity, sort_keys=True, default=str))
        record = folder / PROGRESS_FILE
        self.done = 0
        if record.is_file():
            try:
                previous = json.loads(record.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                previous = {}
            if previous.get("identity") == self.identity:
                self.done = int(previous.get("done", 0))
        if self.done == 0 and folder.exists():
            shutil.rmtree(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SeapError(f"cannot create the work folder {folder}: {exc.strerror or exc}",
                            "choose a writable work folder (--workdir), or --offload cpu") from None

    def result(self, layer: int) -> LayerResult:
        """A finished layer's result as recorded: its tensors read from the file when looked up."""
        from seap.tensor_files import LazyTensors

        tensors = LazyTensors.open(self.folder / f"layer-{layer:05d}.safetensors")
        return tensors, json.loads(tensors.file.metadata.get("meta", "{}"))

    def record(self, layer: int, result: LayerResult) -> None:
        from seap.io import atomic_write_json

        tensors, meta = result
        write_safetensors(tensors, self.folder / f"layer-{layer:05d}.safetensors", {"meta": json.dumps(meta)})
        try:
            atomic_write_json(self.folder / PROGRESS_FILE, {"identity": self.identity, "done": layer + 1})
        except OSError as exc:
            raise SeapError(f"cannot write {self.folder / PROGRESS_FILE}: {exc.strerror or exc}",
                            "free space there, or choose another work folder (--workdir)") from None
        self.done = layer + 1


def walk_layers(source: LayerSource, batches: Sequence[CalibrationBatch],
                watch: Callable[[int, nn.Module], Mapping[nn.Module, InputHook]],
                finish: Callable[[int, nn.Module], LayerResult], keep: Callable[[int, LayerResult], None],
                desc: str = "layers", progress: bool = True, work: Path | None = None,
                identity: Mapping[str, Any] | None = None) -> None:
    """The main loop: for each decoder layer, put it on the device, run every batch through it
    (``watch(i, layer)`` names modules whose input is handed to a hook with the batch it belongs
    to), move each batch's hidden states on to the layer's output, and hand
    ``finish(i, layer)``'s result to ``keep(i, result)``; then release the layer.

    With ``work`` (a folder of this walk's own), the hidden states wait on disk between layers
    and every finished layer's result is recorded there (:class:`WalkProgress`, for ``identity``)
    and handed to ``keep`` as read back from there (its tensors read when looked up, so what a
    walk keeps of all layers stays on disk): the same walk started again after a kill resumes
    after the last finished layer, and its results are identical to an uninterrupted walk's."""
    resume = WalkProgress(work / "layers", identity or {}) if work is not None else None
    store = HiddenStates(batches, work / HIDDEN_FOLDER if work is not None else None)
    start = resume.done if resume is not None else 0
    for i in range(start):  # (finished before a kill: their results as recorded)
        keep(i, resume.result(i))  # type: ignore[union-attr]
    if start:
        for batch in batches:
            batch.hidden = None  # type: ignore[assignment]  # (read from the last finished layer's outputs)
    elif store.folder is not None:
        for index, batch in enumerate(batches):  # the first layer's inputs, on disk like every layer's
            if batch.hidden is not None:  # (unless written there when captured)
                store.put(-1, index, batch.hidden)
    bar = tqdm(range(start, source.num_layers), desc=desc, unit="layer", disable=not progress, leave=False,
               initial=start, total=source.num_layers)
    current: dict[str, CalibrationBatch] = {}
    for i in bar:
        layer = source.layer(i)
        try:
            watched = watch(i, layer)  # (outside inference mode: what it creates is updated in place later)
            with HookManager() as hooks, torch.inference_mode():
                for module, hook in watched.items():
                    hooks.add_input_hook(module, lambda _m, x, hook=hook: hook(current["batch"], x))
                for index, batch in enumerate(batches):
                    current["batch"] = batch
                    hidden = store.get(i, index)
                    out = batch.calls[i].run(layer, hidden.to(source.device))
                    store.put(i, index, out.to("cpu"))
            result = finish(i, layer)
        finally:
            source.release(i)
        if resume is not None:  # (what is kept stays in its file, read when used)
            resume.record(i, result)
            result = resume.result(i)
        keep(i, result)
        del result
        return_freed_memory()


__all__ = [
    "CalibrationBatch",
    "CheckpointLayers",
    "HiddenStates",
    "LayerCall",
    "LayerResult",
    "LayerSource",
    "NotStreamable",
    "ResidentLayers",
    "WalkProgress",
    "calibration_batches",
    "open_layers",
    "to_device",
    "walk_layers",
]
