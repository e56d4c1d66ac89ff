"""safetensors headers: every file the `safetensors` library reads is accepted (whatever its header length), zip and
pickle byte streams are named (never unpickled), and crafted headers are refused with one CheckpointError naming the
file before anything is allocated."""

import json
import pickle
import struct
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastsd35.errors import CheckpointError
from fastsd35.models.mmditx import MMDiTX
from fastsd35.tiny.family import TINY_MMDITX_CONFIG
from fastsd35.weights.checkpoints import (
    diffusers_weight_headers,
    load_transformer,
    safetensors_header,
    transformer_config,
)


def file_with_header_low_byte(path, low: int):
    """A real safetensors file whose 8-byte header length has `low` as its first (lowest) byte."""
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    for pad in range(600):
        save_file(tensors, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == low:
            return path
    raise AssertionError("no padding gave the wanted header length")


@pytest.mark.parametrize("low", [0x80, ord("P"), 0x00])
def test_any_header_length_is_accepted(tmp_path, low):
    path = file_with_header_low_byte(tmp_path / "m.safetensors", low)
    with safe_open(str(path), framework="pt") as f:  # the library reads it ...
        assert f.get_tensor("w").shape == (2, 3)
    assert safetensors_header(path)["w"]["shape"] == [2, 3]  # ... and so do we


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_every_binary_pickle_protocol_is_named(tmp_path, protocol):
    path = tmp_path / "model.bin"
    path.write_bytes(pickle.dumps({"w": [1.0]}, protocol=protocol))  # written here, never unpickled
    with pytest.raises(CheckpointError, match=r"model\.bin: this is a PyTorch pickle checkpoint \(\.ckpt"):
        safetensors_header(path)


@pytest.mark.parametrize("head", [b"\x80\x01", b"\x80\x06", b"\x81\x02"])
def test_bytes_next_to_the_pickle_opcode_are_not_called_pickle(tmp_path, head):
    """PROTO is 0x80 followed by a protocol 2..5: anything else that fails to parse is just not safetensors."""
    path = tmp_path / "model.bin"
    path.write_bytes(head + b"\xff" * 30)
    with pytest.raises(CheckpointError, match=r"model\.bin: not a safetensors file \(no valid header\)"):
        safetensors_header(path)


def test_zip_and_pickle_streams_are_named_not_loaded(tmp_path):
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(pickle.dumps({"state_dict": {"w": [1.0, 2.0]}}, protocol=2))  # written here, never unpickled
    with pytest.raises(CheckpointError, match=r"model\.ckpt: this is a PyTorch pickle checkpoint \(\.ckpt/\.pt/\.bin\)"):
        safetensors_header(pickled)
    zipped = tmp_path / "model.pt"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": 1}))
    with pytest.raises(CheckpointError, match=r"model\.pt: this is a PyTorch pickle checkpoint in a zip archive"):
        safetensors_header(zipped)


def crafted(path, header, data=b""):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize(
    "header, data, message",
    [
        ([1, 2], b"", "the header is a JSON list, not an object"),
        ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": ["0", 16]}}, bytes(16), "has data_offsets"),
        ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0.0, 16.0]}}, bytes(16), "has data_offsets"),
        ({"w": {"shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16), "lacks dtype, shape or data_offsets"),
        ({"w": {"dtype": "F32", "data_offsets": [0, 16]}}, bytes(16), "lacks dtype, shape or data_offsets"),
        ({"w": "tensor"}, b"", "lacks dtype, shape or data_offsets"),
        ({"w": {"dtype": "F33", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16), "unknown dtype 'F33'"),
        ({"w": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, bytes(16), "has shape [-2, -2]"),
        ({"w": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, bytes(16), "has shape"),
        ({"w": {"dtype": "F32", "shape": [0, 10**12], "data_offsets": [0, 0]}}, b"", "has shape"),
        ({"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}, bytes(16), "does not match its 16 bytes"),
        ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}}, bytes(16), "has data_offsets"),
        ({"a": F32_2x2, "b": F32_2x2}, bytes(32), "overlaps the previous tensor"),
        ({"a": F32_2x2, "b": {**F32_2x2, "data_offsets": [20, 36]}}, bytes(36), "leaves a gap"),
        ({"__metadata__": {"a": 1}, "w": F32_2x2}, bytes(16), "__metadata__ is not an object of strings"),
        ({"w": F32_2x2}, bytes(20), "4 bytes after the last tensor"),
    ],
)
def test_crafted_headers(tmp_path, header, data, message):
    path = crafted(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors: .*{message.replace('[', '.').replace(']', '.').replace('(', '.').replace(')', '.')}"):
        safetensors_header(path)


def test_a_header_that_is_not_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"{not json}")
    with pytest.raises(CheckpointError, match="its header is not JSON"):
        safetensors_header(path)


def transformer_dict():
    return {"model.diffusion_model." + k: v.contiguous() for k, v in MMDiTX(TINY_MMDITX_CONFIG).state_dict().items()}


def test_shapes_that_imply_a_huge_model_are_refused_before_allocating(tmp_path):
    sd = transformer_dict()
    # A wide x_embedder (few bytes: 1 input channel, patch 1) implies 4096/64 = 64 blocks the file does not hold.
    sd["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(4096, 1, 1, 1)
    save_file(sd, str(tmp_path / "big.safetensors"))
    with pytest.raises(CheckpointError, match=r"big\.safetensors: its shapes imply 64 transformer blocks but it holds 2"):
        transformer_config(tmp_path / "big.safetensors")


def test_shapes_are_checked_against_the_model_before_allocating(tmp_path, monkeypatch):
    sd = transformer_dict()
    sd["model.diffusion_model.joint_blocks.0.x_block.mlp.fc1.weight"] = torch.zeros(64 * 4096, 1)
    save_file(sd, str(tmp_path / "odd.safetensors"))
    allocated = []
    monkeypatch.setattr(MMDiTX, "empty", classmethod(lambda cls, *a, **k: allocated.append(1)))
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: "):
        load_transformer(tmp_path / "odd.safetensors", device="cpu")
    assert not allocated


@pytest.mark.parametrize("weight_map", [[], {"w": 3}, {"w": "../elsewhere.safetensors"}, {"w": "model.bin"}])
def test_index_files_of_the_wrong_type(tmp_path, weight_map):
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="index.json: weight_map must map tensor names to .safetensors file names"):
        diffusers_weight_headers(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="unreadable shard index"):
        diffusers_weight_headers(tmp_path)


def test_a_fifo_or_folder_as_checkpoint_does_not_hang(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo.safetensors")
    with pytest.raises(CheckpointError, match="it is a FIFO"):
        safetensors_header(tmp_path / "fifo.safetensors")
    with pytest.raises(CheckpointError, match="it is a folder"):
        safetensors_header(tmp_path)


def test_a_file_changed_after_its_header_was_read_is_a_checkpoint_error(tmp_path):
    from fastsd35.weights.checkpoints import TensorSource

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(path))
    source = TensorSource.from_file(path)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"m\.safetensors: cannot read tensor w"):
        source.get("w")


def test_an_empty_tensor_is_valid(tmp_path):
    """Zero-size entries are valid safetensors (ComfyUI's FP8 files carry a shape-[0] `scaled_fp8` marker): accepted,
    as the safetensors library reads them."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "marker.safetensors"
    save_file({"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn), "w": torch.ones(2, 2)}, str(path))
    assert load_file(str(path))["scaled_fp8"].shape == (0,)
    assert safetensors_header(path)["scaled_fp8"]["shape"] == [0]


def test_dtype_sizes_are_the_libraries():
    """Our table of safetensors dtypes and element sizes agrees with the safetensors library's own dtype list (by
    torch's element sizes) for every dtype both know."""
    from safetensors import torch as st

    from fastsd35.weights.checkpoints import SAFETENSORS_DTYPES

    theirs = {name: dtype.itemsize for name, dtype in st._TYPES.items()}
    assert {n: SAFETENSORS_DTYPES[n] for n in theirs} == theirs
    assert set(SAFETENSORS_DTYPES) - set(theirs) <= {"F8_E8M0"}  # one byte, newer than this library's list


def test_shape_limits_at_their_boundaries(tmp_path):
    """Up to 8 dimensions of at most 2**31 each pass the shape check; a ninth dimension, or a dimension one larger, is
    refused as a shape (checkpoints.MAX_DIMS, MAX_DIM)."""

    def header(shape):
        return crafted(tmp_path / "b.safetensors", {"w": {"dtype": "U8", "shape": shape, "data_offsets": [0, 1]}}, b"x")

    assert safetensors_header(header([1] * 8))["w"]["shape"] == [1] * 8
    with pytest.raises(CheckpointError, match="has shape"):
        safetensors_header(header([1] * 9))
    with pytest.raises(CheckpointError, match="does not match its 1 bytes"):  # past the shape check
        safetensors_header(header([2**31]))
    with pytest.raises(CheckpointError, match="has shape"):
        safetensors_header(header([2**31 + 1]))
