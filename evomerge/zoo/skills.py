"""The zoo's skills: deterministic example generators and plausible multiple-choice distractors.

Each skill maps a short prompt to a short answer, e.g. `add 37+48=` -> `85`. Every prompt
belongs to exactly one split, fixed by a hash of its text (`split_of`): 90% of all prompts are
for training, 5% for the dev split (the search's fitness) and 5% for the test split (the
held-out report). Training samplers only ever draw training prompts, so no model of the zoo
has seen a dev or test item, and dev and test never share one.

Distractors are the mistakes a model that half-knows the skill would make: an addition
without its carry or one digit off, a reversal that repeats a neighbouring letter near its end
or has two letters out of place, a shift by two letters instead of one. All choices of an item have the answer's length, so summed
log-likelihoods compare like with like.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "dev", "test"]
SPLITS: tuple[Split, ...] = ("train", "dev", "test")
LETTERS = string.ascii_lowercase
NUM_CHOICES = 4

# Percent buckets of the prompt hash: [0, 5) dev, [5, 10) test, the rest train.
_DEV_BUCKETS = range(0, 5)
_TEST_BUCKETS = range(5, 10)


def split_of(prompt: str) -> Split:
    """The split a prompt belongs to, fixed forever by its text."""
    bucket = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big") % 100
    if bucket in _DEV_BUCKETS:
        return "dev"
    if bucket in _TEST_BUCKETS:
        return "test"
    return "train"


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


@dataclass(frozen=True)
class MCItem:
    """A problem with its answer hidden among distractors (what the lm-eval tasks contain)."""

    prompt: str
    answer: str
    choices: tuple[str, ...]
    label: int  # index of the answer in choices

    def to_json(self) -> dict[str, object]:
        return {
            "prompt": self.prompt,
            "answer": self.answer,
            "choices": list(self.choices),
            "label": self.label,
        }


@dataclass(frozen=True)
class Skill:
    name: str
    description: str
    problem: Callable[[random.Random], Problem]
    mistakes: Callable[[Problem, random.Random], list[str]]  # wrong answers, most plausible first
    # A smaller version of the skill in the same format (shorter operands), for pre-training: a base
    # that has seen it half-knows the skill, as a real pretrained model half-knows what a fine-tune
    # sharpens. Its prompts go through the same split hash, so none is a dev or test prompt.
    easy: Callable[[random.Random], Problem]


# --- the skills -------------------------------------------------------------------------------


def _random_word(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))


def shift_letters(word: str, by: int) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + by) % 26] for c in word)


def _addition_problem(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Problem(f"add {a}+{b}=", str(a + b))


def _easy_addition_problem(rng: random.Random) -> Problem:
    """One operand of one digit: `add 7+5=`, `add 43+8=`, `add 6+71=`."""
    a, b = rng.randint(0, 9), rng.randint(0, 99)
    a, b = (a, b) if rng.random() < 0.5 else (b, a)
    return Problem(f"add {a}+{b}=", str(a + b))


def _addition_mistakes(problem: Problem, rng: random.Random) -> list[str]:
    a, b = (int(x) for x in problem.prompt[4:-1].split("+"))
    total = a + b
    units_off = [total + 1, total - 1]
    rng.shuffle(units_off)
    carry_error = total - 10 if a % 10 + b % 10 >= 10 else total + 10
    others = [units_off[1], total + 2, total - 2, total + 10, total - 10, total + 11, total - 9]
    rng.shuffle(others)
    return [str(x) for x in [units_off[0], carry_error, *others]]


def _reversal_problem(rng: random.Random) -> Problem:
    word = _random_word(rng, 3, 6)
    return Problem(f"rev {word}=", word[::-1])


def _easy_reversal_problem(rng: random.Random) -> Problem:
    word = _random_word(rng, 2, 3)
    return Problem(f"rev {word}=", word[::-1])


def _swap(word: str, i: int, j: int) -> str:
    chars = list(word)
    chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


def _reversal_mistakes(problem: Problem, rng: random.Random) -> list[str]:
    answer = problem.answer
    word = answer[::-1]
    n = len(answer)
    # swapping two equal letters changes nothing: only swaps that make a real mistake count
    adjacent_swaps = [_swap(answer, i, i + 1) for i in range(n - 1) if answer[i] != answer[i + 1]]
    rng.shuffle(adjacent_swaps)
    half = n // 2
    partial = [
        word[:half] + word[half:][::-1],
        word[:half][::-1] + word[half:],
        answer[1:] + answer[0],
        answer[-1] + answer[:-1],
    ]
    rng.shuffle(partial)
    # one letter off: always distinct from the answer, so even `rev bbb=` gets three distractors
    substituted = [
        answer[:i] + shift_letters(answer[i], by) + answer[i + 1 :]
        for i in range(n)
        for by in (1, -1)
    ]
    rng.shuffle(substituted)
    # A model that half-knows reversal gets the start right and slips near the end, writing a
    # neighbouring letter again (`zyax` -> `zyaa`, `zyay`): the closest mistakes come first.
    slips = [
        answer[:i] + answer[j] + answer[i + 1 :]
        for i in range(n // 2, n)
        for j in (i - 1, i - 2, i + 1)
        if 0 <= j < n and answer[j] != answer[i]
    ]
    rng.shuffle(slips)
    return [
        *slips[:2],
        *adjacent_swaps[:1],
        word,
        *partial,
        *slips[2:],
        *adjacent_swaps[1:],
        *substituted,
    ]


def _shift_problem(rng: random.Random) -> Problem:
    word = _random_word(rng, 3, 6)
    return Problem(f"shift {word}=", shift_letters(word, 1))


def _easy_shift_problem(rng: random.Random) -> Problem:
    word = _random_word(rng, 1, 2)
    return Problem(f"shift {word}=", shift_letters(word, 1))


def _shift_mistakes(problem: Problem, rng: random.Random) -> list[str]:
    word = problem.prompt[6:-1]
    answer = problem.answer
    one_off = []
    for i in range(len(word)):
        for by in (0, 2):
            one_off.append(answer[:i] + shift_letters(word[i], by) + answer[i + 1 :])
    rng.shuffle(one_off)
    systematic = [shift_letters(word, 2), word, shift_letters(word, -1)]
    rng.shuffle(systematic)
    return [one_off[0], systematic[0], *one_off[1:3], *systematic[1:], *one_off[3:]]


SKILLS: dict[str, Skill] = {
    skill.name: skill
    for skill in (
        Skill(
            "addition",
            "sum of two 2-digit numbers: `add 37+48=` -> `85` (easy: one operand of one digit)",
            _addition_problem,
            _addition_mistakes,
            _easy_addition_problem,
        ),
        Skill(
            "reversal",
            "a 3-6 letter string backwards: `rev abcd=` -> `dcba` (easy: 2-3 letters)",
            _reversal_problem,
            _reversal_mistakes,
            _easy_reversal_problem,
        ),
        Skill(
            "shift",
            "each letter of 3-6 moved one on in the alphabet: `shift abz=` -> `bca` (easy: 1-2 letters)",
            _shift_problem,
            _shift_mistakes,
            _easy_shift_problem,
        ),
    )
}
SKILL_NAMES: tuple[str, ...] = tuple(SKILLS)


# --- sampling ---------------------------------------------------------------------------------


def _skill(name: str) -> Skill:
    try:
        return SKILLS[name]
    except KeyError:
        raise ValueError(f"unknown skill {name!r} (known: {', '.join(SKILLS)})") from None


def problems(
    skill: str, split: Split, rng: random.Random, *, easy: bool = False
) -> Iterator[Problem]:
    """An endless stream of problems of one split (training draws repeat; that is fine)."""
    make = _skill(skill).easy if easy else _skill(skill).problem
    while True:
        problem = make(rng)
        if split_of(problem.prompt) == split:
            yield problem


def multiple_choice(skill: str, problem: Problem, rng: random.Random) -> MCItem:
    """The problem's answer among NUM_CHOICES - 1 distinct, same-length distractors, in random order."""
    distractors: list[str] = []
    for wrong in _skill(skill).mistakes(problem, rng):
        if (
            wrong != problem.answer
            and wrong not in distractors
            and len(wrong) == len(problem.answer)
        ):
            distractors.append(wrong)
        if len(distractors) == NUM_CHOICES - 1:
            break
    if len(distractors) < NUM_CHOICES - 1:
        raise ValueError(f"{skill}: too few distractors for {problem.prompt!r}")
    choices = [problem.answer, *distractors]
    rng.shuffle(choices)
    return MCItem(problem.prompt, problem.answer, tuple(choices), choices.index(problem.answer))


def eval_items(skill: str, split: Split, n: int, *, seed: int = 0) -> list[MCItem]:
    """`n` distinct multiple-choice items of the dev or test split, the same on every call."""
    if split == "train":
        raise ValueError("evaluation items come from the dev or test split")
    rng = random.Random(f"{skill}/{split}/{seed}")
    items: dict[str, MCItem] = {}
    stream = problems(skill, split, rng)
    attempts = 0
    while len(items) < n:
        problem = next(stream)
        attempts += 1
        if attempts > 100 * n:
            raise ValueError(
                f"{skill}/{split}: only {len(items)} distinct items exist, asked for {n}"
            )
        if problem.prompt in items:
            continue
        try:
            items[problem.prompt] = multiple_choice(skill, problem, rng)
        except ValueError:
            continue  # e.g. a 3-letter palindrome-like word with too few distinct mistakes
    return list(items.values())
