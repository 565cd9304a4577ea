"""Writing a Hugging Face model directory: streamed safetensors shards, config, tokenizer, atomically."""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from evomerge.errors import CheckpointError
from evomerge.io.reader import SAFETENSORS_INDEX, SAFETENSORS_SINGLE

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_SAFETENSORS_METADATA = {"format": "pt"}
_TOKENIZER_FILE_PATTERNS = (
    "tokenizer*.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "spiece.model",
    "sentencepiece*.model",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)
_TOKENIZER_DIRS = ("additional_chat_templates",)


class ShardedWriter:
    """Streams tensors into safetensors shards of at most ``max_shard_bytes`` each.

    Only the shard being filled is held in memory. Shards are written under temporary names,
    since the final count (``model-00001-of-0000N``) is only known at ``finish()``.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._pending_storages: set[int] = set()
        self._written_shards: list[tuple[Path, list[str]]] = []  # temp file, its tensor names
        self._seen: set[str] = set()
        self._total_bytes = 0
        self._total_parameters = 0
        self._finished = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._finished:
            raise RuntimeError("ShardedWriter.add() after finish()")
        if name in self._seen:
            raise ValueError(f"tensor {name!r} was already written")
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        storage = tensor.untyped_storage()
        # safetensors refuses tensors that share storage, and a view would keep its whole
        # base tensor alive while the shard fills: give such tensors their own memory.
        if storage.data_ptr() in self._pending_storages or storage.nbytes() != size:
            tensor = tensor.clone()
            storage = tensor.untyped_storage()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_storages.add(storage.data_ptr())
        self._pending_bytes += size
        self._seen.add(name)
        self._total_bytes += size
        self._total_parameters += tensor.numel()

    def finish(self) -> list[str]:
        """Writes the last shard and the index; returns the file names written."""
        if self._finished:
            raise RuntimeError("ShardedWriter.finish() called twice")
        if not self._seen:
            raise ValueError("ShardedWriter.finish() with no tensors added")
        self._flush()
        self._finished = True
        count = len(self._written_shards)
        if count == 1:
            temp_file, _ = self._written_shards[0]
            temp_file.replace(self.out_dir / SAFETENSORS_SINGLE)
            return [SAFETENSORS_SINGLE]
        weight_map: dict[str, str] = {}
        written: list[str] = []
        for number, (temp_file, names) in enumerate(self._written_shards, start=1):
            shard_name = f"model-{number:05d}-of-{count:05d}.safetensors"
            temp_file.replace(self.out_dir / shard_name)
            weight_map.update(dict.fromkeys(names, shard_name))
            written.append(shard_name)
        index = {
            "metadata": {
                "total_parameters": self._total_parameters,
                "total_size": self._total_bytes,
            },
            "weight_map": dict(sorted(weight_map.items())),
        }
        _write_json(self.out_dir / SAFETENSORS_INDEX, index)
        written.append(SAFETENSORS_INDEX)
        return written

    def _flush(self) -> None:
        if not self._pending:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        temp_file = self.out_dir / f".shard-{len(self._written_shards) + 1:05d}.safetensors.tmp"
        save_file(self._pending, str(temp_file), metadata=_SAFETENSORS_METADATA)
        self._written_shards.append((temp_file, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0
        self._pending_storages = set()


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yields an empty temporary directory beside ``out`` that becomes ``out`` on success.

    On any exception the temporary directory is removed, so a failed run leaves no output.
    """
    out = Path(out).expanduser()
    _check_replaceable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = _make_hidden_dir(out, "tmp")
    try:
        yield temp
        _check_replaceable(out, overwrite)  # something may have appeared meanwhile
        if out.exists():
            old = _make_hidden_dir(out, "old")
            out.replace(old / out.name)
            temp.replace(out)
            shutil.rmtree(old)
        else:
            temp.replace(out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _check_replaceable(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"output path exists and is not a directory: {out}")
    if not overwrite:
        raise CheckpointError(
            f"output directory exists: {out} (pass overwrite=True / --overwrite to replace it)"
        )


def _make_hidden_dir(beside: Path, kind: str) -> Path:
    """A new directory ``.NAME.KIND-<8 random hex digits>`` next to ``beside`` (same filesystem: renames stay atomic)."""
    for _ in range(100):
        candidate = beside.parent / f".{beside.name}.{kind}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir()  # honours the umask, unlike tempfile.mkdtemp's 0o700
        except FileExistsError:
            continue
        return candidate
    raise CheckpointError(f"cannot create a temporary directory beside {beside}")


def copy_tokenizer_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copies the tokenizer, chat template and generation config files; returns their names."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not src_dir.is_dir():
        raise CheckpointError(f"tokenizer source directory not found: {src_dir}")
    dst_dir.mkdir(parents=True, exist_ok=True)
    copied: list[str] = []
    for pattern in _TOKENIZER_FILE_PATTERNS:
        for file in sorted(src_dir.glob(pattern)):
            if file.is_file() and file.name not in copied:
                shutil.copyfile(file, dst_dir / file.name)
                copied.append(file.name)
    for dirname in _TOKENIZER_DIRS:
        if (src_dir / dirname).is_dir():
            shutil.copytree(src_dir / dirname, dst_dir / dirname, dirs_exist_ok=True)
            copied.append(dirname)
    return copied


def write_config(dst_dir: str | Path, config: dict[str, Any], *, dtype: str | None = None) -> Path:
    """Writes ``config.json``; ``dtype`` (e.g. "bfloat16") goes under whichever key the config uses.

    transformers 5.x writes ``dtype``, earlier versions ``torch_dtype``; both are kept if present,
    and a config with neither gets ``dtype``.
    """
    config = dict(config)
    if dtype is not None:
        keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["dtype"]
        for key in keys:
            config[key] = dtype
    path = Path(dst_dir) / "config.json"
    _write_json(path, config)
    return path


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
