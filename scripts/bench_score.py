"""Per-candidate cost of the search's inner loop, HF backend against vLLM, in one run.

    python scripts/bench_score.py                          # the quick zoo, CPU, float32
    python scripts/bench_score.py --model DIR --device cuda --dtype bfloat16
    python scripts/bench_score.py --make-random-llama DIR --params 134M --device cuda

Each backend gets its own worker, built as the search builds it (`workers.evaluator_class`): the
HF worker holds the input models and a live HF model, the vLLM worker the input models and one
engine. Both then evaluate the same candidates (task-arithmetic merges with random weights):
"swap" is merging the candidate and putting its weights in the model (HF: copy into the live
model; vLLM: stream into `reload_weights`), "score" is running the tasks. Prints the set-up time
and the median swap and score time of each backend over `--candidates` candidates.

Models: the quick demo zoo (base + specialists) by default; `--model DIR` takes any HF causal-LM
directory (with its tokenizer) and merges it with `--variants` perturbed copies of itself;
`--make-random-llama DIR --params 134M` first writes a random Llama of about that size there,
with the zoo's tokenizer, and uses it as `--model`. Run it with the `.venv-vllm` python on a CPU
machine (vLLM needs `VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1` there).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_TASKS = "zoo_addition_dev,zoo_reversal_dev,zoo_addition_dev_gen"


def parse_params(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(text[-1:], 1)
    return int(float(text.rstrip("KMB")) * scale)


def make_random_llama(out: Path, params: int, *, hidden: int = 768, seed: int = 0) -> Path:
    """A random Llama of about `params` parameters with the zoo's tokenizer (so the zoo tasks run)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from evomerge.zoo.build import build_zoo

    tokenizer = AutoTokenizer.from_pretrained(build_zoo(quick=True, progress=False).base)
    intermediate = hidden * 8 // 3 // 64 * 64
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    vocab = len(tokenizer)
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="20GB")
    tokenizer.save_pretrained(out)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"random Llama: {layers} layers x {hidden} hidden, {total / 1e6:.0f}M parameters -> {out}"
    )
    return out


def perturbed_copies(model: Path, n: int, root: Path) -> list[Path]:
    """`n` copies of `model` with small random deltas (distinct fine-tune-like inputs to merge)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    paths = []
    for i in range(1, n + 1):
        g = torch.Generator().manual_seed(i)
        base.load_state_dict(
            {k: v + 0.01 * torch.randn(v.shape, generator=g).to(v.dtype) for k, v in state.items()}
        )
        out = root / f"variant{i}"
        base.save_pretrained(out, safe_serialization=True, max_shard_size="20GB")
        tokenizer.save_pretrained(out)
        paths.append(out)
    return paths


def candidates(base: str, models: list[str], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {"model": m, "parameters": {"weight": round(rng.uniform(0.1, 0.9), 3)}}
                for m in models
            ],
        }
        for _ in range(n)
    ]


def bench(setup, jobs: list[dict]) -> dict[str, float]:
    from evomerge.workers import Job, evaluator_class

    started = time.perf_counter()
    worker = evaluator_class(setup)(setup)
    ready = time.perf_counter() - started
    swaps, scores, fitness = [], [], []
    for i, recipe in enumerate(jobs):
        result = worker.evaluate(Job(i, recipe))
        if result.status != "ok":
            raise SystemExit(f"{setup.backend}: candidate {i} failed: {result.error}")
        swaps.append(result.merge_seconds)
        scores.append(result.score_seconds)
        fitness.append(result.fitness)
    del worker
    return {
        "setup_s": ready,
        "first_swap_s": swaps[0],
        "first_score_s": scores[0],
        "swap_median_s": statistics.median(swaps[1:] or swaps),
        "score_median_s": statistics.median(scores[1:] or scores),
        "fitness": fitness,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="an HF model directory (default: the quick zoo)")
    parser.add_argument(
        "--make-random-llama", type=Path, metavar="DIR", help="write a random Llama here and use it"
    )
    parser.add_argument("--params", default="134M", help="its size, e.g. 134M, 1B")
    parser.add_argument(
        "--variants", type=int, default=2, help="perturbed copies of --model to merge"
    )
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--limit", type=int, default=50, help="samples per task")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--source-device", default=None, help="vLLM worker: keep the input models here (cpu)"
    )
    parser.add_argument(
        "--engine-args",
        default="{}",
        help='vllm.LLM keyword arguments, JSON (e.g. {"enforce_eager": true})',
    )
    parser.add_argument("--backends", default="hf,vllm")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    from evomerge.workers import WorkerSetup

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    scratch = Path(tempfile.mkdtemp(prefix="bench_score_"))
    model = args.model
    if args.make_random_llama is not None:
        model = make_random_llama(args.make_random_llama, parse_params(args.params))
    if model is not None:
        base, others = str(model), [str(p) for p in perturbed_copies(model, args.variants, scratch)]
    else:
        from evomerge.zoo.build import build_zoo

        zoo = build_zoo(quick=True, progress=False)
        base, others = str(zoo.base), [str(p) for p in zoo.specialists.values()]
    jobs = candidates(base, others, args.candidates, seed=0)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(
        f"device: {device} ({card}), dtype {args.dtype}, {torch.get_num_threads()} threads; "
        f"{len(others) + 1} input models; tasks {args.tasks} (limit {args.limit}); {args.candidates} candidates"
    )
    results = {}
    for backend in args.backends.split(","):
        setup = WorkerSetup(
            models=(base, *others),
            reference_model=base,
            tasks=tuple(args.tasks.split(",")),
            dtype=args.dtype,
            limit=args.limit,
            device=device,
            backend=backend,
            source_device=args.source_device if backend == "vllm" else None,
            engine_args=json.loads(args.engine_args) if backend == "vllm" else {},
        )
        r = results[backend] = bench(setup, jobs)
        print(
            f"{backend:5s} worker set-up {r['setup_s']:7.2f} s | first candidate: swap {r['first_swap_s']:.3f} s, "
            f"score {r['first_score_s']:.3f} s | median after: swap {r['swap_median_s']:.3f} s, score {r['score_median_s']:.3f} s",
            flush=True,
        )
    if {"hf", "vllm"} <= set(results):
        same = results["hf"]["fitness"] == results["vllm"]["fitness"]
        print(f"fitness per candidate identical across backends: {same}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"device": card, "args": vars(args) | {"model": str(model)}, "results": results},
                indent=1,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
