"""Fixtures for the tests: tiny random models (from mergesmith.toy), never downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mergesmith.toy import ARCHS, VOCAB, build_model, default_tokens, model_class, save_tokenizer, tiny_config  # noqa: F401


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """zoo(arch) -> {"base": folder, "e1": folder, "e2": folder}, built once per session."""
    built: dict[str, dict[str, Path]] = {}

    def get(arch: str = "llama") -> dict[str, Path]:
        if arch not in built:
            root = tmp_path_factory.mktemp(f"zoo-{arch}")
            base = build_model(root / "base", arch, seed=0)
            built[arch] = {
                "base": base,
                "e1": build_model(root / "e1", arch, seed=1, base=base),
                "e2": build_model(root / "e2", arch, seed=2, base=base),
            }
        return built[arch]

    return get


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in process: (exit code, stdout, stderr)."""
    import sys

    import pytest

    from mergesmith import cli

    monkeypatch.setattr(sys, "argv", ["mergesmith", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        cli.main()
        raise SystemExit(0)
    captured = capsys.readouterr()
    return info.value.code or 0, captured.out, captured.err


@pytest.fixture
def one_thread():
    """Tiny matmuls and SVDs on a shared 2-core machine: OpenMP's thread hand-offs can cost far
    more than the work itself (66 ms against 1.4 ms for a 64x32 SVD), so run them on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lm_eval_ready_llama(folder: Path, seed: int = 3) -> Path:
    """A toy Llama with a word-level tokenizer that has an EOS token, which lm-eval needs (it
    conditions an empty context on EOS; the toy vocabulary has none)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    build_model(folder, "llama", seed=seed)
    tokens = default_tokens()
    tokens[2] = "[EOS]"
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                            eos_token="[EOS]").save_pretrained(folder)
    return folder
