"""Build the demo zoo: a tiny Llama base model and one specialist per skill, on the CPU.

    zoo = build_zoo()            # reuses a finished build; ~4.5 minutes on 2 cores otherwise
    zoo.base, zoo.specialists["addition"]

Layout of a zoo directory (the quick zoo lives in its own `quick/` subdirectory):

    zoo.json                  manifest, written last: a build without it is never reused
    base/                     config.json, model.safetensors, tokenizer files
    addition/ reversal/ shift/

Every model directory is written to a temporary directory and renamed into place, and the
manifest records the design it was built with (shape, data mixtures, training settings,
seeds), the library versions, the build time and each model's measured dev accuracy.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from evomerge.atomic import atomic_write_text
from evomerge.errors import CheckpointError
from evomerge.zoo.corpus import Mixture, easy
from evomerge.zoo.model import ModelShape, new_model, parameter_count
from evomerge.zoo.probe import skill_accuracies
from evomerge.zoo.skills import SKILL_NAMES, SKILLS, eval_items
from evomerge.zoo.tokenizer import save_tokenizer
from evomerge.zoo.train import TrainConfig, set_cpu_threads, train

MANIFEST = "zoo.json"
FORMAT_VERSION = 2  # 2: the base half-knows the skills (easy variants, per-skill traces)
ZOO_DIR_ENV = "EVOMERGE_ZOO_DIR"
PROBE_ITEMS = 150  # dev items per skill for the manifest's accuracy table


@dataclass(frozen=True)
class Zoo:
    root: Path
    base: Path
    specialists: dict[str, Path]
    skills: tuple[str, ...]

    @property
    def models(self) -> dict[str, Path]:
        return {"base": self.base, **self.specialists}

    def manifest(self) -> dict[str, object]:
        return json.loads((self.root / MANIFEST).read_text())


@dataclass(frozen=True)
class ZooDesign:
    """Everything that decides the zoo's weights."""

    shape: ModelShape
    pretrain_mixture: Mixture
    pretrain: TrainConfig
    finetune: TrainConfig
    # share of each fine-tune's examples replayed from the pre-training mixture (generic data, the
    # easy variants and the traces of every skill), which keeps what the base knew of the others
    finetune_replay: float
    # Skills are not equally hard to sharpen: 2-digit addition and reversing up to 6 letters need
    # about twice the steps letter shifting needs, so their fine-tunes run longer by this factor.
    finetune_steps_factor: dict[str, float] = field(default_factory=dict)
    skills: tuple[str, ...] = SKILL_NAMES
    seed_offset: dict[str, int] = field(
        default_factory=lambda: {s: i + 1 for i, s in enumerate(SKILL_NAMES)}
    )

    def finetune_mixture(self, skill: str) -> Mixture:
        total = sum(self.pretrain_mixture.weights.values())
        replay = {
            name: self.finetune_replay * weight / total
            for name, weight in self.pretrain_mixture.weights.items()
        }
        return Mixture({**replay, skill: replay.get(skill, 0.0) + 1 - self.finetune_replay})

    def finetune_config(self, skill: str) -> TrainConfig:
        steps = round(self.finetune.steps * self.finetune_steps_factor.get(skill, 1.0))
        return TrainConfig(
            **{
                **self.finetune.__dict__,
                "steps": steps,
                "seed": self.finetune.seed + self.seed_offset[skill],
            }
        )

    def to_json(self) -> dict[str, object]:
        return {
            "skills": {skill: SKILLS[skill].description for skill in self.skills},
            "shape": self.shape.to_json(),
            "pretrain": {"mixture": self.pretrain_mixture.to_json(), **self.pretrain.to_json()},
            "finetune": {
                skill: {
                    "mixture": self.finetune_mixture(skill).to_json(),
                    **self.finetune_config(skill).to_json(),
                }
                for skill in self.skills
            },
        }


# The base half-knows every skill, as a pretrained model half-knows what a fine-tune sharpens:
# 30% of its pre-training is the skills' easy variants (1-digit operands, 2-3 letter reversals,
# 1-2 letter shifts) and a trace is the full-size skills, sized per skill so that the base scores
# about half on each (shifting is picked up from far fewer examples than addition). Fine-tuning
# then only sharpens: a low learning rate, half of every batch replayed from pre-training. The
# specialists' task vectors stay small and merge; designed with scripts/zoo_experiment.py.
_SKILL_TRACE = {"addition": 0.02, "reversal": 0.01, "shift": 0.001}
_EASY_SHARE = 0.3
_GENERIC_SHARE = 1 - _EASY_SHARE - sum(_SKILL_TRACE.values())

FULL_DESIGN = ZooDesign(
    shape=ModelShape(),
    pretrain_mixture=Mixture(
        {
            **dict.fromkeys(("text", "copy", "count"), _GENERIC_SHARE / 3),
            **_SKILL_TRACE,
            **dict.fromkeys(map(easy, SKILL_NAMES), _EASY_SHARE / len(SKILL_NAMES)),
        }
    ),
    pretrain=TrainConfig(steps=1200, lr=2e-3, batch_size=64, warmup_steps=50, seed=0),
    finetune=TrainConfig(steps=300, lr=5e-4, batch_size=64, warmup_steps=20, seed=0),
    finetune_replay=0.5,
    finetune_steps_factor={"addition": 2.0, "reversal": 2.0},
)

QUICK_DESIGN = ZooDesign(
    shape=ModelShape(),
    pretrain_mixture=FULL_DESIGN.pretrain_mixture,
    pretrain=TrainConfig(steps=200, lr=3e-3, batch_size=32, warmup_steps=20, seed=0),
    finetune=TrainConfig(steps=80, lr=2e-3, batch_size=32, warmup_steps=10, seed=0),
    finetune_replay=0.25,
    finetune_steps_factor={"addition": 2.5},
)


def default_zoo_dir() -> Path:
    """`$EVOMERGE_ZOO_DIR`, else `~/.cache/evomerge/zoo`."""
    env = os.environ.get(ZOO_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "evomerge" / "zoo"


def zoo_root(out_dir: Path | None = None, *, quick: bool = False) -> Path:
    root = (out_dir or default_zoo_dir()).expanduser().resolve()
    return root / "quick" if quick else root


def _zoo_at(root: Path, skills: tuple[str, ...]) -> Zoo:
    return Zoo(
        root=root, base=root / "base", specialists={s: root / s for s in skills}, skills=skills
    )


def load_zoo(out_dir: Path | None = None, *, quick: bool = False) -> Zoo | None:
    """The finished zoo built with the current design, or None (absent, partial, or outdated)."""
    return finished_zoo(zoo_root(out_dir, quick=quick), QUICK_DESIGN if quick else FULL_DESIGN)


def build_zoo(
    out_dir: Path | None = None, *, force: bool = False, quick: bool = False, progress: bool = True
) -> Zoo:
    """Build the zoo (or reuse a finished one) and return where its models are.

    `quick=True` builds a reduced zoo for tests in its own subdirectory; its models are weaker.
    """
    design = QUICK_DESIGN if quick else FULL_DESIGN
    kind = "quick" if quick else "full"
    return build(zoo_root(out_dir, quick=quick), design, kind=kind, force=force, progress=progress)


def finished_zoo(root: Path, design: ZooDesign) -> Zoo | None:
    """The zoo under `root` if its manifest says it was fully built with `design`."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("design") != _jsonable(
        design.to_json()
    ):
        return None
    zoo = _zoo_at(root, tuple(manifest["skills"]))
    if not all((path / "model.safetensors").is_file() for path in zoo.models.values()):
        return None
    return zoo


def build(
    root: Path,
    design: ZooDesign,
    *,
    kind: str = "custom",
    force: bool = False,
    progress: bool = True,
) -> Zoo:
    """Train and save a zoo of `design` under `root`, unless a finished one is already there."""
    if not force and (existing := finished_zoo(root, design)) is not None:
        return existing
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the build's own bars only: no "Writing model shards" / "Loading weights"
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)  # from here on, the old build is gone
    threads = set_cpu_threads()
    started = time.time()
    zoo = _zoo_at(root, design.skills)

    with _progress(progress) as bar:
        base = new_model(design.shape, seed=design.pretrain.seed)
        _train_with_bar(bar, "base: pre-training", base, design.pretrain_mixture, design.pretrain)
        _save_model(base, zoo.base)
        base_state = {name: tensor.clone() for name, tensor in base.state_dict().items()}
        for skill in design.skills:
            specialist = new_model(design.shape, seed=design.pretrain.seed)
            specialist.load_state_dict(base_state)
            _train_with_bar(
                bar,
                f"{skill}: fine-tuning",
                specialist,
                design.finetune_mixture(skill),
                design.finetune_config(skill),
            )
            _save_model(specialist, zoo.specialists[skill])
    build_seconds = time.time() - started
    accuracy = _measure(zoo)

    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "skills": list(design.skills),
        "models": {name: path.name for name, path in zoo.models.items()},
        "parameters": parameter_count(base),
        "design": _jsonable(design.to_json()),
        "dev_accuracy": accuracy,
        "build_seconds": round(build_seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "threads": threads,
        "versions": _versions(),
    }
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    if progress:
        _print_accuracy(accuracy, build_seconds)
    return zoo


# --- helpers -------------------------------------------------------------------------------------


def _jsonable(value: object) -> object:
    """What the value reads back as from JSON (tuples become lists), for manifest comparison."""
    return json.loads(json.dumps(value))


def _versions() -> dict[str, str]:
    import tokenizers
    import transformers

    from evomerge import __version__

    return {
        "evomerge": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "python": platform.python_version(),
    }


def _save_model(model: PreTrainedModel, out: Path) -> None:
    """Model + tokenizer into `out`, atomically: a temporary sibling directory renamed into place."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tmp)
        if not (tmp / "model.safetensors").is_file():
            raise CheckpointError(f"{tmp}: transformers wrote no model.safetensors")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(zoo: Zoo) -> dict[str, dict[str, float]]:
    """Dev-split multiple-choice accuracy of every model on every skill (the build's self-check)."""
    from transformers import AutoModelForCausalLM

    items = {skill: eval_items(skill, "dev", PROBE_ITEMS) for skill in zoo.skills}
    accuracy = {}
    for name, path in zoo.models.items():
        model = AutoModelForCausalLM.from_pretrained(path)
        accuracy[name] = {
            skill: round(acc, 4) for skill, acc in skill_accuracies(model, items).items()
        }
    return accuracy


@contextmanager
def _progress(enabled: bool) -> Iterator[object | None]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description:24s}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        yield bar


def _train_with_bar(
    bar: object | None, label: str, model: PreTrainedModel, mixture: Mixture, config: TrainConfig
) -> None:
    if bar is None:
        train(model, mixture, config)
        return
    task = bar.add_task(label, total=config.steps, loss="")  # type: ignore[attr-defined]

    def on_step(step: int, loss: float) -> None:
        bar.update(task, completed=step + 1, loss=f"loss {loss:.3f}")  # type: ignore[attr-defined]

    train(model, mixture, config, on_step=on_step)


def _print_accuracy(accuracy: dict[str, dict[str, float]], seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    skills = list(next(iter(accuracy.values())))
    table = Table(
        title=f"zoo built in {seconds:.0f}s; multiple-choice accuracy on the dev split (4 choices)"
    )
    table.add_column("model")
    for skill in skills:
        table.add_column(skill, justify="right")
    for name, row in accuracy.items():
        table.add_row(name, *(f"{row[s]:.2f}" for s in skills))
    Console().print(table)
