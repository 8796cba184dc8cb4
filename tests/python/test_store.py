"""The store through its C API (ctypes), on checkpoints written by the reference
safetensors library: every dtype lands byte for byte with its checksum, shares cover every
tensor once, and `ckpt-engine bench load` reports bytes that sum to the checkpoint."""
import ctypes
import json

import numpy as np
import pytest

from conftest import SANITIZED

safetensors_numpy = pytest.importorskip("safetensors.numpy")


class Meta(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * 256), ("dtype", ctypes.c_int32),
                ("ndim", ctypes.c_int32), ("shape", ctypes.c_int64 * 8),
                ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_uint64),
                ("checksum", ctypes.c_uint64), ("owner", ctypes.c_int32),
                ("reserved", ctypes.c_int32)]


class Stats(ctypes.Structure):
    _fields_ = [("bytes_local", ctypes.c_uint64), ("bytes_read", ctypes.c_uint64),
                ("bytes_io", ctypes.c_uint64), ("bytes_direct", ctypes.c_uint64),
                ("bytes_mapped", ctypes.c_uint64), ("seconds", ctypes.c_double),
                ("io_path", ctypes.c_char * 32)]


@pytest.fixture(scope="module")
def lib(build_dir):
    if SANITIZED:
        pytest.skip("ctypes cannot load the ASan-instrumented libckpt")
    path = build_dir / "src" / "libckpt.so"
    if not path.is_file():
        pytest.skip(f"no {path}")
    lib = ctypes.CDLL(str(path))
    lib.ckpt_last_error.restype = ctypes.c_char_p
    lib.ckpt_checksum.restype = ctypes.c_uint64
    lib.ckpt_checksum.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return lib


DTYPES = {"U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
          "F16": np.float16, "U32": np.uint32, "I32": np.int32, "F32": np.float32,
          "U64": np.uint64, "I64": np.int64, "F64": np.float64, "BOOL": np.bool_}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Two files: every numpy-expressible dtype, odd sizes, and a few MiB-sized tensors."""
    d = tmp_path_factory.mktemp("ckpt")
    rng = np.random.default_rng(1)
    tensors = {}
    for i, (name, dt) in enumerate(DTYPES.items()):
        shape = (3 + i, 7) if i % 2 else (1001 + i,)
        raw = rng.integers(0, 255, size=int(np.prod(shape)) * np.dtype(dt).itemsize, dtype=np.uint8)
        arr = raw.view(dt).reshape(shape) if dt is not np.bool_ else (raw % 2).astype(np.bool_).reshape(-1)[:int(np.prod(shape))].reshape(shape)
        tensors[f"t.{name.lower()}"] = arr
    for i in range(4):
        tensors[f"big.{i}"] = rng.standard_normal((512 + i, 1024)).astype(np.float32)
    names = sorted(tensors)
    half = len(names) // 2
    safetensors_numpy.save_file({k: tensors[k] for k in names[:half]}, str(d / "a.safetensors"))
    safetensors_numpy.save_file({k: tensors[k] for k in names[half:]}, str(d / "b.safetensors"))
    return d, tensors


def register(lib, path, rank, nranks, name=b"c"):
    store = ctypes.c_void_p()
    assert lib.ckpt_store_create(None, ctypes.byref(store)) == 0
    rc = lib.ckpt_store_register_files(store, name, str(path).encode(), rank, nranks)
    assert rc == 0, lib.ckpt_last_error()
    return store


def tensors_of(lib, store, name=b"c"):
    metas = ctypes.POINTER(Meta)()
    count = ctypes.c_size_t()
    assert lib.ckpt_store_tensors(store, name, ctypes.byref(metas), ctypes.byref(count)) == 0
    return [metas[i] for i in range(count.value)]


def test_every_dtype_lands(lib, checkpoint):
    d, tensors = checkpoint
    store = register(lib, d, 0, 1)
    metas = tensors_of(lib, store)
    assert [m.name.decode() for m in metas] == sorted(tensors)
    for i, m in enumerate(metas):
        want = np.ascontiguousarray(tensors[m.name.decode()]).tobytes()
        ptr = ctypes.c_void_p()
        assert lib.ckpt_store_tensor_data(store, b"c", ctypes.c_size_t(i), ctypes.byref(ptr)) == 0
        assert ctypes.string_at(ptr.value, m.nbytes) == want
        assert m.checksum == lib.ckpt_checksum(want, len(want))
        assert m.owner == 0 and m.offset % 256 == 0
    lib.ckpt_store_destroy(store)


def test_shares_read_every_byte_once(lib, checkpoint):
    d, tensors = checkpoint
    total = sum(np.ascontiguousarray(t).nbytes for t in tensors.values())
    read, owners = 0, {}
    for r in range(4):
        store = register(lib, d, r, 4)
        st = Stats()
        assert lib.ckpt_store_last_stats(store, ctypes.byref(st)) == 0
        read += st.bytes_read
        for m in tensors_of(lib, store):
            owners.setdefault(m.name, set()).add(m.owner)
        lib.ckpt_store_destroy(store)
    assert read == total
    assert all(len(o) == 1 for o in owners.values())  # every rank agrees on every owner


def test_bench_load_bytes_sum(run_tool, checkpoint):
    d, tensors = checkpoint
    total = sum(np.ascontiguousarray(t).nbytes for t in tensors.values())
    got = 0
    for r in range(2):
        out = run_tool("bench", "load", d, "--share", f"{r}/2", "--repeat", "1", "--json").stdout
        rep = json.loads(out)
        assert rep["total_bytes"] == total and rep["ratio"] > 0
        got += rep["bytes_read"]
    assert got == total
    assert run_tool("bench", "load", "--help").stdout.startswith("usage")
    assert run_tool("bench", "load", check=False).returncode == 2
