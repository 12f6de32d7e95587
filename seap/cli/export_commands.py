"""Export and model tools: ``seap export`` (GGUF for llama.cpp, or a stock transformers folder),
``export-starter`` (the starter suite as task files), ``info`` and ``fetch``."""

from __future__ import annotations

import argparse
import json

from seap.cli.arguments import Command, check_out, layers_of, load_model_of, model_arguments
from seap.errors import SeapError
from seap.run.config import DEFAULT_MODEL


def _export_starter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder to write: OUT/<task>/train.jsonl and validation.jsonl")
    p.add_argument("--seed", type=int, default=0, help="starter-suite seed (0: the suite of starter: tasks)")
    p.add_argument("--overwrite", action="store_true")


def _export_starter(args: argparse.Namespace) -> int:
    from seap.data.starter import export_starter

    counts = export_starter(args.out, args.seed, overwrite=args.overwrite)
    for rel, n in counts.items():
        print(f"{rel}: {n} records")
    print(f"wrote {args.out}")
    return 0


EXPORT_FORMATS = ("gguf", "hf")  # checked against seap.export


def _export_model_args(p: argparse.ArgumentParser) -> None:
    model_arguments(p, purpose="the model to export: a pruned folder (`seap apply`/`seap prune`), or any model SEAP loads; ")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="gguf: a file for llama.cpp (any per-layer widths); hf: a folder stock transformers loads "
                        "(one width for all layers)")
    p.add_argument("--out", required=True, help="the .gguf file (gguf) or folder (hf) to write")
    p.add_argument("--gguf-dtype", default="f16", choices=("f16", "f32"),
                   help="gguf: matrices in float16 (default) or float32 (norms stay float32); quantise with "
                        "llama.cpp's llama-quantize")
    p.add_argument("--tokenizer-pre", default=None,
                   help="gguf: llama.cpp's pre-tokenizer name, when it does not recognise the tokenizer by itself")
    p.add_argument("--overwrite", action="store_true")


def _export_model(args: argparse.Namespace) -> int:
    from seap.export.to_gguf import is_seap_gguf

    check_out(args, args.model, file=args.format == "gguf", recognise=is_seap_gguf if args.format == "gguf" else None)
    if args.format == "gguf":
        from seap.export.to_gguf import export_gguf, gguf_layout

        source = layers_of(args)  # (a checkpoint is read and written one decoder layer at a time)
        layout = gguf_layout(source)
        export_gguf(source, args.out, dtype=args.gguf_dtype, overwrite=args.overwrite, tokenizer_pre=args.tokenizer_pre,
                    inputs=(args.model,), progress=True)
        widths = "one width for all layers" if layout.uniform else "per-layer widths"
        print(f"wrote {args.out} (llama.cpp architecture {layout.architecture}, {widths}, {args.gguf_dtype})")
    else:
        from seap.export.to_transformers import export_transformers

        loaded = load_model_of(args)
        export_transformers(loaded, args.out, overwrite=args.overwrite, inputs=(args.model,))
        print(f"wrote {args.out} (loads with transformers.AutoModelForCausalLM.from_pretrained, without seap)")
    return 0


def _info(args: argparse.Namespace) -> int:
    loaded = load_model_of(args)
    geo = loaded.adapter.geometry(loaded.model)
    g0 = geo.layers[0]
    print(json.dumps({
        "source": loaded.source, "fingerprint": loaded.fingerprint, "architecture": loaded.adapter.name,
        "layers": geo.num_layers, "hidden_size": geo.hidden_size, "heads": g0.num_heads, "kv_heads": g0.num_kv_heads,
        "head_dim": g0.head_dim, "intermediate_size": g0.intermediate_size, "prunable_params": geo.total_params(),
        "total_params": sum(p.numel() for p in loaded.model.parameters()),
        "pruned": getattr(loaded.model.config, "seap_pruning", None),
    }, indent=2))
    return 0


def _fetch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)


def _fetch(args: argparse.Namespace) -> int:
    from seap.model.loading import BUILTIN_MODELS, fetch_builtin

    if args.model not in BUILTIN_MODELS:
        raise SeapError(f"{args.model!r} is not a built-in model", f"built-in models: {', '.join(BUILTIN_MODELS)}")
    print(fetch_builtin(args.model))
    return 0

COMMANDS = [
    Command("export-starter", "tools", "write the built-in starter suite as a jsonl task folder (the DVC data)",
            _export_starter_args, _export_starter),
    Command("export", "tools", "write a pruned model for llama.cpp (GGUF) or stock transformers (HF folder)",
            _export_model_args, _export_model),
    Command("info", "tools", "model fingerprint, architecture and prunable parameters", model_arguments, _info),
    Command("fetch", "tools", "download and convert a built-in model once (e.g. smollm2-135m)", _fetch_args, _fetch),
]


__all__ = ["COMMANDS"]
