"""`merge`, `check`, `methods` and `average`: recipes in, merged models out."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from mergesmith.cli.common import COMPAT_HELP, _bytes, _ray_options, app, err, out
from mergesmith.errors import MergesmithError


MK = "mergekit-yaml's options"  # the help panel of the flags kept for mergekit's scripts


# mergekit-yaml's flags that have nothing to do here: accepted, so its scripts run unchanged,
# with a note. Flag -> why it does not apply.
NOT_APPLICABLE = {
    "--lazy-unpickle": "mergesmith reads safetensors by byte range, and .bin files with "
                       "weights_only=True, always",
    "--low-cpu-memory": "mergesmith streams tensors in row chunks; --chunk-size sets the memory",
    "--read-to-gpu": "inputs are read on the CPU and moved to --device chunk by chunk",
    "--multi-gpu": "mergesmith computes on one device (--device)",
    "--async-write": "mergesmith always writes behind the merge, on its own thread",
    "--write-threads": "mergesmith writes with one thread behind the merge",
    "--clone-tensors": "each output tensor is written once; nothing to clone",
    "--no-safe-serialization": "mergesmith writes safetensors only",
    "--unsafe-truncate-embeddings": "embeddings are never truncated: vocabularies that differ "
                                    "are merged by token (tokenizer_source) or refused",
    "--lora-merge-cache": "LoRA adapters (model: base+adapter) are not supported yet",
    "--lora-merge-dtype": "LoRA adapters (model: base+adapter) are not supported yet",
    "--gpu-rich": "taken as --cuda; the rest of it does not apply here",
}


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="Recipe YAML (mergekit's format is accepted)."),
    output: Path = typer.Argument(..., help="Folder to write; appears only when complete."),
    shard_size: Optional[str] = typer.Option(None, help="Largest output shard in bytes, e.g. "
                                             "5GB, 250MB  [default: 5GB]"),
    device: Optional[str] = typer.Option(None, help="Where to compute: cpu, cuda, cuda:1  "
                                         "[default: cpu]"),
    seed: Optional[int] = typer.Option(None, "--seed", "--random-seed",
                                       help="Seed for randomized methods (default: recipe's, else 0)."),
    resume: bool = typer.Option(False, help="Continue an interrupted merge into OUTPUT (starts "
                                "it if there is nothing to continue)."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    chunk_size: str = typer.Option("8MiB", help="Rows merged at once, in fp32 bytes per input."),
    quiet: bool = typer.Option(False, "--quiet/--no-quiet", "-q", help="No progress bar."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                help="Show the plan before merging and the time it took."),
    compat: Optional[str] = typer.Option(None, help=COMPAT_HELP),
    allow_crimes: bool = typer.Option(False, "--allow-crimes/--no-allow-crimes",
                                      help="Merge models whose architectures or configs differ."),
    num_threads: Optional[int] = typer.Option(None, "--num-threads", "-j", min=1,
                                              help="CPU threads for torch's operations."),
    copy_tokenizer: bool = typer.Option(True, "--copy-tokenizer/--no-copy-tokenizer",
                                        help="Copy the tokenizer of the config's source model."),
    write_model_card: bool = typer.Option(True, "--write-model-card/--no-write-model-card",
                                          help="Write README.md and mergekit_config.yml."),
    out_shard_size: Optional[str] = typer.Option(
        None, metavar="SIZE", rich_help_panel=MK,
        help="mergekit's shard size: 5B, 500M, 100K. mergekit's help says parameters, but it "
        "compares tensor bytes with it; so does this, so the shards split where mergekit's do."),
    cuda: bool = typer.Option(False, "--cuda/--no-cuda", rich_help_panel=MK,
                              help="Same as --device cuda."),
    transformers_cache: Optional[str] = typer.Option(None, rich_help_panel=MK,
                                                     help="Hub cache folder (HF_HUB_CACHE)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code/--no-trust-remote-code",
                                           rich_help_panel=MK, help="Refused: no model code runs."),
    unsafe_truncate_embeddings: bool = typer.Option(
        False, "--unsafe-truncate-embeddings/--no-unsafe-truncate-embeddings", rich_help_panel=MK,
        help="Not applied (a note)."),
    lora_merge_cache: Optional[str] = typer.Option(None, rich_help_panel=MK, help="Not applied (a note)."),
    lora_merge_dtype: Optional[str] = typer.Option(None, rich_help_panel=MK, help="Not applied (a note)."),
    low_cpu_memory: bool = typer.Option(False, "--low-cpu-memory/--no-low-cpu-memory",
                                        rich_help_panel=MK, help="Not applied (a note)."),
    lazy_unpickle: bool = typer.Option(False, "--lazy-unpickle/--no-lazy-unpickle",
                                       rich_help_panel=MK, help="Not applied (a note)."),
    read_to_gpu: bool = typer.Option(False, "--read-to-gpu/--no-read-to-gpu", rich_help_panel=MK,
                                     help="Not applied (a note)."),
    multi_gpu: bool = typer.Option(False, "--multi-gpu/--no-multi-gpu", rich_help_panel=MK,
                                   help="Not applied (a note)."),
    gpu_rich: bool = typer.Option(False, "--gpu-rich", rich_help_panel=MK, help="Same as --cuda."),
    async_write: bool = typer.Option(False, "--async-write/--no-async-write", rich_help_panel=MK,
                                     help="Not applied (a note)."),
    write_threads: Optional[int] = typer.Option(None, rich_help_panel=MK, help="Not applied (a note)."),
    clone_tensors: bool = typer.Option(False, "--clone-tensors/--no-clone-tensors",
                                       rich_help_panel=MK, help="Not applied (a note)."),
    safe_serialization: bool = typer.Option(True, "--safe-serialization/--no-safe-serialization",
                                            rich_help_panel=MK, help="Always safetensors."),
    intermediate_dir: Optional[Path] = typer.Option(
        None, "--intermediate-dir", "-I", help="Multi-stage recipes: where the named stages go "
        "[default: OUTPUT-stages beside OUTPUT]."),
    ray: bool = typer.Option(False, "--ray", help="Write the output's shards on Ray workers "
                             "(a local Ray runtime unless --ray-address): the same bytes."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Ray workers, one CPU "
                                          "each (with --ray; default: every CPU here)."),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help="Join this Ray cluster (implies --ray); the models and "
        "OUTPUT must be on a filesystem every node shares."),
    onto: Optional[Path] = typer.Option(
        None, "--onto", metavar="MERGED", help="Continual merging: add RECIPE's models, one at a "
        "time, to the continual merge in MERGED (merge_method: opcm or continual_*)."),
) -> None:
    """Merge the models of RECIPE into OUTPUT (collecting data statistics first if the method needs them)."""
    import time

    import torch

    from mergesmith.pipeline import merge as run_merge, plan

    if trust_remote_code:
        raise MergesmithError(
            "--trust-remote-code: mergesmith never runs code from a model repository",
            hint="none is needed: it reads config.json and the weights as data, so models with "
                 "custom code merge without it; drop the flag")
    given = {"--unsafe-truncate-embeddings": unsafe_truncate_embeddings,
             "--lora-merge-cache": lora_merge_cache is not None,
             "--lora-merge-dtype": lora_merge_dtype is not None, "--low-cpu-memory": low_cpu_memory,
             "--lazy-unpickle": lazy_unpickle, "--read-to-gpu": read_to_gpu,
             "--multi-gpu": multi_gpu, "--gpu-rich": gpu_rich, "--async-write": async_write,
             "--write-threads": write_threads is not None, "--clone-tensors": clone_tensors,
             "--no-safe-serialization": not safe_serialization}
    for flag in (f for f, used in given.items() if used):
        err.print(f"note: {flag} does not apply: {NOT_APPLICABLE[flag]}", highlight=False)
    if device is None:
        device = "cuda" if cuda or gpu_rich else "cpu"
    if shard_size is not None and out_shard_size is not None:
        raise MergesmithError("give --shard-size (bytes) or --out-shard-size (mergekit's), not both")
    shard = shard_size if shard_size is not None else "5GB"
    if out_shard_size is not None:
        shard = _mergekit_shard_size(out_shard_size)
    if transformers_cache is not None:
        _use_hub_cache(transformers_cache)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    spread = _ray_options(ray, workers, ray_address)
    started = time.perf_counter()
    from mergesmith.engine.stages import is_multi_stage, run_stages

    if is_multi_stage(recipe):  # mergekit-multi's form: each stage is planned before it runs
        path = run_stages(recipe, output, intermediate_dir=intermediate_dir, shard_size=shard,
                          device=device, seed=seed, resume=resume, overwrite=overwrite,
                          chunk_size=chunk_size, progress=not quiet, compat=compat,
                          allow_crimes=allow_crimes, copy_tokenizer=copy_tokenizer,
                          write_model_card=write_model_card, **spread,
                          log=None if quiet else lambda line: err.print(line, highlight=False))
        if not quiet or verbose:
            err.print(f"wrote {path}", highlight=False)
        return
    from mergesmith.engine.adapters import adapter_method

    if adapter_method(recipe):  # LoRA adapters into one adapter folder (engine/adapters.py)
        return _merge_adapters(recipe, output, seed, device, resume, overwrite, quiet, verbose)
    from mergesmith.engine.continual import continual_merge, is_continual

    if onto is not None or is_continual(recipe):  # one model at a time (engine/continual.py)
        if spread:
            raise MergesmithError("--ray / --workers / --ray-address: a continual merge runs here",
                                  hint="drop them; OPCM's norms need every tensor before the write")
        path = continual_merge(recipe, output, onto=onto, shard_size=shard, device=device,
                               resume=resume, overwrite=overwrite, progress=not quiet,
                               allow_crimes=allow_crimes)
        if not quiet or verbose:
            err.print(f"wrote {path} (state in {path}/continual/state.json)", highlight=False)
        return
    the_plan = plan(recipe, seed=seed, shard_size=shard, compat=compat,
                    allow_crimes=allow_crimes)  # every error before any work
    for warning in the_plan.warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if verbose:
        err.print(f"{the_plan.method.name}: {len(the_plan.models)} model(s), "
                  f"{len(the_plan.jobs)} tensors, {_bytes(the_plan.total_bytes)} in "
                  f"{len(the_plan.shards)} shard(s), seed {the_plan.seed}, on {device}, "
                  f"{torch.get_num_threads()} thread(s)", highlight=False)
        for ref, ck in the_plan.models.items():
            err.print(f"  {ref}: {ck.path}", highlight=False)
    # the recipe itself: for a data-aware method the plan above stands in a plain average
    path = run_merge(recipe, output, shard_size=shard, device=device, seed=seed,
                     resume=resume, overwrite=overwrite, chunk_size=chunk_size,
                     progress=not quiet, compat=compat, allow_crimes=allow_crimes,
                     copy_tokenizer=copy_tokenizer, write_model_card=write_model_card, **spread)
    if not quiet or verbose:
        took = f" in {time.perf_counter() - started:.1f} s" if verbose else ""
        err.print(f"wrote {path}{took}", highlight=False)


def _merge_adapters(recipe: Path, output: Path, seed: Optional[int], device: str, resume: bool,
                    overwrite: bool, quiet: bool, verbose: int) -> None:
    """merge for a method that writes an adapter: the energy each SVD kept, per module with -v."""
    from mergesmith.engine.adapters import merge_adapters

    def say(line: str) -> None:
        if line.startswith("warning: ") or (verbose if line.startswith("  ") else not quiet):
            err.print(line.replace("warning:", "[yellow]warning:[/]", 1), highlight=False)

    done = merge_adapters(recipe, output, seed=seed, device=device, resume=resume,
                          overwrite=overwrite, log=say)
    if not quiet or verbose:
        err.print(f"wrote adapter {done.path}", highlight=False)


def _mergekit_shard_size(text: str) -> int:
    """mergekit's parse_kmb: a count with an optional k, m or b (thousand, million, billion);
    0 for one shard, as in mergekit."""
    scale = {"k": 1000, "m": 1000**2, "b": 1000**3}.get(text.strip()[-1:].lower(), 1)
    number = text.strip()[:-1] if scale != 1 else text.strip()
    try:
        value = float(number)
    except ValueError:
        raise MergesmithError(f"--out-shard-size {text!r}: not a count",
                              hint="write it like 5B, 500M or 100K, as for mergekit") from None
    if value < 0:
        raise MergesmithError(f"--out-shard-size {text!r}: negative")
    return int(value * scale) or 2**62


def _use_hub_cache(folder: str) -> None:
    """Where hub models are looked up, as HF_HUB_CACHE says (also once huggingface_hub is in)."""
    import os

    os.environ["HF_HUB_CACHE"] = folder
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_CACHE = folder


@app.command()
def check(
    recipe: Path = typer.Argument(..., help="Recipe YAML to validate."),
    shard_size: str = typer.Option("5GB", help="Largest output shard, as for merge."),
    chunk_size: str = typer.Option("8MiB", help="As for merge; sets the memory estimate."),
    compat: Optional[str] = typer.Option(None, help=COMPAT_HELP),
    allow_crimes: bool = typer.Option(False, "--allow-crimes/--no-allow-crimes",
                                      help="As for merge: differences become warnings."),
) -> None:
    """Validate RECIPE against the models' headers and show the plan; writes nothing."""
    from mergesmith.pipeline import plan
    from mergesmith.engine.api import parse_size
    from mergesmith.methods import get_method
    from mergesmith.engine.stages import check_stages, is_multi_stage
    from mergesmith.recipe import load_recipe

    if is_multi_stage(recipe):
        for line in check_stages(recipe, shard_size=shard_size, compat=compat,
                                 allow_crimes=allow_crimes):
            out.print(line, highlight=False)
        out.print("[green]ok[/]: every stage is valid")
        return
    from mergesmith.engine.adapters import adapter_method

    if adapter_method(recipe):  # LoRA adapters into one adapter folder
        return _check_adapters(recipe)
    loaded = load_recipe(recipe)
    the_plan = plan(loaded, shard_size=shard_size, compat=compat, allow_crimes=allow_crimes)
    from mergesmith.engine.continual import continual_summary, is_continual

    method = None if is_continual(loaded) else get_method(loaded.merge_method)
    table = Table(show_header=False, box=None)
    table.add_row("method", continual_summary(loaded) if method is None else
                  f"{method.name} — {method.summary}{_data_needs(method)}")
    for ref, ck in the_plan.models.items():
        table.add_row("model", f"{ref}  ({len(ck.tensors)} tensors){': ' + ck.note if ck.note else ''}")
    table.add_row("output tensors", str(len(the_plan.jobs)))
    table.add_row("output size", _bytes(the_plan.total_bytes))
    table.add_row("output shards", str(len(the_plan.shards)))
    table.add_row("est. peak memory", _bytes(the_plan.peak_memory(parse_size(chunk_size))))
    table.add_row("seed", str(the_plan.seed))
    out.print(table)
    for warning in the_plan.warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    _check_locks(the_plan.models, loaded.base_model)
    out.print("[green]ok[/]: the recipe is valid and the models fit together")


def _check_locks(models: dict, base: Optional[str]) -> None:
    """A MergeLock-ed input makes the merge useless: name it, with the evidence, and fail."""
    from mergesmith.engine.mergelock import lock_findings
    from mergesmith.errors import PlanError

    findings = lock_findings(models, base)
    for line in findings:
        err.print(f"[red]locked:[/] {line}", highlight=False)
    if findings:
        raise PlanError(f"{len(findings)} input model(s) look MergeLock-ed; the merge would not work",
                        hint="undo it first: mergesmith unlock LOCKED --reference BASE_OR_SIBLING OUT, "
                             "then merge OUT")


def _check_adapters(recipe: Path) -> None:
    """check for a method that writes an adapter: the adapters, their modules and ranks."""
    from mergesmith.engine.adapters import plan_adapters

    the_plan = plan_adapters(recipe)
    table = Table(show_header=False, box=None)
    table.add_row("method", f"{the_plan.method.name} — {the_plan.method.summary}")
    for adapter in the_plan.adapters:
        ranks = sorted({m.rank for m in adapter.modules.values()})
        table.add_row("adapter", f"{adapter.label}  (rank {'/'.join(map(str, ranks))}, "
                      f"{len(adapter.modules)} modules, on {adapter.base_model})")
    table.add_row("output", f"one LoRA adapter: {len(the_plan.params)} modules"
                  + (f", {len(the_plan.saved)} saved in full" if the_plan.saved else ""))
    table.add_row("seed", str(the_plan.seed))
    out.print(table)
    for warning in the_plan.warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    out.print("[green]ok[/]: the recipe is valid and the adapters fit together")


@app.command()
def methods() -> None:
    """List every merge method with what it needs and its parameters."""
    from mergesmith.methods import all_methods, all_operations

    table = Table(title="merge methods", show_lines=True)
    for column in ("method", "needs", "parameters", "what it does"):
        table.add_column(column)
    for spec in all_methods():
        models = (f"{spec.min_models}" if spec.min_models == spec.max_models
                  else f"{spec.min_models}+" if spec.max_models is None
                  else f"{spec.min_models}-{spec.max_models}")
        needs = ("base + " if spec.needs_base else "\\[base] + " if spec.optional_base else "") + \
            f"{models} {'adapter' if spec.output == 'adapter' else 'model'}(s)" + _data_needs(spec)
        params = "\n".join(
            f"{p.name}{' (per model)' if p.per_model else ''}"
            f"{'' if p.required else f' = {p.default}'}" for p in spec.params
        )
        table.add_row(spec.name, needs, params or "-", f"{spec.summary}\n[dim]{spec.paper}[/]")
    out.print(table)
    built = Table(title="methods with their own command (MoE, alignment)", show_lines=True)
    for column in ("method", "needs", "command", "what it does"):
        built.add_column(column)
    for op in all_operations():
        built.add_row(op.name, op.needs, op.command, f"{op.summary}\n[dim]{op.paper}[/]")
    if built.row_count:
        out.print(built)


def _data_needs(spec) -> str:
    if spec.learn is not None:
        return "\nneeds data (learns on it)"
    if spec.router:
        return "\nneeds data (trains a router)"
    if spec.statistics == ("second_moment",):
        return "\nneeds optimizer state"
    if spec.statistics:
        source = " of the base" if spec.statistics_from == "base" else ""
        return (f"\n{'data optional' if spec.optional_statistics else 'needs data'} "
                f"({', '.join(spec.statistics)}{source})")
    return ""


@app.command()
def average(
    run: Path = typer.Argument(..., help="A training run's output_dir (its checkpoint-* folders)."),
    output: Path = typer.Argument(..., help="Folder to write: a model, or an adapter for a PEFT run."),
    by: str = typer.Option("uniform", help="uniform, step (w ∝ step^p) or loss (w ∝ loss^-p, "
                           "the training loss in each trainer_state.json)."),
    penalty: float = typer.Option(1.0, min=0.0, help="MWA's penalty p: 0 is uniform, larger "
                                  "favours the best checkpoint more (inf: only it)."),
    adapter_mode: str = typer.Option("factors", help="Adapters: factors (A and B averaged "
                                     "separately, the paper's) or delta (ΔW averaged exactly, rank Σ r)."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing on success."),
) -> None:
    """Average the checkpoints of one training run (MWA: metrics-weighted averaging)."""
    from mergesmith.engine.checkpoints_average import average_run

    done = average_run(run, output, by=by, penalty=penalty, adapter_mode=adapter_mode,
                       overwrite=overwrite, progress=not quiet)
    if not quiet:
        for c, w in zip(done.checkpoints, done.weights):
            loss = f", loss {c.loss:.4g}" if c.loss is not None else ""
            err.print(f"  {c.path.name} (step {c.step}{loss}): weight {w:.4f}", highlight=False)
        err.print(f"wrote {done.path}", highlight=False)
