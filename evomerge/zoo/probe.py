"""A fast multiple-choice probe: the zoo build's own check that each model learned its skill.

It scores exactly as lm-eval's `multiple_choice` tasks do with the `hf` backend and an empty
`target_delimiter`: each choice's summed log-probability given `<bos>` + prompt, accuracy =
argmax hits. Being a few lines of batched torch, it scores a skill's items in milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedModel

from evomerge.zoo.skills import MCItem
from evomerge.zoo.tokenizer import PAD, VOCAB
from evomerge.zoo.train import encode

_PAD_ID = VOCAB.index(PAD)


@torch.no_grad()
def choice_logprobs(model: PreTrainedModel, items: Sequence[MCItem]) -> torch.Tensor:
    """(items, choices): log p(choice | prompt) summed over the choice's tokens."""
    sequences, spans = [], []
    for item in items:
        context = encode(item.prompt)
        for choice in item.choices:
            sequences.append(encode(item.prompt + choice))
            spans.append((len(context), len(context) + len(choice)))
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), _PAD_ID, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
    logprobs = torch.log_softmax(model(input_ids=input_ids).logits.float(), dim=-1)  # (N, T, V)
    # token t is predicted at position t - 1
    token_logprobs = logprobs[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (N, T-1)
    positions = torch.arange(width - 1)[None, :]
    starts = torch.tensor([s for s, _ in spans])[:, None] - 1
    ends = torch.tensor([e for _, e in spans])[:, None] - 1
    mask = (positions >= starts) & (positions < ends)
    scores = (token_logprobs * mask).sum(-1)
    return scores.view(len(items), -1)


def mc_accuracy(
    model: PreTrainedModel, items: Sequence[MCItem], *, batch_items: int = 256
) -> float:
    hits = 0
    for start in range(0, len(items), batch_items):
        chunk = items[start : start + batch_items]
        predicted = choice_logprobs(model, chunk).argmax(-1)
        hits += sum(int(p) == item.label for p, item in zip(predicted.tolist(), chunk, strict=True))
    return hits / len(items)


def skill_accuracies(
    model: PreTrainedModel, items: Mapping[str, Sequence[MCItem]]
) -> dict[str, float]:
    model.eval()
    return {skill: mc_accuracy(model, skill_items) for skill, skill_items in items.items()}
