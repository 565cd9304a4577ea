"""What one search candidate costs in a worker, on any device: merge into the live model, then score.

    python scripts/bench_worker.py [--device cuda] [--hidden 1024 --layers 8] [--dtype bfloat16]
                                   [--candidates 8] [--methods ties,linear,dare_ties]

Builds a random Llama base and two fine-tune-like variants (base + small noise) of the chosen size
with the zoo's character tokenizer, then runs the search's own worker class (`CandidateEvaluator`,
as a Ray actor would, minus Ray) on the demo's three dev tasks: each candidate is a recipe with
fresh weights/densities, merged in memory into the live model and scored with lm-eval's HF backend.
Prints the worker's set-up time, the median merge and score time per candidate, and (on CUDA) the
peak GPU memory against the size of one model, so the worker's memory layout is visible.
The models are random: the accuracies mean nothing, the timings are what a real model of the
same shape and request count costs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_family(root: Path, hidden: int, layers: int) -> tuple[dict[str, Path], int]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from evomerge.zoo.tokenizer import VOCAB_SIZE, save_tokenizer

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = sum(v.numel() for v in state.values())
    paths = {}
    for i, name in enumerate(("base", "a", "b")):
        if i:
            g = torch.Generator().manual_seed(i)
            model.load_state_dict(
                {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
            )
        out = root / name
        model.save_pretrained(out, safe_serialization=True)
        save_tokenizer(out)
        paths[name] = out
    return paths, params


def recipe(method: str, paths: dict[str, Path], rng: random.Random, dtype: str) -> dict:
    def params() -> dict:
        p = {"weight": round(rng.uniform(0.2, 1.0), 4)}
        if method != "linear":
            p["density"] = round(rng.uniform(0.2, 1.0), 4)
        return p

    out = {
        "merge_method": method,
        "dtype": dtype,
        "models": [{"model": str(paths[m]), "parameters": params()} for m in ("a", "b")],
    }
    if method != "linear":
        out["base_model"] = str(paths["base"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--methods", default="ties,linear,dare_ties")
    parser.add_argument("--tasks", default="zoo_addition_dev,zoo_reversal_dev,zoo_shift_dev")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    from evomerge.workers import CandidateEvaluator, Job, WorkerSetup

    with tempfile.TemporaryDirectory() as tmp:
        paths, params = build_family(Path(tmp), args.hidden, args.layers)
        model_bytes = params * torch.finfo(getattr(torch, dtype)).bits // 8
        name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
        print(
            f"device: {name}; models: 3 x {params / 1e6:.0f}M parameters ({dtype}, {model_bytes / 2**30:.2f} GiB each)"
        )
        setup = WorkerSetup(
            models=tuple(str(p) for p in paths.values()),
            reference_model=str(paths["base"]),
            tasks=tuple(args.tasks.split(",")),
            dtype=dtype,
            device=args.device,
            batch_size=args.batch_size,
        )
        t0 = time.perf_counter()
        worker = CandidateEvaluator(setup)
        print(
            f"worker set-up (load 3 models, build the live model and lm-eval requests): {time.perf_counter() - t0:.2f} s"
        )
        rng = random.Random(0)
        for method in args.methods.split(","):
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            results = [
                worker.evaluate(Job(i, recipe(method, paths, rng, dtype)))
                for i in range(args.candidates + 1)
            ][1:]
            failed = [r.error for r in results if r.status != "ok"]
            if failed:
                raise SystemExit(f"{method}: {len(failed)} candidates failed: {failed[0]}")
            merge = statistics.median(r.merge_seconds for r in results)
            score = statistics.median(r.score_seconds for r in results)
            peak = (
                f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
                if args.device.startswith("cuda")
                else ""
            )
            print(
                f"{method:>10}: per candidate merge {merge * 1000:.0f} ms, score {score * 1000:.0f} ms "
                f"(median of {len(results)}, first one not counted){peak}"
            )


if __name__ == "__main__":
    main()
