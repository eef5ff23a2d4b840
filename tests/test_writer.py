"""The shard writer: the bytes safetensors would write, direct (O_DIRECT) or buffered."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergesmith.io import writer as writer_module
from mergesmith.io.writer import OutTensor, ShardWriter, layout_shards

# sizes chosen so that tensors straddle the (shrunk) staging buffer and the file's length is
# not a multiple of the direct-I/O block
TENSORS = {
    "a": torch.arange(3 * 1000, dtype=torch.float32).reshape(3, 1000),
    "b": torch.linspace(-1, 1, 4099).to(torch.bfloat16),
    "c": torch.tensor([7], dtype=torch.int64),
    "d": torch.randn(5, 513, generator=torch.Generator().manual_seed(0)).to(torch.float16),
}


def write_shard(path, chunk_rows: int | None = None) -> ShardWriter:
    shard = layout_shards([OutTensor(n, t.dtype, tuple(t.shape)) for n, t in TENSORS.items()],
                          1 << 30)[0]
    writer = ShardWriter(path, shard)
    for tensor in TENSORS.values():
        if chunk_rows and tensor.dim() > 1:  # as the engine streams a tensor: by rows
            for start in range(0, tensor.shape[0], chunk_rows):
                writer.write(tensor[start:start + chunk_rows])
        else:
            writer.write(tensor)
    writer.close()
    return writer


@pytest.fixture
def small_staging(monkeypatch):
    monkeypatch.setattr(writer_module, "STAGING_BYTES", 2 * writer_module.DIRECT_ALIGN)


def check_file(path):
    loaded = load_file(path)
    assert set(loaded) == set(TENSORS)
    for name, tensor in TENSORS.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert os.path.getsize(path) == layout_shards(
        [OutTensor(n, t.dtype, tuple(t.shape)) for n, t in TENSORS.items()], 1 << 30)[0].size


def direct_supported(tmp_path) -> bool:
    try:
        fd = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except (AttributeError, OSError):
        return False
    os.close(fd)
    return True


@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_direct_and_buffered_writes_give_the_same_loadable_file(tmp_path, small_staging,
                                                                monkeypatch, chunk_rows):
    direct = write_shard(tmp_path / "direct.safetensors", chunk_rows)
    assert direct.direct == direct_supported(tmp_path)
    check_file(tmp_path / "direct.safetensors")
    monkeypatch.setenv("MERGESMITH_DIRECT_WRITES", "0")
    buffered = write_shard(tmp_path / "buffered.safetensors", chunk_rows)
    assert not buffered.direct
    check_file(tmp_path / "buffered.safetensors")
    assert (tmp_path / "direct.safetensors").read_bytes() == \
        (tmp_path / "buffered.safetensors").read_bytes()


def test_tensor_bytes_match_safetensors_own_writer(tmp_path):
    write_shard(tmp_path / "ours.safetensors")
    save_file(TENSORS, tmp_path / "theirs.safetensors")
    ours, theirs = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "theirs.safetensors")
    assert all(torch.equal(ours[n], theirs[n]) for n in TENSORS)


def test_a_filesystem_without_direct_io_at_open_gets_buffered_writes(tmp_path, small_staging,
                                                                    monkeypatch):
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    assert not write_shard(tmp_path / "x.safetensors", 2).direct
    check_file(tmp_path / "x.safetensors")


def test_a_direct_write_refused_midway_goes_on_buffered(tmp_path, small_staging, monkeypatch):
    if not direct_supported(tmp_path):
        pytest.skip("this filesystem has no direct I/O")
    real_write, calls = os.write, {"n": 0}

    def refuse_second_write(fd, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refuse_second_write)
    writer = write_shard(tmp_path / "x.safetensors", 2)
    assert not writer.direct and calls["n"] > 2
    check_file(tmp_path / "x.safetensors")


def test_other_write_errors_are_raised_not_retried(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError) as raised:
        write_shard(tmp_path / "x.safetensors")
    assert raised.value.errno == errno.ENOSPC
