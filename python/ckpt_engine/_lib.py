"""Loads libckpt.so and declares the C API this package uses (ctypes, no compiler needed).

Where the library is found, first match wins:
  1. $CKPT_LIB, a path: an explicit choice (a sanitizer or debug build) beats everything.
  2. libckpt.so in the package: what `pip install .` puts beside this file (`pip install
     -e .` in the package's other directory, site-packages). It was built from the same
     source as these ctypes declarations, so it wins over any build tree a stray
     $CKPT_BUILD_DIR names. A source checkout has none, so the tests, which import
     python/ckpt_engine and set $CKPT_BUILD_DIR, keep using their tree's library.
  3. $CKPT_BUILD_DIR/src: the build tree under test.
  4. build/release/src of the checkout this file is in (`make build`).
  5. The system loader's path (`make install` into a prefix the loader searches).
"""
import ctypes
import ctypes.util
import os
import sys

CKPT_NAME_MAX = 256
CKPT_MAX_DIMS = 8

# ckpt_dtype_t values (include/ckpt/ckpt.h): name -> (value, element size)
DTYPES = {
    "BOOL": (1, 1), "U8": (2, 1), "I8": (3, 1), "U16": (4, 2), "I16": (5, 2), "F16": (6, 2),
    "BF16": (7, 2), "U32": (8, 4), "I32": (9, 4), "F32": (10, 4), "U64": (11, 8),
    "I64": (12, 8), "F64": (13, 8), "F8_E4M3": (14, 1), "F8_E5M2": (15, 1),
    "F8_E8M0": (16, 1), "C64": (17, 8),
}
DTYPE_NAMES = {v[0]: k for k, v in DTYPES.items()}


class TensorMeta(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char * CKPT_NAME_MAX),
        ("dtype", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("shape", ctypes.c_int64 * CKPT_MAX_DIMS),
        ("nbytes", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("checksum", ctypes.c_uint64),
        ("owner", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
    ]


class UpdateInfo(ctypes.Structure):
    _fields_ = [
        ("update_id", ctypes.c_uint64),
        ("version", ctypes.c_uint64),
        ("name", ctypes.c_char * CKPT_NAME_MAX),
        ("nbuckets", ctypes.c_uint32),
        ("verify", ctypes.c_int32),
        ("stable", ctypes.c_int32),
        ("partial", ctypes.c_int32),
        ("manifest_count", ctypes.c_uint32),
    ]


class NeedDecl(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char * CKPT_NAME_MAX),
        ("dim", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("start", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
    ]


class ParallelLayout(ctypes.Structure):
    _fields_ = [
        ("tp", ctypes.c_int32),
        ("pp", ctypes.c_int32),
        ("ep", ctypes.c_int32),
        ("num_layers", ctypes.c_int32),
        ("num_experts", ctypes.c_int32),
        ("kv_heads", ctypes.c_int32),
    ]


class TensorView(ctypes.Structure):
    _fields_ = [("meta", TensorMeta), ("data", ctypes.c_void_p), ("part_dim", ctypes.c_int32),
                ("memory", ctypes.c_int32), ("part_start", ctypes.c_uint64),
                ("part_full", ctypes.c_int64)]


def _candidates():
    if os.environ.get("CKPT_LIB"):
        yield os.environ["CKPT_LIB"]
    here = os.path.dirname(os.path.abspath(__file__))
    package = sys.modules.get(__name__.rpartition(".")[0])
    for d in [*getattr(package, "__path__", []), here]:
        packaged = os.path.join(d, "libckpt.so")
        if os.path.exists(packaged):
            yield packaged
    builds = [os.environ.get("CKPT_BUILD_DIR"), os.path.join(here, "..", "..", "build", "release")]
    for b in builds:
        if b:
            yield os.path.join(b, "src", "libckpt.so")
    found = ctypes.util.find_library("ckpt")
    if found:
        yield found


def load():
    errors = []
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
            break
        except OSError as e:
            errors.append("%s: %s" % (path, e))
    else:
        raise OSError("libckpt.so not found: install the package with `pip install .` from "
                      "the ckpt-engine checkout, or build it with `make build` and set "
                      "CKPT_BUILD_DIR (or CKPT_LIB to the library's path). Tried: "
                      + "; ".join(errors))
    p, c_int, u64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64
    sig = {
        "ckpt_strerror": ([c_int], ctypes.c_char_p),
        "ckpt_last_error": ([], ctypes.c_char_p),
        "ckpt_checksum": ([p, ctypes.c_size_t], u64),
        "ckpt_receiver_connect": ([ctypes.c_char_p, c_int, ctypes.POINTER(p)], c_int),
        "ckpt_receiver_close": ([p], None),
        "ckpt_receiver_wait_update": ([p, c_int, ctypes.POINTER(UpdateInfo)], c_int),
        "ckpt_receiver_next": ([p, c_int, ctypes.POINTER(c_int), ctypes.POINTER(ctypes.c_uint32),
                                ctypes.POINTER(ctypes.POINTER(TensorView)),
                                ctypes.POINTER(ctypes.c_size_t)], c_int),
        "ckpt_receiver_verify": ([ctypes.POINTER(TensorView)], c_int),
        "ckpt_receiver_copy": ([ctypes.POINTER(TensorView), u64, p, u64, c_int], c_int),
        "ckpt_receiver_copy_slice": ([ctypes.POINTER(TensorView), c_int, u64, u64, p],
                                     ctypes.c_int64),
        "ckpt_receiver_ack": ([p], c_int),
        "ckpt_receiver_fail": ([p, ctypes.c_char_p], c_int),
        "ckpt_receiver_finish_reply": ([p, c_int, ctypes.c_char_p], c_int),
        "ckpt_receiver_finish_reply_timeout": ([p, c_int, ctypes.c_char_p, c_int], c_int),
        "ckpt_receiver_state": ([p, ctypes.POINTER(c_int), ctypes.POINTER(u64),
                                 ctypes.POINTER(u64)], c_int),
        "ckpt_receiver_set_model": ([p, ctypes.POINTER(TensorMeta), ctypes.c_size_t], c_int),
        "ckpt_receiver_declare_need": ([p, ctypes.POINTER(NeedDecl), ctypes.c_size_t], c_int),
        "ckpt_tensor_meta_init": ([ctypes.POINTER(TensorMeta), ctypes.c_char_p, c_int,
                                   ctypes.POINTER(ctypes.c_int64), c_int], c_int),
        "ckpt_layout_need": ([ctypes.POINTER(ParallelLayout), c_int, ctypes.POINTER(TensorMeta),
                              ctypes.POINTER(c_int), ctypes.POINTER(NeedDecl)], c_int),
        "ckpt_receiver_last_update": ([p, ctypes.POINTER(UpdateInfo), ctypes.POINTER(c_int)],
                                      c_int),
        "ckpt_receiver_reason": ([p], ctypes.c_char_p),
        # publishing (include/ckpt/publish.h); options and reply structs: publish.py
        "ckpt_publish_begin": ([ctypes.c_char_p, ctypes.POINTER(TensorMeta), ctypes.c_size_t,
                                ctypes.POINTER(p)], c_int),
        "ckpt_publish_begin_pull": ([ctypes.c_char_p, ctypes.POINTER(TensorMeta),
                                     ctypes.c_size_t, ctypes.POINTER(p)], c_int),
        "ckpt_publish_set_source": ([p, ctypes.c_size_t, p], c_int),
        "ckpt_publish_tensor_ptr": ([p, ctypes.c_size_t], p),
        "ckpt_publish_size": ([p], u64),
        "ckpt_publish_seal": ([p], c_int),
        "ckpt_publish_send": ([p, ctypes.c_char_p, p, p], c_int),
        "ckpt_publish_free": ([p], None),
    }
    for name, (args, res) in sig.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = res
    return lib
