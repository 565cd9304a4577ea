"""Research harness for the demo zoo: train a base and specialists under one design, merge them
in plain torch, and measure who is good at what.

    python scripts/zoo_experiment.py --pretrain-steps 1200 --ft-steps 300 --ft-lr 1e-3 --tag A

Prints (and appends to --log as JSON lines) the test-split multiple-choice accuracy of the base,
each specialist, the default merges (linear average, task arithmetic, TIES, DARE-TIES), a
per-layer ablation (which layers carry each skill) and a per-layer task-arithmetic merge tuned
on the dev split by coordinate ascent. Merges here are simple reference code on state dicts,
independent of evomerge's merge engine, so they can check it too.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from evomerge.zoo.corpus import Mixture, easy
from evomerge.zoo.model import ModelShape, new_model, parameter_count
from evomerge.zoo.probe import exact_match, skill_accuracies
from evomerge.zoo.skills import SKILL_NAMES, MCItem, eval_items
from evomerge.zoo.train import TrainConfig, set_cpu_threads, train

State = dict[str, torch.Tensor]
_LAYER = re.compile(r"\.layers\.(\d+)\.")


# --- merges (reference implementations on state dicts) ----------------------------------------


def layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def task_arithmetic(
    base: State, experts: Sequence[State], weight: Callable[[int, str], float]
) -> State:
    """base + sum_i w_i(tensor) * (expert_i - base)."""
    return {
        name: b + sum(weight(i, name) * (e[name] - b) for i, e in enumerate(experts))
        for name, b in base.items()
    }


def linear(experts: Sequence[State]) -> State:
    return {name: sum(e[name] for e in experts) / len(experts) for name in experts[0]}


def _magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * delta.numel())
    if k <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return delta.abs() >= threshold


def ties(
    base: State,
    experts: Sequence[State],
    weights: Sequence[float],
    density: float,
    *,
    normalize: bool = True,
    dare_seed: int | None = None,
) -> State:
    """TIES (magnitude trim) or, with dare_seed, DARE-TIES (random drop + L1 rescale, no normalize)."""
    generator = torch.Generator().manual_seed(dare_seed) if dare_seed is not None else None
    merged: State = {}
    for name, b in base.items():
        sparse = []
        for e in experts:
            delta = e[name] - b
            if generator is None:
                kept = delta * _magnitude_mask(delta, density)
            else:
                kept = delta * (torch.rand(delta.shape, generator=generator) < density)
                l1_kept = kept.abs().sum()
                if l1_kept > 1e-7 and delta.abs().sum() > 1e-7:
                    kept = kept * (delta.abs().sum() / l1_kept)
            sparse.append(kept)
        weighted = [w * d for w, d in zip(weights, sparse, strict=True)]
        total = sum(weighted)
        elected = torch.where(total >= 0, 1.0, -1.0)
        masks = [(torch.sign(u) == elected) for u in weighted]
        out = sum(m * u for m, u in zip(masks, weighted, strict=True))
        if normalize:
            divisor = sum(m * w for m, w in zip(masks, weights, strict=True))
            out = out / torch.where(divisor == 0, torch.ones_like(out), divisor)
        merged[name] = b + out
    return merged


# --- models --------------------------------------------------------------------------------------


def cached_train(
    cache: Path,
    key: dict,
    start: State | None,
    shape: ModelShape,
    mixture: Mixture,
    config: TrainConfig,
) -> tuple[State, float]:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = cache / f"{digest}.safetensors"
    model = new_model(shape, seed=config.seed)
    if path.exists():
        model.load_state_dict(load_file(path))
        return {k: v.clone() for k, v in model.state_dict().items()}, 0.0
    if start is not None:
        model.load_state_dict(start)
    t0 = time.time()

    def on_step(step: int, loss: float) -> None:
        if (step + 1) % 200 == 0:
            print(
                f"    {key.get('name')} step {step + 1}: loss {loss:.3f} ({time.time() - t0:.0f}s)",
                flush=True,
            )

    loss = train(model, mixture, config, on_step=on_step)
    seconds = time.time() - t0
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path)
    (cache / f"{digest}.json").write_text(json.dumps({**key, "seconds": seconds, "loss": loss}))
    print(f"  trained {key.get('name')} in {seconds:.1f}s, final loss {loss:.3f}", flush=True)
    return state, seconds


def evaluate(
    model: torch.nn.Module, state: State, items: Mapping[str, Sequence[MCItem]]
) -> dict[str, float]:
    model.load_state_dict(state)
    accuracy = skill_accuracies(model, items)
    accuracy["avg"] = sum(accuracy.values()) / len(accuracy)
    return accuracy


def fmt(row: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in row.items())


# --- the experiment ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tag", default="exp")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--inter", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pretrain-steps", type=int, default=1200)
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument(
        "--pretrain-skill-frac",
        type=float,
        default=0.0,
        help="share of skill examples in pre-training",
    )
    parser.add_argument(
        "--pretrain-skill-shares",
        default="",
        help="per-skill shares of full-size skill examples in pre-training (overrides the even split"
        " of --pretrain-skill-frac), e.g. addition=0.02,reversal=0.01,shift=0.003",
    )
    parser.add_argument(
        "--pretrain-easy-frac",
        type=float,
        default=0.0,
        help="share of the skills' easy variants (skills.Skill.easy) in pre-training",
    )
    parser.add_argument("--ft-steps", type=int, default=300)
    parser.add_argument("--ft-lr", type=float, default=1e-3)
    parser.add_argument(
        "--ft-replay", type=float, default=0.0, help="share of replayed data in fine-tuning"
    )
    parser.add_argument(
        "--ft-replay-from",
        choices=["generic", "pretrain"],
        default="generic",
        help="replay the generic sources only, or the whole pre-training mixture",
    )
    parser.add_argument(
        "--ft-steps-factor",
        default="",
        help="per-skill fine-tune step factors, e.g. addition=2,shift=0.5",
    )
    parser.add_argument(
        "--ft-frozen", default="", help="comma-separated name parts to freeze in fine-tuning"
    )
    parser.add_argument("--ft-wd", type=float, default=0.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layer-search", action="store_true")
    parser.add_argument(
        "--model-search", action="store_true", help="dev-tuned per-model task-arithmetic weights"
    )
    parser.add_argument("--gen", action="store_true", help="also greedy exact match per skill")
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="0: the build's default")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/zoo_exp"))
    parser.add_argument("--log", type=Path, default=Path("/tmp/zoo_exp/results.jsonl"))
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    set_cpu_threads()
    if args.threads:
        torch.set_num_threads(args.threads)

    shape = ModelShape(
        hidden_size=args.hidden, intermediate_size=args.inter, num_hidden_layers=args.layers
    )
    generic = {"text": 1.0, "copy": 1.0, "count": 1.0}
    skill_shares = dict.fromkeys(SKILL_NAMES, args.pretrain_skill_frac / len(SKILL_NAMES))
    skill_shares.update(
        (skill, float(share))
        for skill, share in (x.split("=") for x in args.pretrain_skill_shares.split(",") if x)
    )
    easy_share = args.pretrain_easy_frac / len(SKILL_NAMES)
    generic_share = 1 - sum(skill_shares.values()) - args.pretrain_easy_frac
    pre_mix = Mixture(
        {
            name: weight
            for name, weight in {
                **{k: v * generic_share / 3 for k, v in generic.items()},
                **skill_shares,
                **dict.fromkeys(map(easy, SKILL_NAMES), easy_share),
            }.items()
            if weight > 0
        }
    )
    steps_factor = {
        skill: float(factor)
        for skill, factor in (x.split("=") for x in args.ft_steps_factor.split(",") if x)
    }
    pre_cfg = TrainConfig(
        steps=args.pretrain_steps, lr=args.pretrain_lr, batch_size=args.batch, seed=args.seed
    )
    pre_key = {
        "name": "base",
        "shape": shape.to_json(),
        "mix": pre_mix.to_json(),
        "cfg": pre_cfg.to_json(),
    }
    base, base_seconds = cached_train(args.cache, pre_key, None, shape, pre_mix, pre_cfg)

    specialists: dict[str, State] = {}
    ft_seconds = {}
    frozen = tuple(x for x in args.ft_frozen.split(",") if x)
    for index, skill in enumerate(SKILL_NAMES):
        replayed = pre_mix.weights if args.ft_replay_from == "pretrain" else generic
        total = sum(replayed.values())
        replay = {k: args.ft_replay * v / total for k, v in replayed.items()}
        mix = Mixture({**replay, skill: replay.get(skill, 0.0) + 1 - args.ft_replay})
        cfg = TrainConfig(
            steps=round(args.ft_steps * steps_factor.get(skill, 1.0)),
            lr=args.ft_lr,
            batch_size=args.batch,
            warmup_steps=20,
            seed=args.seed + 1 + index,
            frozen=frozen,
            weight_decay=args.ft_wd,
        )
        key = {"name": skill, "base": pre_key, "mix": mix.to_json(), "cfg": cfg.to_json()}
        specialists[skill], ft_seconds[skill] = cached_train(args.cache, key, base, shape, mix, cfg)

    model = new_model(shape, seed=0)
    test = {s: eval_items(s, "test", 300) for s in SKILL_NAMES}
    dev = {s: eval_items(s, "dev", 150) for s in SKILL_NAMES}
    experts = [specialists[s] for s in SKILL_NAMES]
    results: dict[str, dict[str, float]] = {}

    def report(name: str, state: State) -> None:
        results[name] = evaluate(model, state, test)
        if args.gen:
            gen = {s: exact_match(model, test[s]) for s in SKILL_NAMES}
            gen["avg"] = sum(gen.values()) / len(gen)
            results[name] = {**results[name], **{f"gen_{k}": v for k, v in gen.items()}}
        print(f"{name:28s} {fmt(results[name])}", flush=True)

    print(
        f"== {args.tag}: {parameter_count(model)} params; base {base_seconds:.0f}s, ft {ft_seconds}"
    )
    report("base", base)
    for skill in SKILL_NAMES:
        report(f"spec:{skill}", specialists[skill])
    report("linear", linear(experts))
    for w in (1 / 3, 0.5, 0.7, 1.0):
        report(f"task_arithmetic w={w:.2f}", task_arithmetic(base, experts, lambda i, n, w=w: w))
    report("ties d=0.5 w=1/3", ties(base, experts, [1 / 3] * 3, 0.5))
    report("ties d=0.5 w=1", ties(base, experts, [1.0] * 3, 0.5, normalize=False))
    report(
        "dare_ties d=0.5 w=1/3", ties(base, experts, [1 / 3] * 3, 0.5, normalize=False, dare_seed=0)
    )
    report("dare_ties d=0.5 w=1", ties(base, experts, [1.0] * 3, 0.5, normalize=False, dare_seed=0))

    # Which layers carry each skill: the specialist's delta applied to one layer (plus all non-layer tensors) at a time.
    layers = list(range(args.layers))
    ablation = {}
    for i, skill in enumerate([] if args.no_ablation else SKILL_NAMES):
        row = {}
        for layer in [None, *layers]:

            def only(j: int, name: str, i=i, layer=layer) -> float:
                return float(j == i and (layer_of(name) == layer))

            row["rest" if layer is None else f"L{layer}"] = evaluate(
                model, task_arithmetic(base, experts, only), {skill: test[skill]}
            )[skill]
        ablation[skill] = row
        print(f"  ablation {skill:9s} {fmt(row)}")
    results["ablation"] = ablation  # type: ignore[assignment]

    if args.model_search:
        grid = (0.5, 0.7, 0.85, 1.0)
        scored = []
        for ws in itertools.product(grid, repeat=3):
            state = task_arithmetic(base, experts, lambda i, n, ws=ws: ws[i])
            scored.append((evaluate(model, state, dev)["avg"], ws))
        dev_best, ws = max(scored)
        print(f"  per-model TA weights {ws}: dev avg {dev_best:.3f}")
        report(f"per-model TA {ws}", task_arithmetic(base, experts, lambda i, n: ws[i]))

    if args.layer_search:
        groups = [None, *layers]
        weights = {(i, g): 0.5 for i in range(3) for g in groups}

        def weight_fn(table):
            return lambda i, name: table[(i, layer_of(name))]

        def dev_avg(table) -> float:
            return evaluate(model, task_arithmetic(base, experts, weight_fn(table)), dev)["avg"]

        best = dev_avg(weights)
        for sweep in range(2):
            for key in itertools.product(range(3), groups):
                for value in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25):
                    trial = {**weights, key: value}
                    score = dev_avg(trial)
                    if score > best + 1e-9:
                        best, weights = score, trial
            print(f"  layer search sweep {sweep}: dev avg {best:.3f}", flush=True)
        print(
            "  weights:",
            {f"{SKILL_NAMES[i]}/{'rest' if g is None else g}": w for (i, g), w in weights.items()},
        )
        report("per-layer TA (dev-tuned)", task_arithmetic(base, experts, weight_fn(weights)))

    with args.log.open("a") as log:
        log.write(
            json.dumps(
                {
                    "tag": args.tag,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "results": results,
                }
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
