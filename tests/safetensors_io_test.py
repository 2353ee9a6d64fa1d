"""aya_jax.models.safetensors_io: reading checked against the safetensors library's own
reader (the reference), and crafted corrupt files that must fail naming file and tensor."""

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from aya_jax.models import safetensors_io as st


def _reference_tensors():
  rng = np.random.default_rng(0)
  return {"a": rng.standard_normal((50, 7)).astype(np.float32),
          "b": rng.standard_normal((3,)).astype(ml_dtypes.bfloat16),
          "c": np.arange(12, dtype=np.int64).reshape(4, 3),
          "empty": np.zeros((0, 3), np.float16)}


@pytest.fixture
def good(tmp_path):
  path = str(tmp_path / "good.safetensors")
  save_file(_reference_tensors(), path, metadata={"format": "pt"})
  return path


def _raw(path, header, data: bytes, length=None):
  """Writes a safetensors file byte by byte: any header (dict or bytes), any data."""
  text = header if isinstance(header, bytes) else json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write((len(text) if length is None else length).to_bytes(8, "little") + text + data)
  return str(path)


@pytest.mark.parametrize("map_bytes", [st.MAP_BYTES, 0])  # read, and memory-mapped
def test_reads_what_the_safetensors_library_reads(good, monkeypatch, map_bytes):
  monkeypatch.setattr(st, "MAP_BYTES", map_bytes)
  ref = load_file(good)
  tensors = st.read_header(good)
  assert sorted(tensors) == sorted(ref)
  for name, want in ref.items():
    got = st.read(tensors[name])
    assert got.dtype == want.dtype and got.shape == want.shape, name
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=name)
  np.testing.assert_array_equal(st.read(tensors["a"], rows=(1, 4)), ref["a"][1:4])
  np.testing.assert_array_equal(st.read(tensors["c"], rows=(3, 3)), ref["c"][3:3])
  with pytest.raises(ValueError, match=r"rows \(2, 51\) of tensor 'a'"):
    st.read(tensors["a"], rows=(2, 51))


def test_header_bytes_is_a_file_the_library_reads(tmp_path):
  ref = _reference_tensors()
  path = tmp_path / "ours.safetensors"
  with open(path, "wb") as f:
    f.write(st.header_bytes([(k, v.dtype, v.shape) for k, v in ref.items()]))
    for v in ref.values():
      f.write(v.tobytes())
  back = load_file(str(path))
  for name, want in ref.items():
    np.testing.assert_array_equal(back[name].view(np.uint8), want.view(np.uint8))


def test_header_length_of_2_to_the_40_is_refused(tmp_path):
  path = _raw(tmp_path / "m.safetensors", {}, b"", length=2**40)
  with pytest.raises(ValueError, match=f"{path}: header length 1099511627776 bytes is over"):
    st.read_header(path)


def test_header_length_past_the_end_and_short_files(tmp_path):
  path = _raw(tmp_path / "m.safetensors", {}, b"", length=1000)
  with pytest.raises(ValueError, match=f"{path}: header length 1000 bytes runs past the end"):
    st.read_header(path)
  (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
  with pytest.raises(ValueError, match="short.safetensors: not a safetensors file"):
    st.read_header(tmp_path / "short.safetensors")


def test_file_cut_in_half_names_the_first_tensor_it_cuts(good, tmp_path):
  data = open(good, "rb").read()
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(data[:len(data) // 2])
  header_end = 8 + int.from_bytes(data[:8], "little")
  tensors = st.read_header(good)
  first_cut = min((t for t in tensors.values() if t.stop > len(data) // 2),
                  key=lambda t: t.start).name
  assert len(data) // 2 > header_end  # the header survives: only the data is cut
  with pytest.raises(ValueError, match=rf"tensor '{first_cut}' in {cut}.*past the end.*"
                                       "truncated"):
    st.read_header(cut)


def test_offset_past_the_end(tmp_path):
  path = _raw(tmp_path / "m.safetensors",
              {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(8))
  with pytest.raises(ValueError, match=rf"tensor 'w' in {path}: its data_offsets \[8, 16\] "
                                       r"lie past the end of the data \(8 bytes\)"):
    st.read_header(path)


def test_shape_that_disagrees_with_its_byte_span(tmp_path):
  path = _raw(tmp_path / "m.safetensors",
              {"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}, bytes(16))
  with pytest.raises(ValueError, match=rf"tensor 'w' in {path}: shape \[3, 2\] of F32 is 24 "
                                       r"bytes, but its data_offsets \[0, 16\] span 16"):
    st.read_header(path)


def test_overlapping_spans(tmp_path):
  path = _raw(tmp_path / "m.safetensors",
              {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
               "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24))
  with pytest.raises(ValueError, match=f"tensor 'b' in {path}.*overlap.*tensor 'a'"):
    st.read_header(path)


def test_holes_and_trailing_bytes(tmp_path):
  path = _raw(tmp_path / "hole.safetensors",
              {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16))
  with pytest.raises(ValueError, match=f"tensor 'a' in {path}: 8 bytes before it belong to no"):
    st.read_header(path)
  path = _raw(tmp_path / "tail.safetensors",
              {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12))
  with pytest.raises(ValueError, match=f"{path}: 4 bytes after the last tensor"):
    st.read_header(path)


@pytest.mark.parametrize("header, match", [
    (b"{not json", "header is not valid JSON"),
    (b"\xff\xfe", "header is not valid JSON"),
    (b"[1, 2]", "header is a JSON list"),
    (b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "a": 1}',
     "'a' appears twice"),
    ({"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}},
     "tensor 'a' in .*dtype 'F8_E4M3' is not supported"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}},
     r"tensor 'a' in .*shape \[-1\] is not a list of sizes"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}},
     r"tensor 'a' in .*data_offsets \[4, 0\] are not"),
    ({"a": {"dtype": "F32", "shape": [1]}}, "tensor 'a' in .*header entry"),
])
def test_malformed_headers(tmp_path, header, match):
  path = _raw(tmp_path / "m.safetensors", header, b"")
  with pytest.raises(ValueError, match=match) as e:
    st.read_header(path)
  assert path in str(e.value)


@pytest.mark.parametrize("map_bytes", [st.MAP_BYTES, 0])  # read, and memory-mapped
def test_file_truncated_after_its_header_was_read(good, monkeypatch, map_bytes):
  monkeypatch.setattr(st, "MAP_BYTES", map_bytes)
  tensors = st.read_header(good)
  with open(good, "r+b") as f:
    f.truncate(tensors["c"].start + 1)
  with pytest.raises(ValueError, match=f"tensor 'c' in {good}: its data ends at byte"):
    st.read(tensors["c"])
