"""Lazy reading of a Hugging Face model directory: one tensor at a time, memory-mapped.

Safetensors only, single file or sharded. Pickle weights (``pytorch_model.bin``) are refused
unless the caller opts in, because unpickling can run code.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from evomerge.errors import CheckpointError
from evomerge.io.layers import num_layers_from_config

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Pickles a training run leaves beside the weights; they are not weights.
_PICKLE_NON_WEIGHTS = frozenset(
    {"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.pt"}
)

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class ModelReader:
    """A model directory whose tensors are read on demand, each shard opened once.

    ``names`` lists the tensors actually stored: a model with tied embeddings usually stores no
    ``lm_head.weight``, and none is invented here (``config["tie_word_embeddings"]`` tells).
    """

    def __init__(self, path: str | Path, *, allow_pickle: bool = False) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise CheckpointError(f"model directory not found: {self.path}")
        if not self.path.is_dir():
            raise CheckpointError(f"model path is not a directory: {self.path}")
        self.config: dict[str, Any] = _read_json(self.path / "config.json", "config.json")
        self._lock = threading.Lock()
        self._safetensors: dict[Path, Any] = {}  # shard file -> open safe_open handle
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}  # shard file -> loaded tensors
        self._is_pickle, self._file_of = self._locate_weights(allow_pickle)
        self.names: list[str] = sorted(self._file_of)

    @property
    def num_layers(self) -> int:
        try:
            return num_layers_from_config(self.config)
        except CheckpointError as e:
            raise CheckpointError(f"{self.path / 'config.json'}: {e}") from None

    def has(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> torch.Size:
        file = self._file(name)
        if self._is_pickle:
            return self._pickle_tensors(file)[name].shape
        return torch.Size(self._safetensors_handle(file).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        file = self._file(name)
        if self._is_pickle:
            return self._pickle_tensors(file)[name].dtype
        stored = self._safetensors_handle(file).get_slice(name).get_dtype()
        if stored in _SAFETENSORS_DTYPES:
            return _SAFETENSORS_DTYPES[stored]
        return self.get(name).dtype

    def get(
        self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """One tensor, read from disk alone, as a fresh tensor the caller may modify in place.

        (Safetensors hands out views of the shard's memory map; editing one in place would
        change what later reads of the same handle return, hence the copy.)
        """
        file = self._file(name)
        if self._is_pickle:
            stored = self._pickle_tensors(file)[name]
        else:
            try:
                stored = self._safetensors_handle(file).get_tensor(name)
            except SafetensorError as e:
                raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None
        return stored.to(device=device, dtype=dtype, copy=True)

    def close(self) -> None:
        with self._lock:
            self._safetensors.clear()
            self._pickles.clear()

    def __enter__(self) -> ModelReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelReader({str(self.path)!r}, {len(self.names)} tensors)"

    def _file(self, name: str) -> Path:
        try:
            return self._file_of[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} not found in model {self.path}") from None

    def _locate_weights(self, allow_pickle: bool) -> tuple[bool, dict[str, Path]]:
        """Which file holds each tensor, and whether those files are pickles."""
        safetensors_map = self._weight_map(SAFETENSORS_INDEX, SAFETENSORS_SINGLE, ".safetensors")
        if safetensors_map:
            return False, safetensors_map
        pickle_files = self._pickle_weight_files()
        if not pickle_files:
            raise CheckpointError(f"no weights in {self.path} (expected *.safetensors files)")
        if not allow_pickle:
            listed = ", ".join(f.name for f in pickle_files[:3])
            raise CheckpointError(
                f"{self.path} has only pickle weights ({listed}), which can run code when "
                "loaded; pass allow_pickle=True (CLI: --allow-pickle) to load them with "
                "torch.load(weights_only=True), or convert them to safetensors"
            )
        return True, self._weight_map(PICKLE_INDEX, PICKLE_SINGLE, None)

    def _weight_map(self, index_name: str, single_name: str, suffix: str | None) -> dict[str, Path]:
        index_path = self.path / index_name
        if index_path.is_file():
            return self._weight_map_from_index(index_path)
        if (self.path / single_name).is_file():
            files = [self.path / single_name]
        elif suffix is not None:
            files = sorted(self.path.glob(f"*{suffix}"))
        else:
            files = self._pickle_weight_files()
        weight_map: dict[str, Path] = {}
        for file in files:
            for name in self._names_in_file(file):
                if name in weight_map:
                    raise CheckpointError(
                        f"tensor {name!r} is stored twice in {self.path} "
                        f"({weight_map[name].name} and {file.name}); add an index file"
                    )
                weight_map[name] = file
        return weight_map

    def _weight_map_from_index(self, index_path: Path) -> dict[str, Path]:
        index = _read_json(index_path, index_path.name)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no weight_map")
        files = {shard: self.path / shard for shard in set(weight_map.values())}
        for shard, file in sorted(files.items()):
            if not file.is_file():
                raise CheckpointError(f"{index_path} lists shard {shard}, which is missing")
        return {name: files[shard] for name, shard in weight_map.items()}

    def _names_in_file(self, file: Path) -> list[str]:
        if self._is_pickle_file(file):
            return list(self._pickle_tensors(file))
        return list(self._safetensors_handle(file).keys())

    def _pickle_weight_files(self) -> list[Path]:
        if (self.path / PICKLE_INDEX).is_file():
            return [self.path / PICKLE_INDEX]
        return sorted(
            f
            for f in self.path.iterdir()
            if f.is_file() and f.suffix in _PICKLE_SUFFIXES and f.name not in _PICKLE_NON_WEIGHTS
        )

    @staticmethod
    def _is_pickle_file(file: Path) -> bool:
        return file.suffix in _PICKLE_SUFFIXES

    def _safetensors_handle(self, file: Path) -> Any:
        with self._lock:
            handle = self._safetensors.get(file)
            if handle is None:
                try:
                    handle = safe_open(str(file), framework="pt", device="cpu")
                except (SafetensorError, OSError) as e:
                    raise CheckpointError(
                        f"{file}: not a readable safetensors file ({e})"
                    ) from None
                self._safetensors[file] = handle
            return handle

    def _pickle_tensors(self, file: Path) -> dict[str, torch.Tensor]:
        with self._lock:
            tensors = self._pickles.get(file)
            if tensors is None:
                tensors = _load_pickle_state_dict(file)
                self._pickles[file] = tensors
            return tensors


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"no {what} in {path.parent}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _load_pickle_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, restricted to tensors (weights_only) and memory-mapped if possible."""
    try:
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (pre-zipfile) format cannot be memory-mapped
            loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{file}: cannot load as a weights-only state dict ({message})"
        ) from None
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise CheckpointError(f"{file}: not a flat state dict of named tensors")
    return loaded
