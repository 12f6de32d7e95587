"""Tiny random models and tokenizers built in code, for tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from seap.model.loaded import LoadedModel, wrap_model

ARCHS = ("llama-mha", "llama-gqa", "qwen2", "mistral", "qwen3", "gemma2", "gemma3-text", "gemma3", "phi3", "olmo2",
         "olmo3", "smollm3", "granite")

WORDS = (
    "the a of to and in is it that was for on are with as his they be at one have this from or had by hot word "
    "but what some we can out other were all there when up use your how said an each she which do their time if "
    "will way about many then them write would like so these her long make thing see him two has look more day "
    "could go come did number sound no most people my over know water than call first who may down side been now "
    "find any new work part take get place made live where after back little only round man year came show every "
    "good me give our under name very through just form sentence great think say help low line differ turn cause "
    "paris france rome italy berlin germany capital city yes no true false question answer"
).split()


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,?!'":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    return fast


def make_tiny_model(arch: str = "llama-gqa", layers: int = 6, seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
    torch.manual_seed(seed)
    tok = make_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama-mha":
        model = LlamaForCausalLM(LlamaConfig(num_attention_heads=8, num_key_value_heads=8, **common))
    elif arch == "llama-gqa":
        model = LlamaForCausalLM(LlamaConfig(num_attention_heads=8, num_key_value_heads=4, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_attention_heads=8, num_key_value_heads=2, **common))
        with torch.no_grad():  # random (non-zero) q/k/v biases so that bias handling is exercised
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(num_attention_heads=8, num_key_value_heads=2, head_dim=8, **common))
    else:
        model = _newer_family(arch, common, layers)
    return wrap_model(model.to(dtype).eval(), tok, source=f"tiny:{arch}")


def _newer_family(arch: str, common: dict, layers: int) -> torch.nn.Module:
    """The families added with issue 13, each with its special parts switched on: per-head and
    whole-projection q/k norms (with random weights, so that slicing them matters), GeGLU,
    soft-capping, sliding windows, head_dim != hidden / heads, fused projections, layers
    without rotary embeddings, Granite's multipliers."""
    import transformers as T

    gqa = dict(num_attention_heads=8, num_key_value_heads=4)
    sliding = ["sliding_attention" if i % 3 != 2 else "full_attention" for i in range(layers)]
    if arch == "qwen3":
        model = T.Qwen3ForCausalLM(T.Qwen3Config(**gqa, head_dim=8, use_sliding_window=True, sliding_window=4,
                                                 max_window_layers=layers // 2, **common))
    elif arch == "gemma2":
        model = T.Gemma2ForCausalLM(T.Gemma2Config(**{**gqa, **common, "tie_word_embeddings": True}, head_dim=16,
                                                   query_pre_attn_scalar=16, sliding_window=4,
                                                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0))
    elif arch in ("gemma3-text", "gemma3"):
        text = dict(**{**gqa, **common, "tie_word_embeddings": True}, head_dim=16, query_pre_attn_scalar=16,
                    sliding_window=4, layer_types=sliding)
        if arch == "gemma3-text":
            model = T.Gemma3ForCausalLM(T.Gemma3TextConfig(**text))
        else:  # the multimodal checkpoint: its text decoder is what SEAP prunes
            vocab = common["vocab_size"]
            vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=28, patch_size=14)
            model = T.Gemma3ForConditionalGeneration(T.Gemma3Config(
                text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=vocab - 3,
                eoi_token_index=vocab - 2, image_token_index=vocab - 1, pad_token_id=0, bos_token_id=1,
                eos_token_id=2))
    elif arch == "phi3":
        model = T.Phi3ForCausalLM(T.Phi3Config(**gqa, partial_rotary_factor=0.5, **common))
    elif arch == "olmo2":
        model = T.Olmo2ForCausalLM(T.Olmo2Config(**gqa, **common))
    elif arch == "olmo3":
        model = T.Olmo3ForCausalLM(T.Olmo3Config(**gqa, sliding_window=4, layer_types=sliding, **common))
    elif arch == "smollm3":  # every fourth layer without rotary embeddings (no_rope_layers[i] == 0)
        model = T.SmolLM3ForCausalLM(T.SmolLM3Config(**gqa, no_rope_layer_interval=4, **common))
    elif arch == "granite":
        model = T.GraniteForCausalLM(T.GraniteConfig(**gqa, embedding_multiplier=4.0, residual_multiplier=0.5,
                                                     attention_multiplier=0.2, logits_scaling=2.0, **common))
    else:
        raise ValueError(arch)
    return _perturb_norms(model)


MOE_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "granitemoe")


def make_tiny_moe(arch: str = "qwen3_moe", layers: int = 3, seed: int = 0, experts: int = 8, top_k: int = 2,
                  normalise: bool = False) -> LoadedModel:
    """A tiny random mixture-of-experts model of each family, with its special parts on: a dense
    layer among the routed ones (Qwen3-MoE ``mlp_only_layers``), a shared expert (Qwen2-MoE),
    un-normalised top-k weights where the family allows it (``normalise``)."""
    import transformers as T

    torch.manual_seed(seed)
    tok = make_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=layers, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  num_attention_heads=8, num_key_value_heads=4, num_experts_per_tok=top_k)
    if arch == "qwen3_moe":
        model = T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**common, head_dim=8, intermediate_size=96, moe_intermediate_size=32,
                                                       num_experts=experts, norm_topk_prob=normalise,
                                                       mlp_only_layers=[1] if layers > 2 else []))
    elif arch == "qwen2_moe":
        model = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**common, intermediate_size=96, moe_intermediate_size=32,
                                                       shared_expert_intermediate_size=48, num_experts=experts,
                                                       norm_topk_prob=normalise))
    elif arch == "mixtral":
        model = T.MixtralForCausalLM(T.MixtralConfig(**common, intermediate_size=32, num_local_experts=experts))
    elif arch == "olmoe":
        model = T.OlmoeForCausalLM(T.OlmoeConfig(**common, intermediate_size=32, num_experts=experts,
                                                 norm_topk_prob=normalise))
    elif arch == "granitemoe":
        model = T.GraniteMoeForCausalLM(T.GraniteMoeConfig(**common, intermediate_size=32, num_local_experts=experts,
                                                           embedding_multiplier=4.0, residual_multiplier=0.5,
                                                           attention_multiplier=0.2, logits_scaling=2.0))
    else:
        raise ValueError(arch)
    with torch.no_grad():  # routers start at zero in some families: make routing depend on the input
        for name, param in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")):
                param.normal_(0, 0.5)
    return wrap_model(_perturb_norms(model).eval(), tok, source=f"tiny:{arch}")


def _perturb_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Norm weights start at 1 (or 0 for Gemma's ``1 + w``): perturb them so that they matter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
    return model


SENTENCES = [
    "the capital of france is paris",
    "the capital of italy is rome",
    "what is the capital of germany ? berlin",
    "is water hot ? no",
    "the man came back after one year",
    "she said the sentence was long",
    "people like to write and think",
    "how many day are in a year",
    "the little water was low",
    "every good man can help",
    "we can find the new work each day",
    "they had a great time in the city",
]


GGUF_TOKENIZERS = {"qwen3": "gpt2", "gemma2": "llama", "phi3": "llama"}  # what real files of each family use


def gguf_family_model(arch: str, layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of a family whose GGUF files transformers reads, in a configuration
    a GGUF file can describe: what the file has no key for (Qwen3's ``head_dim``, Gemma 2's
    soft-capping and query scale, Phi-3's partial rotary factor) is left at the value
    transformers assumes when it reads the file. Its vocabulary is the one
    :func:`write_gguf` writes."""
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=len(gguf_tokens(GGUF_TOKENIZERS[arch])[0]), hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  max_position_embeddings=256, rms_norm_eps=1e-5, num_attention_heads=4, num_key_value_heads=2,
                  pad_token_id=0)
    if arch == "qwen3":
        model = T.Qwen3ForCausalLM(T.Qwen3Config(**common, tie_word_embeddings=False))
    elif arch == "gemma2":
        model = T.Gemma2ForCausalLM(T.Gemma2Config(**common, head_dim=16, sliding_window=4, tie_word_embeddings=True))
    elif arch == "phi3":
        model = T.Phi3ForCausalLM(T.Phi3Config(**common, tie_word_embeddings=False))
    else:
        raise ValueError(arch)
    return _perturb_norms(model).eval()


def gguf_tokens(kind: str = "gpt2") -> tuple[list[str], list[int], list[str]]:
    """The vocabulary :func:`write_gguf` writes, its token types and its merges: byte-level BPE
    (``kind="gpt2"``, as Qwen files: ``<|endoftext|>``, the 256 byte symbols, the words of
    :data:`WORDS` as ``Ġword`` merges) or sentencepiece (``"llama"``, as Gemma and Phi-3 files:
    ``<pad> </s> <s> <unk>``, the characters, ``▁word`` pieces in merge order, no merges
    stored)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if kind == "gpt2":
        space, tokens, types = "Ġ", ["<|endoftext|>"], [3]
        tokens += list(bytes_to_unicode().values())
    else:
        space, tokens, types = "\u2581", ["<pad>", "</s>", "<s>", "<unk>"], [3, 3, 3, 2]
        tokens += ["\u2581", *dict.fromkeys("abcdefghijklmnopqrstuvwxyz0123456789.,?!'")]
    types += [1] * (len(tokens) - len(types))
    merges: list[str] = []
    for word in dict.fromkeys(WORDS):
        piece = space + word[0]
        if piece not in tokens:
            merges.append(f"{space} {word[0]}")
            tokens.append(piece)
            types.append(1)
        for ch in word[1:]:
            merged = piece + ch
            if merged not in tokens:
                merges.append(f"{piece} {ch}")
                tokens.append(merged)
                types.append(1)
            piece = merged
    return tokens, types, merges if kind == "gpt2" else []


def write_gguf(model: torch.nn.Module, path) -> None:
    """``model`` as a float32 GGUF file in llama.cpp's conventions: tensor names from gguf-py's
    map for its architecture, Gemma's norms stored as ``1 + w``, the metadata keys transformers
    reads back, and the vocabulary of :func:`gguf_tokens` of the kind the family's files use
    (:data:`GGUF_TOKENIZERS`)."""
    import gguf

    cfg = model.config
    arch = cfg.model_type
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "gemma2":
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_sliding_window(cfg.sliding_window)
    kind = GGUF_TOKENIZERS[arch]
    tokens, types, merges = gguf_tokens(kind)
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "gpt2":
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_merges(merges)
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(0)
        writer.add_pad_token_id(0)
    else:  # sentencepiece: scores give the merge order
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
        writer.add_pad_token_id(0)
        writer.add_eos_token_id(1)
        writer.add_bos_token_id(2)
        writer.add_unk_token_id(3)
        writer.add_add_bos_token(False)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = name.rsplit(".", 1)
        mapped = names.get_name(base)
        if mapped is None:
            raise ValueError(f"no GGUF name for {name}")
        data = tensor.detach().float()
        if arch.startswith("gemma") and "norm" in base:
            data = data + 1
        writer.add_tensor(f"{mapped}.{suffix}", data.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (the kind Llama 3, SmolLM and Qwen use) over the vocabulary and
    merges of :func:`gguf_tokens`, with ``<|endoftext|>`` as its only special token."""
    from tokenizers import decoders

    tokens, _, merges = gguf_tokens("gpt2")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token=None, pad_token="<|endoftext|>")


def make_tiny_bpe_llama(layers: int = 4, seed: int = 0, heads: int = 8, kv_heads: int = 4, tied: bool = False,
                        rope_parameters: dict | None = None) -> LoadedModel:
    """A tiny random Llama with the byte-level BPE tokenizer of :func:`make_bpe_tokenizer` (for exports
    that carry the tokenizer, such as GGUF)."""
    torch.manual_seed(seed)
    tok = make_bpe_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         rms_norm_eps=1e-5, tie_word_embeddings=tied, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                         **({"rope_parameters": rope_parameters} if rope_parameters else {}))
    return wrap_model(_perturb_norms(LlamaForCausalLM(config)).eval(), tok, source="tiny:llama-bpe")
