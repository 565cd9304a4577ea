"""Tiny real transformers models for engine tests: a base and fine-tune-like variants of it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 48


def tiny_config(arch: str, *, layers: int = 4, vocab: int = VOCAB):
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=64)
    raise ValueError(arch)


def save_tokenizer(out: Path, vocab: int = VOCAB) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = (
        [chr(ord("a") + i) for i in range(26)] + [str(i) for i in range(10)] + [" ", "+", "=", "."]
    )
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tokens = specials + chars
    assert len(tokens) <= vocab
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(out)


def make_family(
    root: Path,
    arch: str = "llama",
    *,
    names=("base", "a", "b"),
    noise: float = 0.02,
    seed: int = 0,
    layers: int = 4,
    vocab: int = VOCAB,
) -> dict[str, Path]:
    """A random base model and variants = base + small random deltas, saved as safetensors dirs."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(tiny_config(arch, layers=layers, vocab=vocab))
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    paths = {}
    for i, name in enumerate(names):
        model = AutoModelForCausalLM.from_config(tiny_config(arch, layers=layers, vocab=vocab))
        g = torch.Generator().manual_seed(seed * 100 + i)
        state = {
            k: v + (noise * torch.randn(v.shape, generator=g) if i else 0)
            for k, v in base_state.items()
        }
        model.load_state_dict(state)
        out = root / f"{arch}-{name}"
        model.save_pretrained(out, safe_serialization=True)
        save_tokenizer(out, vocab)
        paths[name] = out
    return paths


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(path / f))
    return state
