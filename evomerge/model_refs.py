"""Model references in configs and recipes: `zoo:base` / `zoo:<skill>` name the demo zoo, others are paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError


def resolve_model(ref: str) -> str:
    """`zoo:base` / `zoo:<skill>` name the built-in demo zoo (built on first use); others are paths."""
    if not ref.startswith("zoo:"):
        return str(Path(ref).expanduser().resolve())
    from evomerge.zoo.build import build_zoo

    zoo = build_zoo()
    name = ref.removeprefix("zoo:")
    if name == "base":
        return str(zoo.base)
    if name not in zoo.specialists:
        raise ConfigError(f"'{ref}': the zoo has base and {sorted(zoo.specialists)}")
    return str(zoo.specialists[name])


def resolve_recipe_refs(data: Any) -> Any:
    """A recipe mapping with every `zoo:` model reference replaced by its path."""
    if isinstance(data, dict):
        return {
            k: resolve_model(v)
            if k in ("model", "base_model", "tokenizer_source")
            and isinstance(v, str)
            and v.startswith("zoo:")
            else resolve_recipe_refs(v)
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [resolve_recipe_refs(v) for v in data]
    return data
