"""Memory and speed of expert pruning on a random mixture-of-experts model built in code.

No real MoE checkpoint is reachable from this project's machines (see docs/moe.md), so this
measures what does not depend on trained weights: the parameters and bytes an expert mask
removes, and the prefill/decode speed of the pruned model against the unpruned one, side by
side in one run (ratios; absolute times depend on the machine). Accuracy of a random model
is chance and is not reported.

    PYTHONPATH=. .venv/bin/python scripts/bench_moe.py [--family mixtral|qwen2_moe|olmoe] [--sparsities 0.25 0.5 0.75]

(the random model uses the tiny test vocabulary of tests/helpers.py)
"""

from __future__ import annotations

import argparse
import json

import torch


def build(family: str, layers: int, hidden: int, experts: int, intermediate: int, top_k: int):  # type: ignore[no-untyped-def]
    import transformers as T

    from seap.model.loaded import wrap_model
    from tests.helpers import make_tokenizer

    torch.manual_seed(0)
    tok = make_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                  num_key_value_heads=4, num_experts_per_tok=top_k, max_position_embeddings=512, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if family == "mixtral":
        model = T.MixtralForCausalLM(T.MixtralConfig(**common, intermediate_size=intermediate, num_local_experts=experts))
    elif family == "qwen2_moe":
        model = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**common, intermediate_size=4 * hidden, num_experts=experts,
                                                       moe_intermediate_size=intermediate,
                                                       shared_expert_intermediate_size=intermediate))
    else:
        model = T.OlmoeForCausalLM(T.OlmoeConfig(**common, intermediate_size=intermediate, num_experts=experts))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")):
                param.normal_(0, 0.5)
    return wrap_model(model.eval(), tok, source=f"random:{family}")


def main() -> None:
    from seap.data.corpus import CalibrationCorpus
    from seap.evaluation.speed import benchmark
    from seap.maths.expert_selection import build_expert_mask
    from seap.model.expert_pruning import apply_expert_mask, collect_router_statistics

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="mixtral", choices=("mixtral", "qwen2_moe", "olmoe"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    base = build(args.family, args.layers, args.hidden, args.experts, args.intermediate, args.top_k)
    texts = ["the capital of france is paris", "what is the capital of germany ? berlin", "is water hot ? no",
             "the man came back after one year", "people like to write and think"] * 8
    stats = collect_router_statistics(base, CalibrationCorpus("calib", texts), progress=False, channels=True)
    models = {"dense": base}
    for s in args.sparsities:
        for unit in ("experts", "neurons", "both"):
            mask = build_expert_mask(stats, s, unit=unit, allow_k_reduction=True)
            models[f"{unit}@{s:g}"] = apply_expert_mask(base, mask, "hard")
    result = benchmark(models, repeats=args.repeats)
    print(f"{args.family}: {args.layers} layers, hidden {args.hidden}, {args.experts} experts of {args.intermediate}, "
          f"top-{args.top_k}; {result['setup']['cpu']}, {result['setup']['torch_threads']} threads")
    print("| model | realised | parameters | MiB | x dense params | prefill x dense | decode x dense |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    dense = result["models"]["dense"]
    for name, m in result["models"].items():
        print(f"| {name} | {m['realised_sparsity'] * 100:.1f}% | {m['params'] / 1e6:.2f}M | {m['bytes'] / 2**20:.1f} | "
              f"{m['params'] / dense['params']:.2f} | {m['prefill_speedup']:.2f} | {m['decode_speedup']:.2f} |")
    print(json.dumps({k: {f: v[f] for f in ("params", "bytes", "prefill_speedup", "decode_speedup")}
                      for k, v in result["models"].items()}))


if __name__ == "__main__":
    main()
