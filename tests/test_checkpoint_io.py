"""Safe checkpoint reading: a pickle that would run code is refused, formats other than safetensors / torch
weights are refused, sharded safetensors round-trip bit for bit, wrapped state dicts are unwrapped."""

from __future__ import annotations

import json
import os
import pickle
import re

import pytest
import torch

from vargpt.checkpoint import UnsafeCheckpointError, load_weights, open_checkpoint, read_state_dict
from vargpt.checkpoint.io import (
    SAFE_INDEX,
    CheckpointFormatError,
    CorruptCheckpointError,
    MemorySource,
    load_torch_file,
    save_torch_state_dict,
    write_safetensors,
)
from vargpt.convert import main as convert_main


class _WritesMarker:
    """Unpickling this calls os.system to create a marker file (harmless, observable)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_files(tmp_path):
    marker = tmp_path / "PWNED"
    zip_file = tmp_path / "evil.pth"  # torch.save's zip format, as var_d30.pth
    torch.save({"weight": torch.zeros(2), "payload": _WritesMarker(str(marker))}, zip_file)
    legacy = tmp_path / "evil_legacy.ckpt"  # a bare pickle stream (torch's legacy format path)
    with open(legacy, "wb") as f:
        pickle.dump({"state_dict": {"w": _WritesMarker(str(marker))}}, f, protocol=2)
    return marker, [zip_file, legacy]


def test_code_executing_pickle_is_refused_and_never_runs(evil_files, tmp_path):
    marker, files = evil_files
    for path in files:
        with pytest.raises(UnsafeCheckpointError, match=f"^{re.escape(str(path))}: holds Python code.*will not be"):
            open_checkpoint(path)
        with pytest.raises(UnsafeCheckpointError):
            load_weights(torch.nn.Linear(2, 2), path)
        assert convert_main(["--to", "var", "--in", str(path), "--out", str(tmp_path / "x.pth")]) == 1
        assert not marker.exists()
    # The payload is real: the full unpickler would have run it.
    with open(files[1], "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_other_formats_are_refused(tmp_path):
    for name in ("weights.pkl", "weights.npz", "weights.msgpack"):
        path = tmp_path / name
        path.write_bytes(b"\x80\x04N.")
        with pytest.raises(CheckpointFormatError, match="unsupported"):
            open_checkpoint(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointFormatError, match="no weights"):
        open_checkpoint(empty)


def _mixed_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    bias = torch.zeros(1, 1, 5, 5)
    bias[..., 0, 1:] = float("-inf")
    return {
        "a.weight": torch.randn(64, 32, generator=g),
        "a.bias": torch.randn(64, generator=g).to(torch.bfloat16),
        "lvl_1L": torch.arange(5)[None],
        "attn_bias_for_masking": bias,
        "b.weight": torch.randn(128, 64, generator=g),
        "c.weight": torch.randn(3, generator=g).to(torch.float16),
    }


def test_sharded_safetensors_round_trip_bit_exact(tmp_path):
    state = _mixed_state()
    files = write_safetensors(MemorySource(state), tmp_path, max_shard_size="20KB")
    assert len(files) > 2 and (tmp_path / SAFE_INDEX).is_file()
    index = json.loads((tmp_path / SAFE_INDEX).read_text())
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    src = open_checkpoint(tmp_path)
    assert src.layout() == {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    back = read_state_dict(tmp_path)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # A single file when it fits; a cast touches floating tensors only.
    out = tmp_path / "one"
    write_safetensors(MemorySource(state), out, dtype=torch.bfloat16)
    one = read_state_dict(out / "model.safetensors")
    assert one["lvl_1L"].dtype == torch.int64 and one["a.weight"].dtype == torch.bfloat16
    assert torch.equal(one["a.weight"], state["a.weight"].to(torch.bfloat16))
    assert torch.equal(one["attn_bias_for_masking"].float(), state["attn_bias_for_masking"])


def test_tied_and_view_tensors_are_saved_independently(tmp_path):
    w = torch.randn(4, 4)
    state = {"emb.weight": w, "head.weight": w, "row": w[1]}
    write_safetensors(MemorySource(state), tmp_path / "st")
    back = read_state_dict(tmp_path / "st")
    assert all(torch.equal(back[k], v) for k, v in state.items())
    save_torch_state_dict(state, tmp_path / "x.pth")
    raw = torch.load(tmp_path / "x.pth", weights_only=True)
    assert raw["row"].untyped_storage().nbytes() == 4 * 4  # not the whole 4x4 storage


def test_nested_state_dicts_are_unwrapped(tmp_path):
    state = _mixed_state()
    torch.save({"state_dict": state, "epoch": 3, "global_step": 10, "loops": {"x": 1}}, tmp_path / "l.ckpt")
    assert set(load_torch_file(tmp_path / "l.ckpt")) == set(state)
    torch.save(state, tmp_path / "plain.pth")
    assert set(read_state_dict(tmp_path / "plain.pth")) == set(state)
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)  # pre-1.6 format
    legacy = read_state_dict(tmp_path / "legacy.pth")
    assert all(torch.equal(legacy[k], v) for k, v in state.items())


def _cut(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("where", ["file", "folder", "shard", "torch"])
def test_a_file_cut_short_is_named(tmp_path, where):
    """An interrupted write or copy: the error names the damaged file (safetensors' and torch's own do not)."""
    tensors = MemorySource({"a.weight": torch.randn(64, 64), "b.weight": torch.randn(64, 64)})
    if where == "torch":
        damaged = save_torch_state_dict(dict(tensors), tmp_path / "w.pth")
        opened = damaged
    else:
        files = write_safetensors(tensors, tmp_path / "m", max_shard_size=20000 if where == "shard" else "5GB")
        damaged = files[0]
        opened = damaged if where == "file" else tmp_path / "m"
    _cut(damaged)
    with pytest.raises(CorruptCheckpointError, match=f"^{re.escape(str(damaged))}: cannot be read, .*cut short"):
        open_checkpoint(opened)
