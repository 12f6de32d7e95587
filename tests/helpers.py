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
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma's 1 + w): make them matter
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
