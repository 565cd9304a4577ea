"""The merge engine end to end: recipe -> model directory that transformers loads and runs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from tiny_models import load_state
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.io.reader import ModelReader
from evomerge.merge import LoadedModel, merge_to_disk, merge_to_state_dict
from evomerge.recipe import Recipe

runner = CliRunner()


def _write(tmp_path, data, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _linear(paths, wa=0.25, wb=0.75):
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(paths["a"]), "parameters": {"weight": wa}},
            {"model": str(paths["b"]), "parameters": {"weight": wb}},
        ],
    }


@pytest.mark.parametrize("family_name", ["llama_family", "qwen2_family", "gpt2_family"])
def test_cli_merge_writes_a_loadable_model(family_name, request, tmp_path):
    paths = request.getfixturevalue(family_name)
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(_write(tmp_path, _linear(paths))), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for f in ("config.json", "evomerge_recipe.yaml", "tokenizer.json"):
        assert (out / f).exists(), f
    a, b, merged = load_state(paths["a"]), load_state(paths["b"]), load_state(out)
    assert set(merged) == set(a)
    for k in a:
        torch.testing.assert_close(merged[k], 0.25 * a[k] + 0.75 * b[k], rtol=1e-5, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("ab+1=", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 4
    assert Recipe.load(out / "evomerge_recipe.yaml") == Recipe.from_dict(_linear(paths))


def test_weights_one_zero_is_model_a_and_sharded_output(llama_family, tmp_path):
    out = tmp_path / "merged"
    merge_to_disk(
        Recipe.from_dict(_linear(llama_family, 1.0, 0.0)),
        out,
        max_shard_bytes=20_000,
        progress=False,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, merged = load_state(llama_family["a"]), load_state(out)
    for k in a:
        assert torch.equal(merged[k], a[k]), k


def test_passthrough_stacking_changes_layer_count(llama_family, tmp_path):
    data = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(llama_family["a"]), "layer_range": [0, 4]}]},
            {"sources": [{"model": str(llama_family["b"]), "layer_range": [2, 4]}]},
        ],
    }
    out = tmp_path / "stacked"
    merge_to_disk(Recipe.from_dict(data), out, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    merged, b = load_state(out), load_state(llama_family["b"])
    assert torch.equal(
        merged["model.layers.5.mlp.up_proj.weight"], b["model.layers.3.mlp.up_proj.weight"]
    )
    assert torch.equal(
        merged["model.layers.4.self_attn.q_proj.weight"],
        b["model.layers.2.self_attn.q_proj.weight"],
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 6


def test_in_memory_merge_equals_disk_merge(llama_family, tmp_path):
    data = {
        "merge_method": "dare_ties",
        "base_model": str(llama_family["base"]),
        "models": [
            {"model": str(llama_family["a"]), "parameters": {"weight": 0.7, "density": 0.4}},
            {"model": str(llama_family["b"]), "parameters": {"weight": [0.2, 0.9], "density": 0.6}},
        ],
    }
    recipe = Recipe.from_dict(data)
    out = tmp_path / "disk"
    merge_to_disk(recipe, out, seed=7, progress=False)
    loaded = {name: LoadedModel(ModelReader(name)) for name in recipe.referenced_models()}
    in_memory = merge_to_state_dict(recipe, loaded, seed=7)
    on_disk = load_state(out)
    assert set(in_memory) == set(on_disk)
    for k in on_disk:
        assert torch.equal(in_memory[k], on_disk[k]), k
    again = merge_to_state_dict(recipe, loaded, seed=7)
    other_seed = merge_to_state_dict(recipe, loaded, seed=8)
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(again[key], in_memory[key])
    assert not torch.equal(other_seed[key], in_memory[key])


def test_gradient_reaches_layers_and_embeddings_use_t0(llama_family, tmp_path):
    data = {
        "merge_method": "linear",
        "models": [
            {"model": str(llama_family["a"]), "parameters": {"weight": [1.0, 0.0]}},
            {"model": str(llama_family["b"]), "parameters": {"weight": [0.0, 1.0]}},
        ],
    }
    loaded = {
        name: LoadedModel(ModelReader(name)) for name in Recipe.from_dict(data).referenced_models()
    }
    merged = merge_to_state_dict(Recipe.from_dict(data), loaded)
    a, b = load_state(llama_family["a"]), load_state(llama_family["b"])
    assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # t = 0
    assert torch.equal(merged["lm_head.weight"], a["lm_head.weight"])  # last slice, also t = 0
    assert torch.equal(
        merged["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"]
    )
    assert torch.allclose(
        merged["model.layers.3.mlp.up_proj.weight"], b["model.layers.3.mlp.up_proj.weight"]
    )
    k = "model.layers.1.mlp.up_proj.weight"  # t = 1/3
    torch.testing.assert_close(merged[k], (2 / 3) * a[k] + (1 / 3) * b[k])


def test_bfloat16_recipe_writes_bfloat16(llama_family, tmp_path):
    data = {**_linear(llama_family), "dtype": "bfloat16"}
    out = tmp_path / "bf16"
    merge_to_disk(Recipe.from_dict(data), out, progress=False)
    assert all(t.dtype == torch.bfloat16 for t in load_state(out).values())
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def _bad_cases(paths, tmp_path):
    a, b, base = str(paths["a"]), str(paths["b"]), str(paths["base"])
    shallow = tmp_path / "shallow"
    if not shallow.exists():
        from tiny_models import make_family

        make_family(tmp_path / "shallow-src", "llama", names=("base",), layers=2)
        shutil.move(str(tmp_path / "shallow-src" / "llama-base"), shallow)
    wide = tmp_path / "wide"
    if not wide.exists():
        from tiny_models import make_family

        make_family(tmp_path / "wide-src", "gpt2", names=("base",))
        shutil.move(str(tmp_path / "wide-src" / "gpt2-base"), wide)
    reshaped = tmp_path / "reshaped"
    if not reshaped.exists():
        from safetensors.torch import save_file

        shutil.copytree(paths["b"], reshaped)
        state = load_state(reshaped)
        state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(80, 32)
        save_file(state, reshaped / "model.safetensors", metadata={"format": "pt"})
    pickled = tmp_path / "pickled"
    if not pickled.exists():
        shutil.copytree(paths["a"], pickled)
        state = load_state(pickled)
        (pickled / "model.safetensors").unlink()
        torch.save(state, pickled / "pytorch_model.bin")
    return {
        "unknown method": (
            {"merge_method": "tiez", "models": [{"model": a}]},
            "unknown merge_method 'tiez'",
        ),
        "missing base": (
            {"merge_method": "ties", "models": [{"model": a, "parameters": {"weight": 1}}]},
            "needs a base_model",
        ),
        "slerp count": (
            {
                "merge_method": "slerp",
                "base_model": base,
                "models": [{"model": a}, {"model": b}],
                "parameters": {"t": 0.5},
            },
            "exactly 1",
        ),
        "density range": (
            {
                "merge_method": "ties",
                "base_model": base,
                "models": [{"model": a, "parameters": {"weight": 1, "density": 1.5}}],
            },
            "density",
        ),
        "t range": (
            {
                "merge_method": "slerp",
                "base_model": base,
                "models": [{"model": a}],
                "parameters": {"t": -0.1},
            },
            "t",
        ),
        "della epsilon": (
            {
                "merge_method": "della",
                "base_model": base,
                "models": [
                    {"model": a, "parameters": {"weight": 1, "density": 0.95, "epsilon": 0.1}}
                ],
            },
            "epsilon",
        ),
        "layer range": (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": a, "layer_range": [0, 9]}]}],
            },
            "past its 4 layers",
        ),
        "models and slices": (
            {
                "merge_method": "linear",
                "models": [{"model": a}],
                "slices": [{"sources": [{"model": a, "layer_range": [0, 1]}]}],
            },
            "exactly one of 'models' or 'slices'",
        ),
        "missing dir": (
            {
                "merge_method": "linear",
                "models": [{"model": str(tmp_path / "nowhere"), "parameters": {"weight": 1}}],
            },
            "nowhere",
        ),
        "layer count mismatch": (
            {
                "merge_method": "linear",
                "models": [
                    {"model": a, "parameters": {"weight": 1}},
                    {"model": str(shallow), "parameters": {"weight": 1}},
                ],
            },
            "same number of layers",
        ),
        "shape mismatch": (
            {
                "merge_method": "linear",
                "models": [
                    {"model": a, "parameters": {"weight": 1}},
                    {"model": str(reshaped), "parameters": {"weight": 1}},
                ],
            },
            r"model.layers.1.mlp.up_proj.weight: shapes differ.*\[80, 32\]",
        ),
        "different architecture": (
            {
                "merge_method": "linear",
                "models": [
                    {"model": a, "parameters": {"weight": 1}},
                    {"model": str(wide), "parameters": {"weight": 1}},
                ],
            },
            "not found|shapes differ",
        ),
        "pickle weights": (
            {
                "merge_method": "linear",
                "models": [{"model": str(pickled), "parameters": {"weight": 1}}],
            },
            "allow-pickle|allow_pickle",
        ),
    }


def test_bad_input_exits_2_with_one_line_and_no_output(llama_family, tmp_path):
    for case, (data, message) in _bad_cases(llama_family, tmp_path).items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        result = runner.invoke(app, ["merge", str(_write(tmp_path, data)), "--out", str(out), "-q"])
        assert result.exit_code == 2, f"{case}: exit {result.exit_code}: {result.output}"
        assert "Traceback" not in result.output, case
        import re

        assert re.search(message, result.output), f"{case}: {result.output!r}"
        assert not out.exists(), case
        assert not any(p.name.startswith(f".{out.name}") for p in tmp_path.iterdir()), (
            f"{case}: temp dir left behind"
        )


def test_malformed_yaml_and_existing_output(llama_family, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [oops\n")
    result = runner.invoke(app, ["merge", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "malformed YAML" in result.output
    out = tmp_path / "exists"
    out.mkdir()
    result = runner.invoke(
        app, ["merge", str(_write(tmp_path, _linear(llama_family))), "--out", str(out), "-q"]
    )
    assert result.exit_code == 2 and "exists" in result.output
    result = runner.invoke(
        app,
        [
            "merge",
            str(_write(tmp_path, _linear(llama_family))),
            "--out",
            str(out),
            "-q",
            "--overwrite",
        ],
    )
    assert result.exit_code == 0 and (out / "config.json").exists()


def test_pickle_weights_load_with_opt_in(llama_family, tmp_path):
    data, _ = _bad_cases(llama_family, tmp_path)["pickle weights"]
    out = tmp_path / "from-bin"
    result = runner.invoke(
        app, ["merge", str(_write(tmp_path, data)), "--out", str(out), "-q", "--allow-pickle"]
    )
    assert result.exit_code == 0, result.output
    a = load_state(llama_family["a"])
    merged = load_state(out)
    assert all(torch.equal(merged[k], a[k]) for k in a)
