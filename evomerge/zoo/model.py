"""The zoo's architecture: a real `LlamaForCausalLM`, small enough to train on a CPU in a minute."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.zoo.tokenizer import BOS, EOS, PAD, VOCAB, VOCAB_SIZE


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 128

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def llama_config(shape: ModelShape) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=VOCAB.index(PAD),
        bos_token_id=VOCAB.index(BOS),
        eos_token_id=VOCAB.index(EOS),
    )


def new_model(shape: ModelShape, *, seed: int) -> LlamaForCausalLM:
    """A freshly initialized model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(shape))
    model.generation_config.pad_token_id = VOCAB.index(PAD)
    return model


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
