"""Benchmark `evomerge merge` against `mergekit-yaml` on the same recipes, in one session.

    python scripts/bench_merge.py [--repeats 3] [--hidden 768 --layers 12 --vocab 32000] [--busy 2]

Builds a random Llama base + 2 variants (~134M parameters each, bfloat16) once, then alternates
evomerge and mergekit runs of a TIES and a linear recipe, and prints median wall time, their ratio,
peak RSS of each child process, and throughput against a memory-copy floor measured in the same
run (read every input tensor, write one output of the same size, no math).

Then the TIES merge again, "loaded": with `--busy` CPU-bound neighbour processes (busy loops)
running, as in a search, where workers merge while their neighbours score.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

FLOOR = r"""
import sys, torch
from safetensors import safe_open
from safetensors.torch import save_file
paths, out = sys.argv[1:-1], sys.argv[-1]
handles = [safe_open(f"{p}/model.safetensors", "pt") for p in paths]
merged = {}
for name in handles[0].keys():
    tensors = [h.get_tensor(name) for h in handles]
    merged[name] = tensors[0].clone()
save_file(merged, f"{out}/model.safetensors")
"""


def build_models(root: Path, hidden: int, layers: int, vocab: int) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    params = sum(v.numel() for v in state.values())
    paths = {}
    for i, name in enumerate(("base", "a", "b")):
        if i:
            g = torch.Generator().manual_seed(i)
            base.load_state_dict(
                {
                    k: v + 0.01 * torch.randn(v.shape, generator=g, dtype=torch.float32).to(v.dtype)
                    for k, v in state.items()
                }
            )
        out = root / name
        base.save_pretrained(out, safe_serialization=True, max_shard_size="20GB")
        paths[name] = out
    print(
        f"models: 3 x {params / 1e6:.0f}M parameters (bfloat16), {sum(f.stat().st_size for f in paths['a'].glob('*.safetensors')) / 1e9:.2f} GB each"
    )
    return paths


def recipes(paths: dict[str, Path]) -> dict[str, dict]:
    models = [str(paths["a"]), str(paths["b"])]
    return {
        "ties": {
            "merge_method": "ties",
            "base_model": str(paths["base"]),
            "dtype": "bfloat16",
            "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.5}} for m in models],
        },
        "linear": {
            "merge_method": "linear",
            "dtype": "bfloat16",
            "models": [{"model": m, "parameters": {"weight": 0.5}} for m in models],
        },
    }


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1e6


BUSY_LOOP = "while True: pass"


def tool_command(
    tool: str, recipe_path: Path, out: Path, inputs: list[str], bin_dir: Path
) -> list[str]:
    if tool == "evomerge":
        return [
            str(bin_dir / "evomerge"),
            "merge",
            str(recipe_path),
            "--out",
            str(out),
            "--device",
            "cpu",
            "-q",
        ]
    if tool == "mergekit":
        return [
            str(bin_dir / "mergekit-yaml"),
            str(recipe_path),
            str(out),
            "--lazy-unpickle",
            "--quiet",
            "--no-write-model-card",
        ]
    out.mkdir()
    return [sys.executable, "-c", FLOOR, *inputs, str(out)]


@contextlib.contextmanager
def busy_neighbours(count: int) -> Iterator[None]:
    """`count` processes that keep CPUs busy while the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]
    try:
        if procs:
            time.sleep(0.5)  # let them reach the CPUs
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--busy", type=int, default=2, help="CPU-bound neighbours in the loaded case (0: skip it)"
    )
    args = parser.parse_args()

    bin_dir = Path(sys.executable).parent
    mergekit = bin_dir / "mergekit-yaml"
    if not mergekit.exists():
        raise SystemExit("mergekit-yaml not found: pip install -e '.[mergekit]'")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="evomerge-bench-"))
    paths = build_models(root, args.hidden, args.layers, args.vocab)
    size_gb = 3 * sum(f.stat().st_size for f in paths["a"].glob("*.safetensors")) / 1e9

    cases = [(name, recipe, 0) for name, recipe in recipes(paths).items()]
    if args.busy:
        cases.append((f"ties+{args.busy}busy", recipes(paths)["ties"], args.busy))
    rows = []
    for name, recipe, busy in cases:
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        inputs = (
            [str(paths["base"]), str(paths["a"]), str(paths["b"])]
            if "base_model" in recipe
            else [str(paths["a"]), str(paths["b"])]
        )
        runs: dict[str, list[tuple[float, float]]] = {"evomerge": [], "mergekit": [], "floor": []}
        for _ in range(args.repeats):
            for tool in ("evomerge", "mergekit", "floor"):
                out = root / f"out-{tool}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = tool_command(tool, path, out, inputs, bin_dir)
                with busy_neighbours(busy):
                    runs[tool].append(timed(cmd))
        med = {tool: statistics.median(w for w, _ in r) for tool, r in runs.items()}
        rss = {tool: max(m for _, m in r) for tool, r in runs.items()}
        rows.append((name, med, rss))

    print(
        f"\nCPU, {os.cpu_count()} cores, torch {torch.__version__}, {args.repeats} alternating runs, inputs {size_gb:.2f} GB"
    )
    print(
        f"{'recipe':12} {'evomerge s':>11} {'mergekit s':>11} {'speed-up':>9} {'floor s':>8} {'evomerge/floor':>15} {'RSS evomerge':>13} {'RSS mergekit':>13} {'RSS floor':>10}"
    )
    for name, med, rss in rows:
        print(
            f"{name:12} {med['evomerge']:11.2f} {med['mergekit']:11.2f} {med['mergekit'] / med['evomerge']:8.2f}x "
            f"{med['floor']:8.2f} {med['evomerge'] / med['floor']:14.2f}x {rss['evomerge']:11.2f}GB {rss['mergekit']:11.2f}GB {rss['floor']:8.2f}GB"
        )
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
