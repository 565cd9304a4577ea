"""A small, seeded training loop for the zoo's models (CPU, AdamW, warmup + cosine decay)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel

from evomerge.zoo.corpus import Mixture
from evomerge.zoo.skills import Problem
from evomerge.zoo.tokenizer import BOS, EOS, PAD, UNK, VOCAB

IGNORE_INDEX = -100
_TOKEN_ID = {token: index for index, token in enumerate(VOCAB)}


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float
    batch_size: int = 64
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    seed: int = 0
    frozen: tuple[str, ...] = ()  # parameters whose names contain one of these are not trained

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "frozen": list(self.frozen)}


def set_cpu_threads() -> int:
    """Tiny matrices gain nothing from many threads; two is the sweet spot measured here."""
    threads = max(1, min(2, os.cpu_count() or 1))
    torch.set_num_threads(threads)
    return threads


def encode(text: str) -> list[int]:
    """The zoo tokenizer's encoding (`<bos>` + one id per character), without its overhead."""
    return [_TOKEN_ID[BOS]] + [_TOKEN_ID.get(char, _TOKEN_ID[UNK]) for char in text]


def encode_batch(batch: Sequence[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels; the loss covers the answer and `<eos>`, not the prompt."""
    rows = [
        (encode(p.prompt), [_TOKEN_ID.get(c, _TOKEN_ID[UNK]) for c in p.answer] + [_TOKEN_ID[EOS]])
        for p in batch
    ]
    width = max(len(prompt) + len(answer) for prompt, answer in rows)
    input_ids = torch.full((len(rows), width), _TOKEN_ID[PAD], dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        input_ids[row, :n] = torch.tensor(prompt + answer)
        labels[row, len(prompt) : n] = torch.tensor(answer)
    return input_ids, labels


def lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def train(
    model: PreTrainedModel,
    mixture: Mixture,
    config: TrainConfig,
    *,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """Train `model` in place on `mixture`; returns the mean loss of the last 10% of steps."""
    torch.manual_seed(config.seed)
    stream: Iterator[Problem] = mixture.stream(config.seed)
    trainable = [
        p for name, p in model.named_parameters() if not any(f in name for f in config.frozen)
    ]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not any(f in name for f in config.frozen))
    optimizer = torch.optim.AdamW(
        trainable, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )
    model.train()
    tail: list[float] = []
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        input_ids, labels = encode_batch([next(stream) for _ in range(config.batch_size)])
        # Right padding under a causal mask never changes the real tokens' outputs: no mask needed.
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if step >= config.steps * 0.9:
            tail.append(loss.item())
        if on_step is not None:
            on_step(step, loss.item())
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return sum(tail) / max(1, len(tail))
