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

ARCHS = ("llama-mha", "llama-gqa", "qwen2", "mistral")

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
        raise ValueError(arch)
    return wrap_model(model.to(dtype).eval(), tok, source=f"tiny:{arch}")


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
