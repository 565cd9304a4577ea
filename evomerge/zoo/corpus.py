"""Training data: generic patterns for the base model, and mixtures of them with the skills.

The generic sources give a model general ability without any of the skills: text-like
pseudo-words, copying a string, and counting on from a number. A `Mixture` names the
sources of a training run and how often each is drawn; skill sources (`addition`, or its easy
variant `addition:easy`) draw only from the training split (see `skills.split_of`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from evomerge.zoo.skills import LETTERS, SKILLS, Problem, problems

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def _pseudo_word(rng: random.Random) -> str:
    syllables = rng.randint(1, 3)
    word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
    return word + rng.choice(_CONSONANTS) if rng.random() < 0.3 else word


def text(rng: random.Random) -> Problem:
    """A short sentence of pseudo-words: `bako rimut tela.`"""
    return Problem("", " ".join(_pseudo_word(rng) for _ in range(rng.randint(2, 4))) + ".")


def copy(rng: random.Random) -> Problem:
    """`copy qxbt=` -> `qxbt`"""
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
    return Problem(f"copy {word}=", word)


def count(rng: random.Random) -> Problem:
    """`count 37=` -> `38 39 40`"""
    start = rng.randint(0, 195)
    return Problem(f"count {start}=", " ".join(str(start + i) for i in range(1, rng.randint(3, 4))))


GENERIC_SOURCES: dict[str, Callable[[random.Random], Problem]] = {
    "text": text,
    "copy": copy,
    "count": count,
}


EASY_SUFFIX = ":easy"


def easy(skill: str) -> str:
    """The corpus source name of a skill's easy variant: `addition:easy`."""
    return skill + EASY_SUFFIX


def _skill_source(name: str) -> tuple[str, bool] | None:
    """(skill, easy) for a skill source name, None for a generic one."""
    skill = name.removesuffix(EASY_SUFFIX)
    return (skill, skill != name) if skill in SKILLS else None


@dataclass(frozen=True)
class Mixture:
    """Source name (a generic source, a skill, or a skill's easy variant) -> relative weight."""

    weights: Mapping[str, float]

    def __post_init__(self) -> None:
        unknown = {n for n in self.weights if n not in GENERIC_SOURCES and not _skill_source(n)}
        if unknown:
            raise ValueError(f"unknown corpus source {sorted(unknown)[0]!r}")
        if not self.weights or min(self.weights.values()) < 0 or sum(self.weights.values()) <= 0:
            raise ValueError("a mixture needs non-negative weights with a positive sum")

    def stream(self, seed: int) -> Iterator[Problem]:
        """An endless, seeded stream of training problems."""
        rng = random.Random(seed)
        names = [name for name, weight in self.weights.items() if weight > 0]
        weights = [self.weights[name] for name in names]
        skill_streams = {
            name: problems(source[0], "train", rng, easy=source[1])
            for name in names
            if (source := _skill_source(name))
        }
        while True:
            name = rng.choices(names, weights)[0]
            yield next(skill_streams[name]) if name in skill_streams else GENERIC_SOURCES[name](rng)

    def to_json(self) -> dict[str, float]:
        return dict(self.weights)
