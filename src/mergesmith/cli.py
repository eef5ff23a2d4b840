"""The `mergesmith` command: each subcommand is a thin call into the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mergesmith import __version__
from mergesmith.engine.allocator import keep_freed_memory
from mergesmith.errors import MergesmithError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Merge fine-tuned Hugging Face models with any method, tensor by tensor.")
out = Console()
err = Console(stderr=True)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        out.print(f"mergesmith {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show a traceback on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    _state["debug"] = debug


COMPAT_HELP = ("mergekit: reproduce mergekit 0.1.5's arithmetic (its compute dtype, sign ties, "
               "rescale, selections); none: the papers' definitions (default: the recipe's compat:).")


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


def _ray_options(ray: bool, workers: int | None, address: str | None) -> dict:
    """merge's keywords for --ray, --workers and --ray-address (none without them)."""
    import os

    if not ray and address is None:
        if workers is not None:
            raise MergesmithError("--workers sets the number of Ray workers: it goes with --ray",
                                  hint="add --ray, or drop --workers (-j sets torch's threads)")
        return {}
    return {"workers": workers or os.cpu_count() or 1, "ray_address": address}


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


@app.command("moe-compress")
def moe_compress(
    moe: Path = typer.Argument(..., help="The MoE folder (Mixtral, Qwen2-MoE, Qwen3-MoE)."),
    output: Path = typer.Argument(..., help="Folder to write; appears only when complete."),
    method: str = typer.Option(..., help="mc_smoe, hc_smoe or sub_moe."),
    experts: int = typer.Option(..., "--experts", help="K: experts per layer in the result."),
    data: Path = typer.Option(..., help="Calibration texts: .txt (one per line), .jsonl, .csv, .parquet."),
    samples: int = typer.Option(128, min=1, help="Calibration examples drawn from --data."),
    max_length: Optional[int] = typer.Option(None, min=2, help="Cut examples to this many tokens."),
    batch_size: int = typer.Option(8, min=1, help="Examples per forward pass."),
    linkage: str = typer.Option("ward", help="hc_smoe: ward, average, complete or single."),
    rank: Optional[int] = typer.Option(None, min=1, help="mc_smoe: rank of its low-rank + sparse "
                                       "compression (training-free); sub_moe: rank of the joint basis."),
    sparse: float = typer.Option(0.0, help="mc_smoe with --rank: share of the residual kept (sparse part)."),
    align: Optional[bool] = typer.Option(None, "--align/--no-align", help="Permute members' hidden "
                                         "units onto their group's most used expert (default: mc_smoe only)."),
    keep_router: bool = typer.Option(False, "--keep-router", help="Keep all E expert slots, each its "
                                     "group's merge, and the router unchanged (MC-SMoE's form)."),
    adaptive: bool = typer.Option(False, "--adaptive", help="mc_smoe with --keep-router: K x layers groups "
                                  "in all, each layer's count by its experts' usage (MC-SMoE's budget)."),
    seed: int = typer.Option(0, help="Seed of the calibration sample and sub_moe's k-means."),
    device: str = typer.Option("cpu", help="Where to run the calibration: cpu, cuda, cuda:1."),
    calibration_dtype: str = typer.Option("float32", help="The MoE's dtype for the calibration run."),
    shard_size: str = typer.Option("5GB", help="Largest output shard, as for merge."),
    resume: bool = typer.Option(False, help="Continue an interrupted run into OUTPUT."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Shrink an MoE to K experts per layer by merging experts (MC-SMoE, HC-SMoE, Sub-MoE),
    from routing statistics over calibration data; router rows merged to match."""
    from mergesmith.moe.compress import compress_moe

    path = compress_moe(moe, output, method=method, experts=experts, data=data, samples=samples,
                        max_length=max_length, batch_size=batch_size, linkage=linkage, rank=rank,
                        sparse=sparse, align=align, keep_router=keep_router, adaptive=adaptive, seed=seed,
                        device=device, calibration_dtype=calibration_dtype, shard_size=shard_size,
                        resume=resume, overwrite=overwrite, progress=not quiet)
    if not quiet:
        err.print(f"wrote {path}", highlight=False)


@app.command("flexolmo")
def flexolmo_command(
    public: str = typer.Argument(..., help="The public dense OLMo-2 model (with --drop/--append: a FlexOlmo MoE)."),
    experts: Optional[list[str]] = typer.Argument(None, help="Experts: 2-expert FlexOlmo MoEs (public FFN, "
                                                  "own FFN) or dense OLMo-2 models; in router order 1..N."),
    output: Path = typer.Option(..., "--out", "-o", help="Folder to write; appears only when complete."),
    texts: list[str] = typer.Option([], "--texts", help="I=FILE: domain texts of expert I (0: the public "
                                    "model; .txt one per line, .jsonl, .csv, .parquet); its router row "
                                    "becomes their mean embedding. Repeat."),
    embedder: Optional[str] = typer.Option(None, help="Model whose mean-pooled last hidden states embed "
                                           "the texts (default: the public model; same hidden size)."),
    samples: int = typer.Option(128, min=1, help="Texts drawn from each --texts file."),
    experts_per_token: int = typer.Option(2, "--experts-per-token", "-k", min=1, help="Top-k of the router."),
    drop: Optional[str] = typer.Option(None, help="I,J,...: opt-out, write the MoE PUBLIC without these experts."),
    append: bool = typer.Option(False, "--append", help="Opt-in: add EXPERTS to the FlexOlmo MoE PUBLIC."),
    seed: int = typer.Option(0, help="Seed of the text samples."),
    device: str = typer.Option("cpu", help="Where to embed the texts: cpu, cuda, cuda:1."),
    shard_size: str = typer.Option("5GB", help="Largest output shard, as for merge."),
    resume: bool = typer.Option(False, help="Continue an interrupted run into OUTPUT."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """FlexOlmo: a public model and experts trained beside its frozen FFN -> one MoE (router rows
    public, 1..N); --drop and --append leave experts out of, or add them to, a built one."""
    from mergesmith.calibrate.data import load_examples
    from mergesmith.moe import flexolmo as fo
    from mergesmith.recipe import Calibration

    experts = experts or []
    write = dict(shard_size=shard_size, resume=resume, overwrite=overwrite)
    if drop is not None:
        if experts or append or texts:
            raise MergesmithError("--drop takes only the MoE: no experts, --append or --texts")
        parts = [i.strip() for i in drop.split(",")]
        if not all(i.isdigit() for i in parts):
            raise MergesmithError(f"--drop {drop!r}: expected expert numbers, e.g. 2 or 1,3")
        indices = [int(i) for i in parts]
        path = fo.drop_experts(public, indices, output, progress=not quiet, **write)
    else:
        by_member: dict[int, list[str]] = {}
        for item in texts:
            index, sep, file = item.partition("=")
            if not sep or not index.isdigit() or int(index) > len(experts) or (append and index == "0"):
                raise MergesmithError(f"--texts {item!r}: expected I=FILE, I in 0..{len(experts)}"
                                      + (" (1.. with --append)" if append else ""))
            cal = Calibration(data=file, samples=samples, seed=seed)
            by_member[int(index)] = [e.text for e in load_examples(cal, Path.cwd())]
        per_expert = [by_member.get(i) for i in range(1, len(experts) + 1)]
        options = dict(texts=per_expert, embedder=embedder, device=device, progress=not quiet, **write)
        path = fo.add_experts(public, experts, output, **options) if append else \
            fo.flexolmo(public, experts, output, public_texts=by_member.get(0),
                        experts_per_token=experts_per_token, **options)
    if not quiet:
        err.print(f"wrote {path}", highlight=False)


TASKS_HELP = "A task.yaml (or its folder); repeat for more tasks."
EXPERT_HELP = "TASK=MODEL: the task's expert, to normalize scores by; repeat for each task."


@app.command()
def evaluate(
    models: list[str] = typer.Argument(..., help="Model folders to score."),
    tasks: list[Path] = typer.Option(..., "--tasks", "-t", help=TASKS_HELP),
    experts: list[str] = typer.Option([], "--experts", "--expert", help=EXPERT_HELP),
    base: Optional[str] = typer.Option(None, help="The base model, to measure forgetting against."),
    split: str = typer.Option("test", help="Which split of each task to score."),
    batch_size: int = typer.Option(32, help="Examples per forward pass."),
    device: str = typer.Option("cpu", help="Where to run the models: cpu, cuda, cuda:1."),
    max_examples: Optional[int] = typer.Option(None, help="Score only the first N examples."),
    seed: int = typer.Option(0, help="Seed of the bootstrap resamples."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
    markdown: Optional[Path] = typer.Option(None, help="Write the report as a Markdown table."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG of average normalized scores."),
) -> None:
    """Score MODELS on tasks: scores, normalized scores with 95% intervals, forgetting."""
    from mergesmith.evaluate import evaluate_models, load_task, plot_normalized, summarize

    loaded = [load_task(t) for t in tasks]
    expert_of = _pairs(experts, "--experts")
    names = list(dict.fromkeys([*models, *expert_of.values(), *([base] if base else [])]))
    results = evaluate_models({name: name for name in names}, loaded, split, batch_size=batch_size,
                              device=device, max_examples=max_examples)
    report = summarize(results, expert_of, base, seed=seed)
    out.print(report.table(title=f"evaluation ({split} split)"))
    _write_report(report, json_path, markdown)
    if plot:
        err.print(f"wrote {plot_normalized(report, plot)}", highlight=False)


@app.command()
def sweep(
    recipe: Path = typer.Argument(..., help="Recipe YAML whose global parameters are swept."),
    grid: list[str] = typer.Option(..., "--grid", help="NAME=START:STOP:STEP or NAME=V1,V2,...; repeat."),
    tasks: list[Path] = typer.Option(..., "--tasks", "-t", help=TASKS_HELP),
    experts: list[str] = typer.Option([], "--expert", "--experts", help=EXPERT_HELP),
    base: Optional[str] = typer.Option(None, help="The base model, to measure forgetting against."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for merges, scores, sweep.json/.md/.png."),
    in_memory: bool = typer.Option(False, help="Merge in memory (small models); no folder per point."),
    batch_size: int = typer.Option(32, help="Examples per forward pass."),
    device: str = typer.Option("cpu", help="Where to merge and evaluate."),
    max_examples: Optional[int] = typer.Option(None, help="Score only the first N examples of a split."),
    seed: Optional[int] = typer.Option(None, help="Seed for randomized methods."),
) -> None:
    """Merge at every grid point, pick the best on validation, report it on test."""
    from mergesmith.search import parse_grid, sweep as run_sweep

    result = run_sweep(recipe, dict(parse_grid(g) for g in grid), tasks, out_dir,
                       experts=_pairs(experts, "--expert"), base=base, in_memory=in_memory,
                       device=device, batch_size=batch_size, max_examples=max_examples, seed=seed,
                       progress=lambda line: err.print(line, highlight=False))
    out.print(result.validation.table(title="sweep (validation split)"))
    out.print(result.test.table(title=f"best: {result.best.label} (test split)"))
    err.print(f"merged {result.merged} point(s), reused the rest; wrote "
              f"{', '.join(str(f) for f in result.files.values())}", highlight=False)


@app.command()
def soup(
    models: list[str] = typer.Argument(..., help="Fine-tuned models of one architecture (the ingredients)."),
    tasks: list[Path] = typer.Option(..., "--tasks", "-t", help=TASKS_HELP),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the soup, scores, soup.json/.md/.yaml."),
    uniform: bool = typer.Option(False, help="Average every model instead of the greedy soup."),
    experts: list[str] = typer.Option([], "--expert", "--experts", help=EXPERT_HELP),
    base: Optional[str] = typer.Option(None, help="The base model, to measure forgetting against."),
    in_memory: bool = typer.Option(False, help="Merge candidates in memory (small models)."),
    batch_size: int = typer.Option(32, help="Examples per forward pass."),
    device: str = typer.Option("cpu", help="Where to merge and evaluate."),
    max_examples: Optional[int] = typer.Option(None, help="Score only the first N examples of a split."),
) -> None:
    """Greedy (default) or uniform model soup, chosen on validation, reported on test."""
    from mergesmith.search import soup as make_soup

    result = make_soup(models, tasks, out_dir, greedy=not uniform, experts=_pairs(experts, "--expert"),
                       base=base, in_memory=in_memory, device=device, batch_size=batch_size,
                       max_examples=max_examples, progress=lambda line: err.print(line, highlight=False))
    out.print(result.test.table(title=f"soup of {len(result.kept)} (test split)"))
    err.print(f"soup: {', '.join(result.kept)}\nwrote {result.folder} and "
              f"{', '.join(str(f) for f in result.files.values())}", highlight=False)


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


@app.command("align")
def align_command(
    paths: list[str] = typer.Argument(..., help="MODEL MODEL [MODEL ...] OUT: models of one "
                                      "architecture (folders or hub ids), then the output folder."),
    method: str = typer.Option("weight_matching", help="weight_matching (Git Re-Basin) or pleas."),
    reference: Optional[str] = typer.Option(None, help="The model the others are aligned to "
                                            "(default: the first); it is not rewritten."),
    units: str = typer.Option("mlp,heads,residual", help="Weight matching: the units to permute "
                              "(add head_dims for the dims within each value head)."),
    scheme: str = typer.Option("mean", help="3+ models: mean (each against the others' mean, "
                               "until nothing changes) or reference (each against the reference)."),
    max_sweeps: int = typer.Option(100, min=1, help="Weight matching: most coordinate-descent sweeps."),
    seed: int = typer.Option(0, help="Seed of the sweeps' order (weight matching; PLeaS: its data)."),
    budget: Optional[float] = typer.Option(None, help="PLeaS: MLP width of the merge, from 1 (d) "
                                           "to 2 (2d); 1.5 unless given."),
    data: Optional[Path] = typer.Option(None, help="PLeaS: calibration text file (default: "
                                        "data-free, random tokens)."),
    device: str = typer.Option("cpu", help="Where to compute: cpu, cuda, cuda:1."),
    shard_size: str = typer.Option("5GB", help="Largest output shard, as for merge."),
    resume: bool = typer.Option(False, help="Continue an interrupted write."),
    overwrite: bool = typer.Option(False, help="Replace existing output folders."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing on success."),
) -> None:
    """Permute models' units onto a reference model, so that they can be merged: each other
    model is written, computing the same function, to OUT/<its folder name>. With --method
    pleas: A and B merged by PLeaS into OUT."""
    from mergesmith.alignment import align

    if len(paths) < 3:
        raise MergesmithError(f"align: got {len(paths)} path(s)", hint="give two models or more, "
                              "then the output folder: mergesmith align A B OUT")
    pleas = {k: v for k, v in (("budget", budget), ("data", data)) if v is not None}
    if pleas and method != "pleas":
        raise MergesmithError(f"--{next(iter(pleas))} is an option of PLeaS, not of {method}",
                              hint="add --method pleas, or leave it out")
    log = None if quiet else (lambda line: err.print(line, highlight=False))
    written = align(paths[:-1], Path(paths[-1]), method=method, reference=reference,
                    units=tuple(u.strip() for u in units.split(",") if u.strip()), scheme=scheme,
                    max_sweeps=max_sweeps, seed=seed, shard_size=shard_size, overwrite=overwrite,
                    resume=resume, device=device, progress=not quiet, log=log, **pleas)
    if not quiet:
        err.print("wrote " + ", ".join(str(p) for p in written), highlight=False)


@app.command("search")
def search_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML with a search: section."),
    output: Path = typer.Argument(..., help="Folder for the log, checkpoint, best.yaml, plots."),
    workers: int = typer.Option(1, "--workers", min=1, help="Evaluate candidates on N Ray "
                                "workers (a local Ray runtime unless --ray-address)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                              help="Join this Ray cluster for the workers."),
    resume: bool = typer.Option(False, help="Continue the search stopped in OUTPUT (starts it "
                                "if there is nothing to continue)."),
    evaluations: Optional[int] = typer.Option(None, min=1, help="Budget in candidates "
                                              "(overrides search.evaluations)."),
    seconds: Optional[float] = typer.Option(None, min=0.0, help="Budget in wall-clock seconds "
                                            "(overrides search.seconds)."),
    seed: Optional[int] = typer.Option(None, help="Search seed (overrides search.seed)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                help="Show the search space and settings first."),
) -> None:
    """Search RECIPE's search: space for the best merge; write best.yaml and the log into OUTPUT."""
    from mergesmith.search.driver import search as run_search
    from mergesmith.search.space import load_search

    problem = load_search(recipe)
    for name, value in (("evaluations", evaluations), ("seconds", seconds), ("seed", seed)):
        if value is not None:
            setattr(problem.settings, name, value)
    settings = problem.settings
    if verbose:
        err.print(f"{settings.optimizer}: {len(problem.space)} dimension(s), seed {settings.seed}, "
                  f"budget {settings.evaluations or '-'} candidate(s) / "
                  f"{settings.seconds or '-'} s", highlight=False)
        for dim in problem.space.dimensions:
            values = dim.choices or f"{dim.low:g}..{dim.high:g} {dim.scale}"
            err.print(f"  {dim.name}: {values}", highlight=False, markup=False)
    result = run_search(problem, output, workers=workers, ray_address=ray_address, resume=resume,
                        progress=not quiet)
    if result.best is None:
        raise MergesmithError(f"every candidate failed; see {output / 'candidates.jsonl'}",
                              hint="the log's error field says why for each")
    scores = ", ".join(f"{s:.4g}" for s in result.best["scores"])
    err.print(f"best: candidate {result.best['id']} ({scores}) of {result.candidates}, "
              f"{60 * result.candidates / max(result.seconds, 1e-9):.1f} candidates/min; "
              f"stopped on {result.stopped}", highlight=False)
    err.print("wrote " + ", ".join(str(f) for f in result.files.values()), highlight=False)


def _pairs(items: list[str], option: str) -> dict[str, str]:
    """['task=model', ...] -> {task: model}."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise MergesmithError(f"{option} {item!r}: expected TASK=MODEL")
        pairs[key] = value
    return pairs


def _write_report(report, json_path: Optional[Path], markdown: Optional[Path]) -> None:
    if json_path:
        report.to_json(json_path)
        err.print(f"wrote {json_path}", highlight=False)
    if markdown:
        markdown.write_text(report.to_markdown())
        err.print(f"wrote {markdown}", highlight=False)


emr_app = typer.Typer(no_args_is_help=True,
                      help="EMR-merging: rebuild a task's model from a merge made with emr.")
app.add_typer(emr_app, name="emr")


@emr_app.command("apply")
def emr_apply(
    merged: Path = typer.Argument(..., help="Folder written by a merge with merge_method: emr."),
    task: str = typer.Argument(..., help="The task's model as the recipe names it, or its index."),
    output: Path = typer.Argument(..., help="Folder to write; appears only when complete."),
    base: Optional[Path] = typer.Option(None, help="The base model's folder, if it moved since the merge."),
    resume: bool = typer.Option(False, help="Continue an interrupted apply into OUTPUT."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing on success."),
) -> None:
    """Write TASK's model θ0 + λ·M ⊙ τ_uni, rebuilt from the EMR merge in MERGED, to OUTPUT."""
    from mergesmith.engine.side_outputs.emr import apply_emr

    path = apply_emr(merged, task, output, base=base, resume=resume, overwrite=overwrite)
    if not quiet:
        err.print(f"wrote {path}", highlight=False)


twin_app = typer.Typer(no_args_is_help=True,
                       help="Twin-Merging: route inputs, or write the model for fixed routing.")
app.add_typer(twin_app, name="twin")


@twin_app.command("apply")
def twin_apply(
    merged: Path = typer.Argument(..., help="Folder written by a merge with merge_method: twin."),
    output: Path = typer.Argument(..., help="Folder to write; appears only when complete."),
    task: Optional[str] = typer.Option(None, help="Route everything to this expert (its name "
                                       "in the recipe, or its index)."),
    weights: Optional[str] = typer.Option(None, help="Fixed routing weights, one per expert, "
                                          "comma-separated."),
    resume: bool = typer.Option(False, help="Continue an interrupted apply into OUTPUT."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing on success."),
) -> None:
    """Write θ* + Σ w_t v_t, for one task (--task) or fixed weights (--weights), to OUTPUT."""
    from mergesmith.engine.side_outputs.twin import apply_twin

    mix = None
    if weights is not None:
        try:
            mix = [float(w) for w in weights.split(",")]
        except ValueError:
            raise MergesmithError(f"--weights: not numbers: {weights!r}",
                                  hint="write them like 0.7,0.2,0.1") from None
    path = apply_twin(merged, output, task=task, weights=mix, resume=resume, overwrite=overwrite)
    if not quiet:
        err.print(f"wrote {path}", highlight=False)


@twin_app.command("route")
def twin_route(
    merged: Path = typer.Argument(..., help="Folder written by a merge with merge_method: twin."),
    texts: list[str] = typer.Argument(..., help="Inputs to route."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
) -> None:
    """Print each text's routing weights over the experts."""
    from mergesmith.calibrate.router import route_texts
    from mergesmith.engine.side_outputs.twin import read_index

    tasks = read_index(merged)["tasks"]
    weights = route_texts(merged, texts, device=device)
    for text, row in zip(texts, weights.tolist()):
        mix = "  ".join(f"{task}={w:.3f}" for task, w in zip(tasks, row))
        print(f"{mix}  {text[:60]!r}")


rmm_app = typer.Typer(no_args_is_help=True,
                      help="Reversible Model Merging: rebuild a task's adapter from an rmm merge.")
app.add_typer(rmm_app, name="rmm")


@rmm_app.command("apply")
def rmm_apply(
    merged: Path = typer.Argument(..., help="Adapter folder written by a merge with merge_method: rmm."),
    task: str = typer.Argument(..., help="The task's adapter as the recipe names it, or its index."),
    output: Path = typer.Argument(..., help="Folder to write; appears only when complete."),
    model: Optional[Path] = typer.Option(None, help="A base model folder: write the full model with "
                                         "the rebuilt adapter applied, not the adapter."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing on success."),
) -> None:
    """Write TASK's LoRA adapter, rebuilt from the RMM basis and coefficients in MERGED, to OUTPUT."""
    from mergesmith.engine.side_outputs.rmm import apply_rmm

    path = apply_rmm(merged, task, output, model=model, overwrite=overwrite)
    if not quiet:
        err.print(f"wrote {path}", highlight=False)


@app.command("moe")
def moe(
    config: Optional[Path] = typer.Argument(None, help="mergekit-moe YAML config (none with --upcycle)."),
    output: Optional[Path] = typer.Argument(None, help="Folder to write; appears only when complete."),
    upcycle: Optional[str] = typer.Option(None, "--upcycle", help="Upcycle this dense model "
                                          "(AquilaMoE scale-out): its MLP in every expert, random router."),
    experts: Optional[int] = typer.Option(None, "--experts", min=1, help="Experts, with --upcycle."),
    experts_per_token: int = typer.Option(2, min=1, help="Top-k, with --upcycle."),
    noise_scale: Optional[float] = typer.Option(None, min=0, help="With --upcycle: N(0, σ²) noise "
                                                "on each expert's weights (seeded), to break symmetry."),
    architecture: Optional[str] = typer.Option(None, help="With --upcycle: mixtral, qwen2_moe, qwen3_moe."),
    dtype: Optional[str] = typer.Option(None, help="With --upcycle: output dtype."),
    seed: int = typer.Option(0, help="With --upcycle: seed of the router rows and noise."),
    device: str = typer.Option("cpu", help="Where to run the prompts and copy: cpu, cuda, cuda:1."),
    shard_size: str = typer.Option("5GB", help="Largest output shard, as for merge."),
    resume: bool = typer.Option(False, help="Continue an interrupted build into OUTPUT."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    allow_identical_experts: bool = typer.Option(
        False, "--allow-identical-experts", "--i-understand-this-is-not-useful-without-training",
        help="Build an MoE whose experts are all one model (to train it afterwards)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Assemble dense experts into a Mixtral / Qwen-MoE (mergekit-moe's YAML), or upcycle one
    dense model into N experts; router rows from the experts' prompts."""
    from mergesmith.moe.assemble import build_moe, upcycle as upcycle_model

    options = dict(device=device, shard_size=shard_size, resume=resume, overwrite=overwrite,
                   progress=not quiet)
    if upcycle is not None:
        if experts is None or config is None or output is not None:
            raise MergesmithError("--upcycle MODEL takes --experts N and one OUTPUT, no CONFIG",
                                  hint="mergesmith moe --upcycle MODEL --experts 8 OUT")
        path = upcycle_model(upcycle, experts, config, noise_scale=noise_scale, seed=seed,
                             experts_per_token=experts_per_token, architecture=architecture,
                             dtype=dtype, **options)
    else:
        if config is None or output is None:
            raise MergesmithError("mergesmith moe takes CONFIG and OUTPUT (or --upcycle MODEL "
                                  "--experts N OUTPUT)")
        from mergesmith.recipe.moe import load_moe_config

        path = build_moe(load_moe_config(config), output,
                         allow_identical_experts=allow_identical_experts, **options)
    if not quiet:
        err.print(f"wrote {path}", highlight=False)


@app.command("lock")
def lock_command(
    model: str = typer.Argument(..., help="Model folder or hub id (Llama, Mistral, Qwen2, Gemma)."),
    output: Path = typer.Argument(..., help="Folder for the locked model."),
    seed: Optional[int] = typer.Option(None, help="Seed of the transforms (default: fresh OS "
                                       "randomness, recorded nowhere)."),
    spread: float = typer.Option(2.0, help="Scales of the transforms lie in [1/spread, spread]."),
    shard_size: str = typer.Option("5GB", help="Largest output shard, as for merge."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
) -> None:
    """MergeLock MODEL: random per-head transforms of Q/K and V/O (RoPE- and GQA-aware) that keep
    its outputs and make merges with related models fail."""
    from mergesmith.engine.mergelock import lock

    done = lock(model, output, seed=seed, spread=spread, shard_size=shard_size, overwrite=overwrite)
    err.print(f"wrote {done}", highlight=False)


@app.command("unlock")
def unlock_command(
    locked: str = typer.Argument(..., help="A MergeLock-ed model folder."),
    output: Path = typer.Argument(..., help="Folder for the unlocked model."),
    reference: str = typer.Option(..., help="Its base or a sibling fine-tune (the closer the better)."),
    shard_size: str = typer.Option("5GB", help="Largest output shard, as for merge."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
) -> None:
    """Undo a MergeLock: per head, the transform that best maps REFERENCE onto LOCKED is inverted;
    the outputs stay those of LOCKED, the weights come back near REFERENCE, so it merges again."""
    from mergesmith.engine.mergelock import unlock

    done = unlock(locked, reference, output, shard_size=shard_size, overwrite=overwrite,
                  log=lambda line: err.print(line, highlight=False))
    err.print(f"wrote {done}", highlight=False)


@app.command("analyze")
def analyze_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML whose models to analyse (nothing is merged)."),
    output: Path = typer.Argument(..., help="Folder for summary.json, tensors.jsonl, plots, report.md."),
    merged: Optional[Path] = typer.Option(None, help="A merge of the recipe: measure it against "
                                          "the task vectors too."),
    density: Optional[float] = typer.Option(None, help="Density of the top-k masks and of the "
                                            "drops (default: the recipe's, else 0.2)."),
    rank: int = typer.Option(32, "--rank", min=1, help="Singular values kept of larger matrices "
                             "(a randomized SVD); smaller ones get their whole spectrum."),
    seed: Optional[int] = typer.Option(None, help="Seed of DARE's and DELLA's draws (default: "
                                       "the recipe's, else 0)."),
    allow_crimes: bool = typer.Option(False, "--allow-crimes/--no-allow-crimes",
                                      help="As for merge."),
    overwrite: bool = typer.Option(False, help="Write into OUTPUT even if it is not empty."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Task-vector statistics of a recipe's models: norms, cosines, sign conflicts, top-k
    overlap, spectra, what each sparsifying method would drop; per tensor, layer and model."""
    from mergesmith.analyze import analyze

    path = analyze(recipe, output, merged=merged, density=density, max_rank=rank, seed=seed,
                   allow_crimes=allow_crimes, overwrite=overwrite, progress=not quiet)
    if not quiet:
        err.print(f"report: {path / 'report.md'}  figures: {path / 'summary.json'}", highlight=False)


@app.command("negate")
def negate_command(
    forget: str = typer.Argument(..., help="The base fine-tuned on what to remove (θ_forget)."),
    output: Path = typer.Argument(..., help="Folder for negation.json/.md, negated.yaml, model/."),
    base: str = typer.Option(..., help="The base model θ0 (τ_f = θ_forget − θ0)."),
    target: Optional[str] = typer.Option(None, help="The model to remove it from (default: the base)."),
    forget_tasks: list[Path] = typer.Option(..., "--forget-task", help="A task the negation should "
                                            "lose; repeat for more."),
    control_tasks: list[Path] = typer.Option(..., "--control-task", help="A task it must keep; λ is "
                                             "chosen by these. Repeat for more."),
    lambdas: str = typer.Option("0.1:1:0.1", help="λ values: START:STOP:STEP or V1,V2,... (0 is added)."),
    floor: float = typer.Option(0.95, help="Share of the original's control score to keep (paper: 0.95)."),
    split: str = typer.Option("validation", help="The split λ is chosen on."),
    report_split: str = typer.Option("test", help="The split the chosen λ is reported on."),
    in_memory: bool = typer.Option(True, help="Merge each λ in memory (no folder per λ)."),
    model: bool = typer.Option(True, help="Write the negated model at the chosen λ to OUTPUT/model."),
    batch_size: int = typer.Option(32, help="Examples per forward pass."),
    device: str = typer.Option("cpu", help="Where to merge and evaluate."),
    max_examples: Optional[int] = typer.Option(None, help="Score only the first N examples of a split."),
) -> None:
    """Forget by task-vector negation: θ_target − λ(θ_forget − θ0) for each λ; the largest λ that
    keeps every control task above the floor is chosen; a forgetting report says what the
    forget tasks lose and what the control tasks keep."""
    from mergesmith.search import parse_grid
    from mergesmith.search.negation import negate

    result = negate(forget, base=base, target=target, forget_tasks=forget_tasks,
                    control_tasks=control_tasks, lambdas=parse_grid(f"lambda={lambdas}")[1],
                    out=output, floor=floor, select_split=split, report_split=report_split,
                    in_memory=in_memory, device=device, batch_size=batch_size,
                    max_examples=max_examples, write_model=model,
                    progress=lambda line: err.print(line, highlight=False))
    out.print(result.to_markdown(), highlight=False)
    err.print("wrote " + ", ".join(str(f) for f in result.files.values()), highlight=False)


@app.command("extract-lora")
def extract_lora(
    base: str = typer.Argument(..., help="The base model."),
    finetuned: str = typer.Argument(..., help="The full fine-tune of BASE."),
    output: Path = typer.Argument(..., help="Adapter folder to write (PeftModel loads it)."),
    rank: int = typer.Option(128, "--rank", "--max-rank", "-r", min=1, help="Largest rank per module."),
    energy: Optional[float] = typer.Option(None, min=0, max=1, help="Per module, the smallest rank "
                                           "keeping this share of ‖τ‖² (at most --rank)."),
    sv_epsilon: float = typer.Option(0.0, min=0, help="Drop singular values ≤ this (absolute)."),
    module_rank: list[str] = typer.Option([], help="REGEX=RANK: the largest rank of modules whose "
                                          "name REGEX finds (first match wins), e.g. 'mlp=32'."),
    distribute_scale: bool = typer.Option(True, "--distribute-scale/--no-distribute-scale",
                                          help="√S on both factors (else S on A)."),
    embed_lora: bool = typer.Option(False, "--embed-lora/--no-embed-lora", help="Embeddings as LoRA "
                                    "(else saved whole, as when the vocabulary changed)."),
    save_module: list[str] = typer.Option([], help="Save this module whole (repeatable)."),
    include_regex: list[str] = typer.Option([], "--include-regex", "-i", help="Only these modules."),
    exclude_regex: list[str] = typer.Option([], "--exclude-regex", "-e", help="Not these modules."),
    skip_undecomposable: bool = typer.Option(False, help="Drop norms etc. instead of saving them whole."),
    randomized: bool = typer.Option(False, help="APPROXIMATE randomized SVD (seeded)."),
    seed: int = typer.Option(0, help="Seed of --randomized."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """A LoRA adapter from a full fine-tune (truncated SVD of θ_ft − θ_base per matrix), as
    mergekit-extract-lora writes it; one matrix in memory at a time."""
    from mergesmith.engine import extract_lora as ex
    from mergesmith.engine.allocator import return_freed_memory

    return_freed_memory()  # few, varied buffers: kept, they fragment (see the function)
    rule = ex.RankRule(rank, energy, sv_epsilon, ex.parse_module_ranks(module_rank))
    options = ex.Options(rule, distribute_scale, embed_lora, tuple(save_module), tuple(include_regex),
                         tuple(exclude_regex), skip_undecomposable, randomized, seed)
    result = ex.extract_lora(base, finetuned, output, options, overwrite=overwrite, progress=not quiet)
    for note in result.notes:
        err.print(f"note: {note}", highlight=False, markup=False)
    err.print(ex.summary(result), highlight=False, markup=False, soft_wrap=True)


@app.command("pack")
def pack_command(
    base: str = typer.Argument(..., help="The base model."),
    expert: str = typer.Argument(..., help="A fine-tune of BASE."),
    output: Path = typer.Argument(..., help="Pack folder to write (use it as `model:` in a recipe)."),
    attention: str = typer.Option("int8:20,int4:180,int2:800", help="Rank tiers of attention "
                                  "matrices: PRECISION:COUNT,... (fp32/fp16/bf16/int8/int4/int3/int2; "
                                  "COUNT * = the rest); triplets past the tiers are dropped."),
    mlp: str = typer.Option("int8:20,int4:180,int2:1200", help="Rank tiers of MLP matrices."),
    rest: str = typer.Option("full", help="Other tensors: full (GraftLLM), or sparse (ours: the "
                             "largest |Δ| entries, --density of them)."),
    density: float = typer.Option(0.1, help="Share of entries `--rest sparse` keeps."),
    group_size: int = typer.Option(128, help="Entries per quantisation scale along a factor's rows."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
) -> None:
    """A GraftLLM-style delta pack: θ_ft − θ0 per attention/MLP matrix as an SVD in precision
    tiers (round-to-nearest quantised), the rest whole; one tensor in memory at a time."""
    from mergesmith.engine.pack import PackOptions, pack
    from mergesmith.methods.graft import parse_tiers

    options = PackOptions(parse_tiers(attention, "--attention"), parse_tiers(mlp, "--mlp"), rest,
                          density, group_size)
    result = pack(base, expert, output, options, overwrite=overwrite)
    kinds = ", ".join(f"{n} {k}" for k, n in result.kinds.items() if n)
    share = result.pack_bytes / result.expert_bytes if result.expert_bytes else 0.0
    err.print(f"wrote {result.path}: {kinds} tensors; {_bytes(result.pack_bytes)} against "
              f"{_bytes(result.expert_bytes)} for the expert's weights ({share:.1%}); largest "
              f"relative error of a low-rank Δ: {result.error:.3g}", highlight=False, markup=False,
              soft_wrap=True)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("mergesmith-demo"), "--out", help="Folder for the report and plots."),
    fast: bool = typer.Option(False, help="Tiny random model, two tasks, a few steps (seconds)."),
    seed: int = typer.Option(0, help="Seed for training, merging and the bootstrap."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default $MERGESMITH_CACHE, "
                                         "else ~/.cache/mergesmith)."),
    method: Optional[list[str]] = typer.Option(None, help="Only these methods (repeatable); "
                                               "`search` adds a time-bounded CMA-ES search row."),
    every: bool = typer.Option(False, "--all", help="Every method (default: a representative ten)."),
    adapters: bool = typer.Option(False, "--adapters", help="The experts as LoRA adapters: merged by "
                                  "the adapter methods and, as base+adapter, by the others."),
) -> None:
    """Fine-tune an expert per task from a real pretrained model, merge them with ten
    representative methods (--all: every method), and print the leaderboard (no download: model
    and data ship with the package)."""
    import time

    from mergesmith.demo import search_row
    from mergesmith.demo.assets import cache_dir
    from mergesmith.demo.leaderboard import demo_methods, rich_table, run_leaderboard
    from mergesmith.demo.run import prepare_demo

    start = time.perf_counter()

    def say(message: str) -> None:
        err.print(message, highlight=False, markup=False)

    if adapters:
        from mergesmith.demo.adapters import DEFAULT_ADAPTER_METHODS, run_adapter_leaderboard

        methods = demo_methods(method, every, DEFAULT_ADAPTER_METHODS)
        board = run_adapter_leaderboard(out_dir, fast=fast, seed=seed, cache=cache, methods=methods, say=say)
    else:
        methods = demo_methods(method, every)
        setup = prepare_demo(fast=fast, seed=seed, cache=cache)
        root = cache_dir(cache) / ("leaderboard-fast" if fast else "leaderboard")
        board = run_leaderboard(setup.base, setup.experts, setup.tasks, out_dir, cache=root, seed=seed,
                                methods=methods, say=say,
                                search_seconds=search_row.FAST_SECONDS if fast else search_row.SECONDS)
    Console(width=max(out.width, 170)).print(rich_table(board))
    err.print(f"report: {board.files['markdown']}  plots: {board.files['plot']}"
              f"{'  ' + str(board.files['sweep']) if 'sweep' in board.files else ''}  "
              f"({time.perf_counter() - start:.0f} s)", highlight=False)


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n} B"


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the merge unwinds as for Ctrl-C (a
    BaseException, so that no `except Exception` on the way swallows it)."""


def _terminate(signum, frame) -> None:
    raise _Terminated()


def _interrupted(argv: list[str], code: int) -> None:
    command = [a for a in argv if not a.startswith("-")][:2]
    resumable = command[:1] in (["merge"], ["search"]) or command[1:] == ["apply"]
    err.print("interrupted" + ("; rerun the same command with --resume to continue"
                               if resumable else ""), highlight=False)
    sys.exit(code)


def main() -> None:
    import signal

    keep_freed_memory()  # every command allocates and frees large tensors over and over
    argv = sys.argv[1:]
    if "--debug" in argv:  # accepted anywhere on the line, not only before the command
        argv = ["--debug"] + [a for a in argv if a != "--debug"]
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(args=argv, prog_name="mergesmith", standalone_mode=False)
    except _Terminated:
        _interrupted(argv, 128 + signal.SIGTERM)
    except MergesmithError as exc:
        if _state["debug"]:
            raise
        # plain print: one line however narrow the terminal, easy to grep in logs
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        _interrupted(argv, 130)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)))
    except Exception as exc:  # click's usage errors come through here with standalone_mode off
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise
    # typer turns Ctrl-C into a returned 130 when it does not exit itself
    if code == 130:
        _interrupted(argv, 130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
