"""Checkpoint I/O against real (tiny) transformers checkpoints saved by the installed transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PhiConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

import evomerge.io.reader as reader_module
from evomerge.errors import CheckpointError
from evomerge.io import (
    ModelReader,
    ShardedWriter,
    atomic_output_dir,
    copy_tokenizer_files,
    is_vocab_tensor,
    layer_index,
    num_layers_from_config,
    set_num_layers,
    tensor_role,
    with_layer_index,
    write_config,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NUM_LAYERS = 2
SMALL_SHARD = "20KB"  # the tiny models are ~90 KB: several shards each


def _configs() -> dict[str, PretrainedConfig]:
    common = {"num_hidden_layers": NUM_LAYERS, "vocab_size": 64, "num_attention_heads": 4}
    llama_like = {**common, "hidden_size": 32, "intermediate_size": 64, "num_key_value_heads": 2}
    return {
        "llama": LlamaConfig(**llama_like, tie_word_embeddings=True),
        "gpt2": GPT2Config(n_embd=32, n_layer=NUM_LAYERS, n_head=4, vocab_size=64, n_positions=64),
        "qwen2": Qwen2Config(**llama_like, tie_word_embeddings=False),
        "neox": GPTNeoXConfig(**common, hidden_size=32, intermediate_size=64),
        "opt": OPTConfig(**common, hidden_size=32, ffn_dim=64, max_position_embeddings=64),
        "falcon": FalconConfig(**common, hidden_size=32),
        "phi": PhiConfig(**common, hidden_size=32, intermediate_size=64),
    }


# Per architecture: the layer container prefix, and the non-layer tensors by role, as stored.
LAYOUT = {
    "llama": (
        "model.layers",
        {"embed": ["model.embed_tokens.weight"], "post": ["model.norm.weight"]},
    ),
    "gpt2": (
        "transformer.h",
        {
            "embed": ["transformer.wte.weight"],
            "pre": ["transformer.wpe.weight"],
            "post": ["transformer.ln_f.weight", "transformer.ln_f.bias"],
        },
    ),
    "qwen2": (
        "model.layers",
        {
            "embed": ["model.embed_tokens.weight"],
            "head": ["lm_head.weight"],
            "post": ["model.norm.weight"],
        },
    ),
    "neox": (
        "gpt_neox.layers",
        {
            "embed": ["gpt_neox.embed_in.weight"],
            "head": ["embed_out.weight"],
            "post": ["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias"],
        },
    ),
    "opt": (
        "model.decoder.layers",
        {
            "embed": ["model.decoder.embed_tokens.weight"],
            "pre": ["model.decoder.embed_positions.weight"],
            "post": [
                "model.decoder.final_layer_norm.weight",
                "model.decoder.final_layer_norm.bias",
            ],
        },
    ),
    "falcon": (
        "transformer.h",
        {
            "embed": ["transformer.word_embeddings.weight"],
            "post": ["transformer.ln_f.weight", "transformer.ln_f.bias"],
        },
    ),
    "phi": (
        "model.layers",
        {
            "embed": ["model.embed_tokens.weight"],
            "head": ["lm_head.weight", "lm_head.bias"],
            "post": ["model.final_layernorm.weight", "model.final_layernorm.bias"],
        },
    ),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """Each architecture saved sharded; with the state dict the model had in memory."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    models = {}
    for arch, config in _configs().items():
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(root / arch, safe_serialization=True, max_shard_size=SMALL_SHARD)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        models[arch] = (root / arch, state)
    return models


def _stored_names(model_dir: Path) -> list[str]:
    names = []
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            names.extend(handle.keys())
    return sorted(names)


# ---------------------------------------------------------------- layers


@pytest.mark.parametrize("arch", list(LAYOUT))
def test_layer_index_and_role_of_every_stored_name(saved, arch):
    model_dir, _ = saved[arch]
    prefix, outside = LAYOUT[arch]
    names = _stored_names(model_dir)
    assert len(list(model_dir.glob("model-*-of-*.safetensors"))) > 1  # really sharded
    expected_outside = {name: role for role, group in outside.items() for name in group}
    layer_names = [n for n in names if n.startswith(prefix + ".")]
    assert sorted(expected_outside) == sorted(set(names) - set(layer_names))
    for name in layer_names:
        expected_index = int(name[len(prefix) + 1 :].split(".")[0])
        assert layer_index(name) == expected_index, name
        assert tensor_role(name) == "layer", name
        assert not is_vocab_tensor(name)
        moved = with_layer_index(name, 17)
        assert moved == name.replace(f"{prefix}.{expected_index}.", f"{prefix}.17.", 1)
        assert layer_index(moved) == 17
    assert {layer_index(n) for n in layer_names} == set(range(NUM_LAYERS))
    for name, role in expected_outside.items():
        assert layer_index(name) is None, name
        assert tensor_role(name) == role, name
        assert is_vocab_tensor(name) == (role in ("embed", "head"))


@pytest.mark.parametrize(
    ("name", "index", "role"),
    [
        ("model.layers.3.block_sparse_moe.experts.7.w1.weight", 3, "layer"),  # Mixtral
        ("h.11.attn.c_attn.weight", 11, "layer"),  # GPT-2 without the transformer. prefix
        ("transformer.blocks.5.ffn.up_proj.weight", 5, "layer"),  # MPT
        ("transformer.encoder.layers.0.mlp.dense_h_to_4h.weight", 0, "layer"),  # ChatGLM
        ("language_model.model.layers.12.mlp.up_proj.weight", 12, "layer"),  # multimodal wrapper
        ("transformer.word_embeddings_layernorm.weight", None, "pre"),  # BLOOM
        ("model.decoder.project_in.weight", None, "pre"),  # OPT-350m
        ("model.decoder.project_out.weight", None, "post"),
        ("transformer.norm_f.weight", None, "post"),  # MPT
        ("model.tok_embeddings.weight", None, "embed"),  # InternLM2
        ("output.weight", None, "head"),  # InternLM2
        ("transformer.output_layer.weight", None, "head"),  # ChatGLM
        ("backbone.embeddings.weight", None, "embed"),  # Mamba
        ("model.post_norm.weight", None, "post"),
    ],
)
def test_layer_index_and_role_of_other_architectures(name, index, role):
    assert layer_index(name) == index
    assert tensor_role(name) == role


def test_with_layer_index_rejects_tensors_outside_layers():
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        with_layer_index("model.norm.weight", 0)
    with pytest.raises(CheckpointError, match=">= 0"):
        with_layer_index("model.layers.1.mlp.up_proj.weight", -1)


def test_num_layers_from_config_keys():
    assert num_layers_from_config(GPT2Config(n_layer=5).to_dict()) == 5
    assert num_layers_from_config(LlamaConfig(num_hidden_layers=7).to_dict()) == 7
    assert num_layers_from_config({"num_layers": 3}) == 3
    assert num_layers_from_config({"text_config": {"num_hidden_layers": 9}}) == 9
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        num_layers_from_config({"hidden_size": 8})


@pytest.mark.parametrize(
    ("make_config", "old_n", "new_n"),
    [
        (
            lambda n: Qwen2Config(
                num_hidden_layers=n, use_sliding_window=True, max_window_layers=2
            ),
            4,
            6,
        ),
        (
            lambda n: Qwen2Config(
                num_hidden_layers=n, use_sliding_window=True, max_window_layers=2
            ),
            4,
            3,
        ),
        (lambda n: Gemma2Config(num_hidden_layers=n), 4, 7),
        (lambda n: Gemma3TextConfig(num_hidden_layers=n), 8, 14),
        (lambda n: Gemma3TextConfig(num_hidden_layers=n), 8, 5),
        (lambda n: LlamaConfig(num_hidden_layers=n), 2, 5),
        (lambda n: GPT2Config(n_layer=n), 2, 3),
    ],
)
def test_set_num_layers_matches_what_transformers_builds(make_config, old_n, new_n):
    old = make_config(old_n).to_dict()
    new = set_num_layers(old, new_n)
    expected = make_config(new_n)
    assert num_layers_from_config(new) == new_n
    assert new.get("layer_types") == getattr(expected, "layer_types", None)
    assert num_layers_from_config(old) == old_n  # input left alone
    type(expected)(**new)  # transformers' own validation accepts it


def test_set_num_layers_follows_source_layers():
    old = Gemma2Config(num_hidden_layers=4).to_dict()  # sliding, full, sliding, full
    new = set_num_layers(old, 5, source_layers=[0, 0, 1, 3, 3])
    sliding, full = "sliding_attention", "full_attention"
    assert new["layer_types"] == [sliding, sliding, full, full, full]
    with pytest.raises(CheckpointError, match="source layer 4"):
        set_num_layers(old, 2, source_layers=[0, 4])
    with pytest.raises(CheckpointError, match="3 entries"):
        set_num_layers(old, 2, source_layers=[0, 1, 2])


def test_set_num_layers_in_text_config():
    new = set_num_layers({"text_config": {"num_hidden_layers": 4}, "vision_config": {}}, 2)
    assert new["text_config"]["num_hidden_layers"] == 2


# ---------------------------------------------------------------- reader


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_reader_matches_model_state_dict(saved, arch):
    model_dir, state = saved[arch]
    reader = ModelReader(model_dir)
    assert reader.path == model_dir
    assert reader.names == _stored_names(model_dir)
    assert reader.num_layers == NUM_LAYERS
    assert reader.config["model_type"] == _configs()[arch].model_type
    for name in reader.names:
        tensor = reader.get(name)
        assert reader.shape(name) == tensor.shape == state[name].shape
        assert reader.dtype(name) == tensor.dtype == state[name].dtype
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)


def test_reader_does_not_invent_tied_head(saved):
    model_dir, state = saved["gpt2"]
    reader = ModelReader(model_dir)
    assert reader.config["tie_word_embeddings"] is True
    assert "lm_head.weight" in state
    assert not reader.has("lm_head.weight")
    assert "lm_head.weight" not in reader.names
    assert reader.has("transformer.wte.weight")
    with pytest.raises(CheckpointError, match=rf"'lm_head.weight'.*{model_dir.name}"):
        reader.get("lm_head.weight")


def test_reader_opens_each_shard_once_and_reads_lazily(saved, monkeypatch):
    model_dir, _ = saved["qwen2"]
    opened: list[str] = []
    real_safe_open = reader_module.safe_open

    def counting_safe_open(file, *args, **kwargs):
        opened.append(Path(file).name)
        return real_safe_open(file, *args, **kwargs)

    monkeypatch.setattr(reader_module, "safe_open", counting_safe_open)
    reader = ModelReader(model_dir)
    assert opened == []  # the index alone gives the names
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    first_shard = weight_map["model.embed_tokens.weight"]
    same_shard = [n for n, shard in weight_map.items() if shard == first_shard]
    for name in same_shard:
        reader.get(name)
        reader.shape(name)
    assert opened == [first_shard]
    for name in reader.names:
        reader.get(name)
    assert sorted(opened) == sorted(set(weight_map.values()))


def test_reader_get_converts_and_returns_a_private_copy(saved):
    model_dir, state = saved["llama"]
    reader = ModelReader(model_dir)
    name = "model.layers.1.mlp.up_proj.weight"
    half = reader.get(name, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, state[name].to(torch.bfloat16))
    reader.get(name).add_(1.0)
    torch.testing.assert_close(reader.get(name), state[name], rtol=0, atol=0)


def test_reader_single_file_model(tmp_path):
    model = AutoModelForCausalLM.from_config(_configs()["llama"])
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    reader = ModelReader(str(tmp_path))
    state = model.state_dict()
    assert set(reader.names) <= set(state)
    for name in reader.names:
        torch.testing.assert_close(reader.get(name), state[name], rtol=0, atol=0)


def test_reader_errors_name_the_path(tmp_path, saved):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match="not found.*nope"):
        ModelReader(missing)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        ModelReader(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json.*empty"):
        ModelReader(empty)
    (empty / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights.*empty"):
        ModelReader(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        ModelReader(empty)


def test_reader_reports_missing_shard(tmp_path, saved):
    model_dir, _ = saved["llama"]
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in model_dir.iterdir():
        if file.name != "model-00002-of-00006.safetensors":
            (broken / file.name).write_bytes(file.read_bytes())
    with pytest.raises(CheckpointError, match="model-00002-of-00006.safetensors.*missing"):
        ModelReader(broken)


def _save_pickled(model_dir: Path, state: dict[str, torch.Tensor], config: dict, sharded: bool):
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config))
    if not sharded:
        torch.save(state, model_dir / "pytorch_model.bin")
        return
    names = sorted(state)
    halves = {
        "pytorch_model-00001-of-00002.bin": names[::2],
        "pytorch_model-00002-of-00002.bin": names[1::2],
    }
    for file, part in halves.items():
        torch.save({n: state[n] for n in part}, model_dir / file)
    weight_map = {n: file for file, part in halves.items() for n in part}
    (model_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("sharded", [False, True])
def test_pickle_weights_need_opt_in(tmp_path, saved, sharded):
    model_dir, state = saved["llama"]
    config = json.loads((model_dir / "config.json").read_text())
    pickled = tmp_path / "pickled"
    _save_pickled(pickled, state, config, sharded)
    with pytest.raises(CheckpointError) as refused:
        ModelReader(pickled)
    message = str(refused.value)
    assert "allow_pickle=True" in message and "--allow-pickle" in message
    assert str(pickled) in message and "\n" not in message
    reader = ModelReader(pickled, allow_pickle=True)
    assert reader.names == sorted(state)
    for name in reader.names:
        assert reader.shape(name) == state[name].shape
        torch.testing.assert_close(reader.get(name), state[name], rtol=0, atol=0)


def test_pickle_opt_in_still_refuses_arbitrary_objects(tmp_path):
    model_dir = tmp_path / "evil"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    torch.save({"w": torch.ones(2), "payload": Path("x")}, model_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*weights-only"):
        ModelReader(model_dir, allow_pickle=True)


def test_safetensors_preferred_over_pickle(tmp_path, saved):
    model_dir, state = saved["llama"]
    both = tmp_path / "both"
    both.mkdir()
    for file in model_dir.iterdir():
        (both / file.name).write_bytes(file.read_bytes())
    torch.save({"other": torch.zeros(1)}, both / "pytorch_model.bin")
    assert ModelReader(both).names == _stored_names(model_dir)


# ---------------------------------------------------------------- writer


def _shard_sizes(out: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in out.glob("*.safetensors")}


def test_sharded_write_roundtrips_through_transformers(tmp_path, saved):
    model_dir, state = saved["llama"]
    reader = ModelReader(model_dir)
    out = tmp_path / "merged"
    max_shard_bytes = 16 * 1024
    with atomic_output_dir(out, overwrite=False) as work:
        writer = ShardedWriter(work, max_shard_bytes=max_shard_bytes)
        for name in reader.names:
            writer.add(name, reader.get(name))
        files = writer.finish()
        write_config(work, reader.config, dtype="float32")
        copy_tokenizer_files(model_dir, work)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1
    assert shards == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    assert files[-1] == "model.safetensors.index.json"
    assert sorted(os.listdir(out)) == sorted([*files, "config.json", "generation_config.json"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == reader.names
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(state[n].nbytes for n in reader.names)
    for shard in shards:
        with safe_open(str(out / shard), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            assert sum(handle.get_tensor(k).nbytes for k in handle.keys()) <= max_shard_bytes  # noqa: SIM118

    loaded = AutoModelForCausalLM.from_pretrained(out)
    loaded_state = loaded.state_dict()
    for name, tensor in state.items():
        torch.testing.assert_close(loaded_state[name], tensor, rtol=0, atol=0)
    assert ModelReader(out).names == reader.names


def test_single_shard_is_model_safetensors(tmp_path):
    writer = ShardedWriter(tmp_path)
    writer.add("a", torch.ones(3))
    writer.add("b", torch.arange(4))
    assert writer.finish() == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert handle.get_tensor("b").tolist() == [0, 1, 2, 3]


def test_writer_streams_full_shards_to_disk(tmp_path):
    writer = ShardedWriter(tmp_path, max_shard_bytes=400)
    for i in range(4):
        writer.add(f"t{i}", torch.full((25,), float(i)))  # 100 bytes each
    assert os.listdir(tmp_path) == []  # 400 bytes fit in one shard
    writer.add("t4", torch.zeros(25))
    assert len(os.listdir(tmp_path)) == 1  # the full shard went to disk
    writer.add("big", torch.zeros(1000))  # larger than a shard: alone in its own
    writer.add("t5", torch.zeros(25))
    files = writer.finish()
    assert files[:-1] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    weight_map = json.loads((tmp_path / files[-1]).read_text())["weight_map"]
    assert weight_map["big"] == files[2]
    assert weight_map["t4"] == files[1]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # temp names renamed


def test_writer_handles_shared_storage_and_views(tmp_path):
    embed = torch.randn(8, 4)
    fused = torch.randn(12, 4)
    writer = ShardedWriter(tmp_path)
    writer.add("embed", embed)
    writer.add("head", embed)  # tied: same storage
    writer.add("q", fused[:4])  # a view into a larger tensor
    writer.add("kt", fused[4:8].t())  # non-contiguous
    writer.finish()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        assert torch.equal(handle.get_tensor("head"), embed)
        assert torch.equal(handle.get_tensor("q"), fused[:4])
        assert torch.equal(handle.get_tensor("kt"), fused[4:8].t())


def test_writer_rejects_misuse(tmp_path):
    writer = ShardedWriter(tmp_path)
    with pytest.raises(ValueError, match="no tensors"):
        writer.finish()
    writer.add("a", torch.ones(1))
    with pytest.raises(ValueError, match="'a'"):
        writer.add("a", torch.ones(1))
    writer.finish()
    with pytest.raises(RuntimeError):
        writer.add("b", torch.ones(1))


def test_atomic_output_dir_success_and_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(out, overwrite=False) as work:
        assert work.parent == tmp_path and work.name.startswith(".out.tmp-")
        (work / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []

    with atomic_output_dir(out, overwrite=False) as work:
        (work / "config.json").write_text("{}")
    assert os.listdir(out) == ["config.json"]
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_output_dir_existing_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    body_ran = False
    with (
        pytest.raises(CheckpointError, match="exists.*overwrite"),
        atomic_output_dir(out, overwrite=False),
    ):
        body_ran = True
    assert not body_ran
    assert os.listdir(out) == ["old.txt"]

    with atomic_output_dir(out, overwrite=True) as work:
        assert os.listdir(out) == ["old.txt"]  # untouched until success
        (work / "new.txt").write_text("new")
    assert os.listdir(out) == ["new.txt"]
    assert os.listdir(tmp_path) == ["out"]

    with pytest.raises(KeyboardInterrupt), atomic_output_dir(out, overwrite=True) as work:
        (work / "partial.txt").write_text("x")
        raise KeyboardInterrupt
    assert os.listdir(out) == ["new.txt"]
    assert os.listdir(tmp_path) == ["out"]


def test_copy_tokenizer_files_roundtrip(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    src = tmp_path / "src"
    tokenizer.save_pretrained(src)
    (src / "generation_config.json").write_text("{}")
    for not_tokenizer in (
        "model.safetensors",
        "config.json",
        "tokenization_custom.py",
        "training_args.bin",
    ):
        (src / not_tokenizer).write_text("x")
    dst = tmp_path / "dst"
    copied = copy_tokenizer_files(src, dst)
    assert sorted(copied) == sorted(os.listdir(dst))
    assert "generation_config.json" in copied and "tokenizer.json" in copied
    assert not {
        "model.safetensors",
        "config.json",
        "tokenization_custom.py",
        "training_args.bin",
    } & set(copied)
    reloaded = AutoTokenizer.from_pretrained(dst)
    assert reloaded("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    messages = [{"role": "user", "content": "hello"}]
    assert reloaded.apply_chat_template(messages, tokenize=False) == "hello"
    with pytest.raises(CheckpointError, match="nope"):
        copy_tokenizer_files(tmp_path / "nope", dst)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"dtype": "float32"}, {"dtype": "bfloat16"}),
        ({"torch_dtype": "float32"}, {"torch_dtype": "bfloat16"}),
        (
            {"dtype": "float32", "torch_dtype": "float32"},
            {"dtype": "bfloat16", "torch_dtype": "bfloat16"},
        ),
        ({}, {"dtype": "bfloat16"}),
    ],
)
def test_write_config_sets_dtype_under_the_key_in_use(tmp_path, config, expected):
    config = {"model_type": "llama", **config}
    path = write_config(tmp_path, config, dtype="bfloat16")
    assert json.loads(path.read_text()) == {"model_type": "llama", **expected}
    assert "bfloat16" not in config.values()  # the caller's dict is left alone
