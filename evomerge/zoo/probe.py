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
from evomerge.zoo.tokenizer import EOS, PAD, VOCAB
from evomerge.zoo.train import encode

_PAD_ID = VOCAB.index(PAD)
_EOS_ID = VOCAB.index(EOS)
_NEWLINE_ID = VOCAB.index("\n")


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


@torch.no_grad()
def greedy_answers(
    model: PreTrainedModel, prompts: Sequence[str], *, max_new_tokens: int = 8
) -> list[str]:
    """Greedy continuations up to `<eos>` or a newline, as the `_gen` lm-eval tasks generate them.

    Prompts of one length decode together, so no padding or attention mask is needed.
    """
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    answers = [""] * len(prompts)
    for indices in by_length.values():
        input_ids = torch.tensor([encode(prompts[i]) for i in indices])
        done = torch.zeros(len(indices), dtype=torch.bool)
        generated: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            next_ids = model(input_ids=input_ids).logits[:, -1].argmax(-1)
            generated.append(next_ids)
            done |= (next_ids == _EOS_ID) | (next_ids == _NEWLINE_ID)
            if bool(done.all()):
                break
            input_ids = torch.cat([input_ids, next_ids[:, None]], dim=1)
        tokens = torch.stack(generated, dim=1).tolist()
        for row, index in enumerate(indices):
            text = []
            for token in tokens[row]:
                if token in (_EOS_ID, _NEWLINE_ID):
                    break
                text.append(VOCAB[token] if token < len(VOCAB) else "")
            answers[index] = "".join(text)
    return answers


def exact_match(model: PreTrainedModel, items: Sequence[MCItem]) -> float:
    """Share of items whose greedy answer is exactly the right one (the `_gen` tasks' metric)."""
    answers = greedy_answers(model, [item.prompt for item in items])
    return sum(a == item.answer for a, item in zip(answers, items, strict=True)) / len(items)
