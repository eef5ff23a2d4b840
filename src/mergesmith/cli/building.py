"""Commands that build a model by their own program: `moe`, `moe-compress`, `flexolmo`, `align`,
`lock`, `unlock`, `pack` and `extract-lora`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mergesmith.cli.common import _bytes, app, err
from mergesmith.errors import MergesmithError


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
