"""Checkpoint I/O: lazy safetensors reading, tensor-name meaning, sharded atomic writing."""

from evomerge.io.layers import (
    TensorRole,
    is_vocab_tensor,
    layer_index,
    num_layers_from_config,
    set_num_layers,
    tensor_role,
    with_layer_index,
)
from evomerge.io.reader import ModelReader
from evomerge.io.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    ShardedWriter,
    atomic_output_dir,
    copy_tokenizer_files,
    write_config,
)

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "ModelReader",
    "ShardedWriter",
    "TensorRole",
    "atomic_output_dir",
    "copy_tokenizer_files",
    "is_vocab_tensor",
    "layer_index",
    "num_layers_from_config",
    "set_num_layers",
    "tensor_role",
    "with_layer_index",
    "write_config",
]
