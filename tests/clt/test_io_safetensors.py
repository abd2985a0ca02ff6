"""`clt.io.read_safetensors` against safetensors' own reader, and on malformed files."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from clt.io import read_safetensors


def test_read_safetensors_equals_safetensors_own_reader(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.int32),
               "c": rng.normal(size=(2, 1, 3)).astype(np.float16), "d": np.array([True, False]),
               "e": np.zeros((0, 4), np.float32), "f": np.asarray(rng.normal(), np.float32),
               "g": np.arange(-4, 4, dtype=np.int8), "h": np.arange(5, dtype=np.uint16),
               "i": rng.normal(size=(4, 2)), "j": np.arange(3, dtype=np.int64)}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"x": "y"})
    ref, got = load_file(str(tmp_path / "t.safetensors")), read_safetensors(tmp_path / "t.safetensors")
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        np.testing.assert_array_equal(got[k], ref[k])
        assert not got[k].flags.writeable  # views of the mapped file


def test_read_safetensors_bfloat16(tmp_path):
    """numpy has no bfloat16, so safetensors' numpy reader cannot check this one: the bytes are
    written by hand (little-endian bfloat16 = the top half of the float32)."""
    x = np.array([[1.0, -2.5, 3.140625], [0.0, 65280.0, -1e-3]], np.float32)
    data = x.astype(ml_dtypes.bfloat16).tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, len(data)]}})
    header = header.encode() + b" " * (-len(header) % 8)
    (tmp_path / "b.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)
    got = read_safetensors(tmp_path / "b.safetensors")["w"]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), x.astype(ml_dtypes.bfloat16)
                                  .astype(np.float32))


def _file(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize("content, match", [
    (b"", "empty"),
    (b"\x01\x02", "shorter than a safetensors header"),
    (struct.pack("<Q", 10**9) + b"{}", "past the end"),
    (_file(b"\xff\xfe{}"), "Expecting value|decode"),  # not UTF-8 JSON
    (_file(b"[]"), "not a JSON object"),
    (_file(b'{"w": {"dtype": "F32"}}'), "bad header entry"),
    (_file(b'{"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4),
     "bad header entry"),
    (_file(b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 4),
     "outside the file"),
    (_file(b'{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', b"\0" * 8),
     "reshape"),
])
def test_read_safetensors_malformed_files_raise_value_errors(tmp_path, content, match):
    (tmp_path / "x.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_safetensors(tmp_path / "x.safetensors")


def test_to_device_copies_without_a_program(lowered):
    """`to_device` gives the same values (widened on the host when asked) in a buffer of its
    own, at every alignment: a later write to the source does not reach it (jax.device_put
    alone adopts 64-byte-aligned host buffers on a CPU); and it lowers no program."""
    from clt.io import to_device

    for offset in (0, 4, 16, 32):  # bytes past a 64-byte boundary
        buf = np.zeros(4 * 1031 + 128, np.uint8)
        start = (-buf.ctypes.data) % 64 + offset
        src = buf[start:start + 4 * 1031].view(np.float32)
        src[:] = np.arange(1031, dtype=np.float32) / 7
        want = src.copy()
        with lowered() as programs:
            got = [to_device(src), to_device(src.astype(np.float16), np.float32)]
        assert not programs
        src[:] = -1  # the source written again
        np.testing.assert_array_equal(np.asarray(got[0]), want)
        widened = want.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(got[1]), widened)
        assert got[0].dtype == np.float32 and got[1].dtype == np.float32
