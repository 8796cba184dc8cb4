"""Publishing from a trainer (include/ckpt/publish.h, docs/PUBLISH.md): hand in-memory
tensors to the engine rank on this host, no files, one copy (into shared memory).

    from ckpt_engine import publish
    publish("policy", {"w": np_array, "b": torch_tensor}, socket_dir="/tmp/s", step=7)

The tensors are copied once into a memfd laid out as a safetensors file (CUDA tensors
straight from the GPU into it), which is then sealed and passed to the engine rank over
its Unix socket; the engine adopts it in place. Several trainer ranks may publish disjoint
parts of one checkpoint (part=k, parts=n); it is registered when every part is in.
"""
import ctypes
import os
import re
from dataclasses import dataclass

import numpy as np

from . import _lib
from .receiver import CkptError, lib

# numpy dtype names -> safetensors dtypes (bfloat16/float8 come from ml_dtypes, if used).
_NUMPY_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16",
    "float16": "F16", "uint32": "U32", "int32": "I32", "float32": "F32", "uint64": "U64",
    "int64": "I64", "float64": "F64", "complex64": "C64", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e8m0fnu": "F8_E8M0",
}
# torch dtype attribute names -> safetensors dtypes (looked up only when torch is used).
_TORCH_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "float16": "F16",
    "bfloat16": "BF16", "int32": "I32", "float32": "F32", "int64": "I64", "float64": "F64",
    "complex64": "C64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e8m0fnu": "F8_E8M0", "uint16": "U16", "uint32": "U32", "uint64": "U64",
}


class PublishOptions(ctypes.Structure):
    """ckpt_publish_options_t"""
    _fields_ = [("field_mask", ctypes.c_uint64), ("part", ctypes.c_uint32),
                ("nparts", ctypes.c_uint32), ("step", ctypes.c_uint64), ("wait", ctypes.c_int),
                ("timeout_ms", ctypes.c_int)]


class PublishReply(ctypes.Structure):
    """ckpt_publish_reply_t"""
    _fields_ = [("status", ctypes.c_int), ("registered", ctypes.c_int),
                ("version", ctypes.c_uint64), ("text", ctypes.c_char * 1024)]


@dataclass
class PublishResult:
    registered: bool   # the checkpoint is registered (wait=True), else the part is pending
    version: int       # the version it was registered as (0 while pending)
    text: str          # the engine's answer
    socket: str        # the engine rank's socket it went to


def _is_torch(t):
    return type(t).__module__.split(".")[0] == "torch"


def _torch_dtype_name(torch, dtype):
    for attr, st in _TORCH_DTYPES.items():
        if getattr(torch, attr, None) == dtype:
            return st
    raise TypeError("publish: torch dtype %s has no safetensors equivalent" % dtype)


def _describe(name, value):
    """(safetensors dtype, shape, source) of one tensor; source is a numpy array or a
    torch tensor. A (array, "BF16") tuple publishes the array's bytes as that dtype (raw
    bf16/fp8 bits held in uint16/uint8 arrays)."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
        arr, dt = value
        if dt not in _lib.DTYPES:
            raise ValueError("publish: tensor %r: unknown dtype %r (one of %s)" %
                             (name, dt, ", ".join(sorted(_lib.DTYPES))))
        arr = np.asarray(arr)
        if arr.dtype.itemsize != _lib.DTYPES[dt][1]:
            raise ValueError("publish: tensor %r: %s elements are %d bytes, the array's %d" %
                             (name, dt, _lib.DTYPES[dt][1], arr.dtype.itemsize))
        return dt, tuple(arr.shape), arr
    if _is_torch(value):
        import torch  # only when the caller passes torch tensors
        return _torch_dtype_name(torch, value.dtype), tuple(value.shape), value.detach()
    arr = np.asarray(value)
    dt = _NUMPY_DTYPES.get(arr.dtype.name)
    if dt is None:
        raise TypeError("publish: tensor %r: numpy dtype %s has no safetensors equivalent "
                        "(pass (array, 'BF16') for raw bits)" % (name, arr.dtype))
    return dt, tuple(arr.shape), arr


def _copy_into(ptr, nbytes, shape, src):
    """The one copy: src (numpy, or torch on any device) into the memfd's bytes."""
    buf = (ctypes.c_uint8 * nbytes).from_address(ptr)
    if _is_torch(src):
        import torch
        dst = torch.frombuffer(buf, dtype=torch.uint8).view(src.dtype).reshape(shape)
        dst.copy_(src)  # a CUDA tensor is copied from the GPU straight into shared memory
    else:
        dst = np.frombuffer(buf, dtype=np.uint8).view(src.dtype).reshape(shape)
        np.copyto(dst, src, casting="no")
    del dst, buf  # no view may outlive the mapping (sealing unmaps it)


def socket_path(socket_dir, rank=None, part=0):
    """DIR/publish-<rank>.sock; rank None picks among the sockets present in DIR by part
    (part k goes to the k-th rank modulo their number), so parts spread over the ranks."""
    if rank is not None:
        return os.path.join(socket_dir, "publish-%d.sock" % rank)
    try:
        names = os.listdir(socket_dir)
    except OSError as e:
        raise FileNotFoundError("publish: cannot list %s (%s): start `ckpt-engine serve "
                                "--socket-dir %s` on this host" % (socket_dir, e, socket_dir))
    ranks = sorted(int(m.group(1)) for m in
                   (re.match(r"publish-(\d+)\.sock$", n) for n in names) if m)
    if not ranks:
        raise FileNotFoundError("publish: no publish-<rank>.sock in %s: is `ckpt-engine serve "
                                "--socket-dir %s` running on this host?" % (socket_dir, socket_dir))
    return os.path.join(socket_dir, "publish-%d.sock" % ranks[part % len(ranks)])


def _host_source(src):
    """(address, keep-alive object) of a CPU tensor's bytes, contiguous; None for a CUDA
    tensor (the engine cannot read GPU memory)."""
    if _is_torch(src):
        if src.device.type != "cpu":
            return None
        c = src.contiguous()
        return c.data_ptr(), c
    c = np.ascontiguousarray(src)
    return c.ctypes.data, c


# Engine sockets that refused to read this process's memory (another pid namespace, a
# ptrace restriction): auto mode publishes through a sealed memfd there from then on.
_NO_PULL = set()
_NO_PULL_MARK = "publish without pull"  # the engine's refusals that say pull cannot work


def publish(name, tensors, socket_dir=None, rank=None, part=0, parts=1, step=0, wait=True,
            timeout_s=60.0, pull=None):
    """Publishes `tensors` ({name: numpy array | torch tensor | (array, dtype name)}) as
    part `part` of `parts` of checkpoint `name` to the engine rank on this host.

    socket_dir: the engine's --socket-dir (default $CKPT_SOCKET_DIR). rank: the engine rank
    (default: chosen from the sockets present by part). step: the training step (a newer
    step replaces a pending older one). wait: return once the checkpoint is registered
    (every part in), else once this part is accepted. Raises CkptError with the engine's
    reason when refused (overlapping parts name the tensor, missing parts their index).

    pull: True: the engine rank reads the tensors straight from this process's memory
    into shared memory it reuses from step to step (no new pages per step: the fast path
    of an RL loop; docs/PUBLISH.md); the tensors must not change until publish() returns.
    False: the tensors are copied into a new sealed memfd that the engine adopts. None (the
    default): pull when every tensor is in host memory, and fall back to the memfd (with a
    warning, and for that engine socket from then on) when the engine says it cannot read
    this process (another pid namespace, a ptrace restriction). CUDA tensors always go
    through the memfd."""
    socket_dir = socket_dir or os.environ.get("CKPT_SOCKET_DIR")
    if not socket_dir:
        raise ValueError("publish: pass socket_dir (the engine's --socket-dir) or set "
                         "CKPT_SOCKET_DIR")
    path = socket_path(socket_dir, rank, part)
    items = [(str(k),) + _describe(k, v) for k, v in tensors.items()]
    metas = (_lib.TensorMeta * max(len(items), 1))()
    for i, (tname, dt, shape, _) in enumerate(items):
        if len(shape) > _lib.CKPT_MAX_DIMS:
            raise ValueError("publish: tensor %r has %d dimensions, at most %d" %
                             (tname, len(shape), _lib.CKPT_MAX_DIMS))
        metas[i].name = tname.encode()
        metas[i].dtype = _lib.DTYPES[dt][0]
        metas[i].ndim = len(shape)
        for d, n in enumerate(shape):
            metas[i].shape[d] = n
    auto = pull is None
    if auto:
        pull = path not in _NO_PULL
    sources = [_host_source(it[3]) for it in items] if pull else []
    pull = pull and all(s is not None for s in sources)
    opts = PublishOptions(0, part, parts, step, 1 if wait else 0, int(timeout_s * 1000))
    try:
        return _publish_once(name, metas, items, sources, pull, path, opts)
    except CkptError as e:
        if not (auto and pull and _NO_PULL_MARK in str(e)):
            raise
        import warnings
        warnings.warn("publish: the engine on %s cannot read this process's memory (%s); "
                      "publishing through a sealed memfd instead (slower: new pages every "
                      "step)" % (path, e))
        _NO_PULL.add(path)
        return _publish_once(name, metas, items, [], False, path, opts)


def _publish_once(name, metas, items, sources, pull, path, opts):
    part, parts = opts.part, opts.nparts
    L = lib()
    pub = ctypes.c_void_p()
    begin = L.ckpt_publish_begin_pull if pull else L.ckpt_publish_begin
    rc = begin(name.encode(), metas, len(items), ctypes.byref(pub))
    if rc < 0:
        raise CkptError(rc, "publish %r" % name)
    try:
        for i, (tname, dt, shape, src) in enumerate(items):
            nbytes = int(np.prod(shape, dtype=np.int64)) * _lib.DTYPES[dt][1]
            if pull:
                rc = L.ckpt_publish_set_source(pub, i, sources[i][0] if nbytes else None)
                if rc < 0:
                    raise CkptError(rc, "publish %r: tensor %r" % (name, tname))
            elif nbytes:
                _copy_into(L.ckpt_publish_tensor_ptr(pub, i), nbytes, shape, src)
        reply = PublishReply()
        rc = L.ckpt_publish_send(pub, path.encode(), ctypes.byref(opts), ctypes.byref(reply))
        if rc < 0:
            raise CkptError(rc, "publish %r part %d/%d to %s" % (name, part, parts, path))
        return PublishResult(bool(reply.registered), reply.version,
                             reply.text.decode(errors="replace"), path)
    finally:
        L.ckpt_publish_free(pub)
