"""Build (and cache) random bf16 Llama checkpoints for the benchmark.

Each size gets a base model plus N experts.  Expert i = base + shared + own_i,
where ``shared`` is one delta common to every expert and ``own_i`` is specific
to expert i, so task vectors are correlated (cosine ~0.5) like real fine-tunes.
Tensors are generated one at a time from a per-name seeded torch.Generator, so
memory stays at ~one shard per model regardless of model size and the result
does not depend on generation order.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

GEN_VERSION = 2  # bump when the generation scheme or config changes (invalidates the cache)

SIZES: dict[str, dict] = {
    # ~1.01B params: TinyLlama-like shape, 20 layers, untied embeddings.
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
               num_hidden_layers=20, num_attention_heads=32, num_key_value_heads=4),
    # ~99.5M params: same family, narrower and shallower.
    "100m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                 num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4),
}

BUILD = dict(
    n_experts=3,
    seed=1234,
    weight_std=0.02,      # base weights ~ N(0, 0.02); norms are 1.0
    shared_std=0.7e-3,    # delta common to all experts
    own_std=0.7e-3,       # expert-specific delta  (total delta std ~1e-3)
    shard_bytes=500 * 1000**2,
)


def llama_config(size: str):
    from transformers import LlamaConfig

    # `architectures` is required: mergekit (and HF loaders) pick the tensor
    # layout from config.architectures[0]; a bare LlamaConfig leaves it unset.
    return LlamaConfig(**SIZES[size], tie_word_embeddings=False,
                       max_position_embeddings=4096, dtype="bfloat16",
                       architectures=["LlamaForCausalLM"])


def tensor_specs(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """Exact (name, shape) list of LlamaForCausalLM, from a meta-device model."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(size))
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def cache_key(size: str) -> str:
    blob = json.dumps([GEN_VERSION, SIZES[size], BUILD], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def model_names(n_experts: int) -> list[str]:
    return ["base"] + [f"expert{i}" for i in range(1, n_experts + 1)]


def _randn(shape, std: float, name: str, role: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(BUILD["seed"] * 1_000_003 + zlib.crc32(f"{role}:{name}".encode()))
    return torch.randn(shape, generator=g, dtype=torch.float32).mul_(std)


def _plan_shards(specs) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, cur, cur_bytes = [], [], 0
    for name, shape in specs:
        nbytes = 2 * int(torch.Size(shape).numel())
        if cur and cur_bytes + nbytes > BUILD["shard_bytes"]:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += nbytes
    if cur:
        shards.append(cur)
    return shards


def build_size(size: str, root: Path, log=print) -> dict[str, Path]:
    """Return {"base": dir, "expert1": dir, ...}, building them if not cached."""
    out = root / f"{size}-{cache_key(size)}"
    names = model_names(BUILD["n_experts"])
    dirs = {n: out / n for n in names}
    if (out / "DONE").exists():
        return dirs
    if out.exists():
        shutil.rmtree(out)  # partial build from an interrupted run
    t0 = time.perf_counter()
    specs = tensor_specs(size)
    n_params = sum(torch.Size(s).numel() for _, s in specs)
    log(f"[build] {size}: {n_params / 1e6:.1f}M params x {len(names)} models -> {out}")
    cfg = llama_config(size)
    for d in dirs.values():
        d.mkdir(parents=True)
        cfg.save_pretrained(d)
    shards = _plan_shards(specs)
    weight_map, total = {}, 0
    for si, shard in enumerate(shards, 1):
        fname = f"model-{si:05d}-of-{len(shards):05d}.safetensors"
        per_model: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                base = torch.ones(shape, dtype=torch.float32)
            else:
                base = _randn(shape, BUILD["weight_std"], name, "base")
            per_model["base"][name] = base.to(torch.bfloat16)
            shared = _randn(shape, BUILD["shared_std"], name, "shared").add_(base)
            del base
            for n in names[1:]:
                own = _randn(shape, BUILD["own_std"], name, n).add_(shared)
                per_model[n][name] = own.to(torch.bfloat16)
                del own
            del shared
            weight_map[name] = fname
            total += 2 * int(torch.Size(shape).numel())
        for n in names:
            save_file(per_model[n], str(dirs[n] / fname), metadata={"format": "pt"})
        del per_model
        log(f"[build] {size}: shard {si}/{len(shards)} written ({time.perf_counter() - t0:.0f}s)")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for d in dirs.values():
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "DONE").write_text(json.dumps({"seconds": time.perf_counter() - t0, "params": n_params}))
    log(f"[build] {size}: done in {time.perf_counter() - t0:.0f}s")
    return dirs


def model_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in Path(model_dir).iterdir() if p.is_file())


def weight_files(model_dir: Path) -> list[Path]:
    """The *.safetensors shards of a checkpoint (what a merge actually reads)."""
    return sorted(Path(model_dir).glob("*.safetensors"))


def dir_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_files(model_dir))


def weight_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in weight_files(model_dir))
