"""The ctypes declarations of the Python binding (python/ckpt_engine) against the C headers:
every ctypes.Structure of the package, its size, alignment and every field's name, offset,
size and kind, as tests/layout/ckpt_layout.c prints them from the real headers; the dtype
table and the constants the binding copies. A struct or field added on one side only
fails here, before a worker reads garbage through a shifted field."""
import ast
import ctypes
import importlib
import json
import subprocess
import sys

import pytest

from conftest import BUILD_DIR, SOURCE_DIR

PKG_DIR = SOURCE_DIR / "python" / "ckpt_engine"
sys.path.insert(0, str(PKG_DIR.parent))
from ckpt_engine import _lib, receiver  # noqa: E402

# "module.Class" of the package -> the C type it mirrors. A Structure missing here fails
# test_every_struct_has_a_c_counterpart: add it here and to tests/layout/ckpt_layout.c.
C_TYPES = {
    "_lib.TensorMeta": "ckpt_tensor_meta_t",
    "_lib.UpdateInfo": "ckpt_update_info_t",
    "_lib.TensorView": "ckpt_tensor_view_t",
    "_lib.NeedDecl": "ckpt_need_decl_t",
    "_lib.ParallelLayout": "ckpt_parallel_layout_t",
    "publish.PublishOptions": "ckpt_publish_options_t",
    "publish.PublishReply": "ckpt_publish_reply_t",
}
_CTYPES_BASES = {"Structure", "Union", "LittleEndianStructure", "BigEndianStructure"}


def _key(cls):
    return "%s.%s" % (cls.__module__.rsplit(".", 1)[-1], cls.__name__)

_SIGNED, _UNSIGNED = "bhilq", "BHILQ"


def _kind(t):
    """The kind ckpt_layout.c would print for a field of ctypes type t."""
    if issubclass(t, ctypes.Array):
        return "%s[%d]" % (_kind(t._type_), t._length_)
    if issubclass(t, ctypes.Structure):
        return C_TYPES.get(_key(t), "unmapped " + _key(t))
    if issubclass(t, ctypes._Pointer):
        return "ptr"
    code = getattr(t, "_type_", "")
    bits = ctypes.sizeof(t) * 8
    if code == "c":
        return "char"
    if code == "?":
        return "bool"
    if code in ("P", "z", "Z"):
        return "ptr"
    if code in ("f", "d"):
        return "f%d" % bits
    if code and code in _SIGNED:
        return "i%d" % bits
    if code and code in _UNSIGNED:
        return "u%d" % bits
    return "unknown ctypes type %r" % t


def _declared_structs():
    """"module.Class" of every ctypes struct or union the package's source declares. Read from
    the source rather than imported, so that a module needing more than the binding does
    (vllm.py imports vLLM) is still looked at."""
    found = set()
    for path in sorted(PKG_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                bases = {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "")
                         for b in node.bases}
                if bases & _CTYPES_BASES:
                    found.add("%s.%s" % (path.stem, node.name))
    return found


@pytest.fixture(scope="module")
def layout():
    exe = BUILD_DIR / "tests" / "ckpt-layout"
    # A missing helper fails: the comparison is the point of this file.
    assert exe.is_file(), (f"{exe} is missing: build the tree ({BUILD_DIR}) first, e.g. "
                           "`make build`, or point CKPT_BUILD_DIR at one that has it")
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


def test_every_struct_has_a_c_counterpart(layout):
    structs = _declared_structs()
    assert structs, f"no ctypes.Structure found in {PKG_DIR}: did the binding move?"
    unmapped = sorted(structs - set(C_TYPES))
    assert not unmapped, (f"ctypes structs {unmapped} of python/ckpt_engine have no C type "
                          "here: add them to C_TYPES and their fields to "
                          "tests/layout/ckpt_layout.c")
    stale = sorted(set(C_TYPES) - structs)
    assert not stale, f"C_TYPES names {stale}, which the package no longer declares: remove them"
    missing = sorted(c for c in C_TYPES.values() if c not in layout["structs"])
    assert not missing, f"tests/layout/ckpt_layout.c does not print {missing}: add them"


@pytest.mark.parametrize("py_name", sorted(C_TYPES))
def test_struct_layout(layout, py_name):
    module, cls_name = py_name.split(".")
    cls = getattr(importlib.import_module("ckpt_engine." + module), cls_name, None)
    if cls is None:
        pytest.fail(f"ckpt_engine.{py_name} is gone: remove it from C_TYPES")
    c_name = C_TYPES[py_name]
    c = layout["structs"].get(c_name)
    assert c is not None, f"tests/layout/ckpt_layout.c does not print {c_name}"
    py_fields = [(f, getattr(cls, f), typ) for f, typ, *_ in cls._fields_]
    py_names = [f[0] for f in py_fields]
    c_names = [f["name"] for f in c["fields"]]
    only_py = [n for n in py_names if n not in c_names]
    only_c = [n for n in c_names if n not in py_names]
    assert not only_py, (f"{py_name} fields {only_py} have no counterpart in {c_name} as "
                         "ckpt_layout.c prints it: add the C field to the helper, or drop "
                         "the ctypes one")
    assert not only_c, (f"{c_name} fields {only_c} are missing from {py_name}._fields_: "
                        "add them there")
    assert py_names == c_names, f"{py_name} declares its fields in another order than {c_name}"
    for (name, desc, typ), cf in zip(py_fields, c["fields"]):
        got = (desc.offset, desc.size, _kind(typ))
        want = (cf["offset"], cf["size"], cf["kind"])
        assert got == want, (f"{py_name}.{name}: ctypes (offset, size, kind) {got}, "
                             f"C {c_name}.{name} {want}")
    assert ctypes.sizeof(cls) == c["size"], (f"sizeof {py_name} {ctypes.sizeof(cls)}, "
                                             f"{c_name} {c['size']}")
    assert ctypes.alignment(cls) == c["align"], (f"alignment of {py_name} "
                                                 f"{ctypes.alignment(cls)}, {c_name} {c['align']}")


def test_dtypes_and_constants(layout):
    want = {name: tuple(v) for name, v in layout["dtypes"].items()}
    assert _lib.DTYPES == want, "_lib.DTYPES differs from CKPT_DTYPE_MAP in include/ckpt/ckpt.h"
    k = layout["constants"]
    assert (_lib.CKPT_NAME_MAX, _lib.CKPT_MAX_DIMS) == (k["CKPT_NAME_MAX"], k["CKPT_MAX_DIMS"])
    assert (receiver.EVENT_BUCKET, receiver.EVENT_FINISH, receiver.EVENT_ABORT) == \
        (k["CKPT_RECV_BUCKET"], k["CKPT_RECV_FINISH"], k["CKPT_RECV_ABORT"]), \
        "receiver.EVENT_* differ from CKPT_RECV_* in include/ckpt/receiver.h"


def test_kind_mapping_catches_a_wrong_type():
    """The comparison itself: a signedness or width slip would be reported."""
    assert _kind(ctypes.c_uint32) != _kind(ctypes.c_int32)
    assert _kind(ctypes.c_int64) == _kind(ctypes.c_longlong) == "i64"
    assert _kind(ctypes.c_char * 4) == "char[4]"
    assert _kind(ctypes.c_void_p) == "ptr"
