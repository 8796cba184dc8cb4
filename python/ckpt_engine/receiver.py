"""The receiver API (include/ckpt/receiver.h) as Python objects."""
import ctypes
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import _lib

_LIB = None

EVENT_BUCKET, EVENT_FINISH, EVENT_ABORT = 1, 2, 3
EINVAL, EPEER, EBUSY, EPERM = -1, -8, -12, -13  # CKPT_E* codes (include/ckpt/ckpt.h)

# numpy views of safetensors dtypes; those numpy lacks are raw unsigned ints of the width.
_NUMPY = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
          "F16": np.float16, "BF16": np.uint16, "U32": np.uint32, "I32": np.int32,
          "F32": np.float32, "U64": np.uint64, "I64": np.int64, "F64": np.float64,
          "F8_E4M3": np.uint8, "F8_E5M2": np.uint8, "F8_E8M0": np.uint8, "C64": np.complex64}


# Where a view's bytes lie (CKPT_MEMORY_* in include/ckpt/receiver.h).
MEMORY_NAMES = {0: "host", 1: "cuda", 2: "sim"}

# torch dtypes of safetensors names (torch is imported only by the methods that use it).
_TORCH = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
          "F16": "float16", "BF16": "bfloat16", "U32": "uint32", "I32": "int32",
          "F32": "float32", "U64": "uint64", "I64": "int64", "F64": "float64",
          "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
          "C64": "complex64"}


def torch_dtype(torch, st_dtype):
    """The torch dtype of a safetensors dtype name; raw bytes of its width if torch lacks it."""
    dt = getattr(torch, _TORCH.get(st_dtype, ""), None)
    if dt is None:
        dt = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
            _lib.DTYPES[st_dtype][1]]
    return dt


class _CudaBytes:
    """Device bytes as __cuda_array_interface__ (version 3), for torch.as_tensor: a zero-copy
    tensor over memory that another process's engine rank handed by CUDA IPC handle."""

    def __init__(self, ptr, nbytes):
        # Read-only by contract (TensorView.torch); flagged writable so that no consumer
        # refuses or copies it: torch has no read-only CUDA tensors either way.
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (ptr, False), "version": 3, "strides": None}


def _is_torch(t):
    return type(t).__module__.startswith("torch")


def lib():
    global _LIB
    if _LIB is None:
        _LIB = _lib.load()
    return _LIB


class CkptError(RuntimeError):
    """A failing ckpt call: .status is the CKPT_E* code, the message names the cause."""

    def __init__(self, status, what):
        self.status = status
        detail = lib().ckpt_last_error().decode(errors="replace")
        super().__init__("%s: %s (%s)" % (what, detail or lib().ckpt_strerror(status).decode(),
                                          status))


def _check(rc, what):
    if rc < 0:
        raise CkptError(rc, what)
    return rc


class TensorView:
    """One tensor of a bucket, pointing into the shared buffer (no copy)."""

    def __init__(self, view_ptr):
        self._ptr = view_ptr
        m = view_ptr.contents.meta
        self.name = m.name.decode()
        self.dtype = _lib.DTYPE_NAMES.get(m.dtype, "INVALID")
        self.shape = tuple(m.shape[i] for i in range(m.ndim))
        self.nbytes = m.nbytes
        self.checksum = m.checksum
        # A part (the engine cut the tensor for the hosts that need its slices): indices
        # [part_start, part_start + shape[part_dim]) of dimension part_dim, out of
        # part_full; shape and nbytes are the part's. None for a whole tensor.
        v = view_ptr.contents
        self.part = (v.part_dim, v.part_start, v.part_full) if v.part_dim >= 0 else None
        # "host", "cuda" (a device pointer on the GPU current at BEGIN: use torch()) or
        # "sim" (the engine's --device sim: host memory standing in for a GPU's).
        self.memory = MEMORY_NAMES.get(v.memory, "host")

    def torch(self):
        """A zero-copy torch tensor over the bytes, with the tensor's dtype and shape: on the
        GPU for CUDA memory (through __cuda_array_interface__), else on the CPU. Read-only
        by contract and valid until the bucket's answer. Imports torch."""
        import torch
        data, n = self._ptr.contents.data, self.nbytes
        if n == 0:
            raw = torch.empty(0, dtype=torch.uint8,
                              device="cuda" if self.memory == "cuda" else "cpu")
        elif self.memory == "cuda":
            raw = torch.as_tensor(_CudaBytes(data, n), device="cuda")
        else:  # a writable ctypes type over read-only pages: torch never writes it
            raw = torch.frombuffer((ctypes.c_char * n).from_address(data), dtype=torch.uint8)
        return raw.view(torch_dtype(torch, self.dtype)).reshape(self.shape)

    def numpy(self):
        """A read-only numpy array over the shared bytes (valid until the bucket's answer);
        host memory only (a CUDA view: torch(), or copy_to a host array)."""
        if self.memory == "cuda":
            raise ValueError("%s: the bytes are in GPU memory: use torch() or copy_to" % self.name)
        data = self._ptr.contents.data
        buf = (ctypes.c_char * self.nbytes).from_address(data) if self.nbytes else b""
        arr = np.frombuffer(buf, dtype=_NUMPY[self.dtype]).reshape(self.shape)
        arr.flags.writeable = False
        return arr

    def copy_to(self, dst, offset=0, verify=False):
        """Copies bytes [offset, offset + dst.nbytes) of the tensor into the contiguous
        numpy array or torch tensor dst; with verify, checks the whole tensor's XXH3-64 (in
        the same pass on the host; a CUDA view is hashed on a host copy, which costs a
        device-to-host copy of the tensor). A torch copy out of GPU memory is queued on the
        current stream: synchronize before answering the bucket (apply_update does)."""
        if _is_torch(dst):
            if verify and self.checksum:
                _check(lib().ckpt_receiver_verify(self._ptr), "verify of '%s'" % self.name)
            if not dst.is_contiguous():
                raise ValueError("%s: destination must be a contiguous tensor" % self.name)
            import torch
            src = self.torch().reshape(-1).view(torch.uint8)[offset:offset + _nbytes(dst)]
            dst.view(-1).view(torch.uint8).copy_(src, non_blocking=True)
            return
        if not dst.flags.c_contiguous or not dst.flags.writeable:
            raise ValueError("%s: destination must be a writable C-contiguous array" % self.name)
        _check(lib().ckpt_receiver_copy(self._ptr, offset, dst.ctypes.data, dst.nbytes,
                                        1 if verify else 0), "copy of '%s'" % self.name)


    def copy_slice(self, dst, dim, start):
        """Copies what this view holds of indices [start, start + dst.shape[dim]) of
        dimension dim of the tensor into dst (a worker's shard, C-contiguous, with the
        tensor's dtype), whether the view is the whole tensor or a part of it; returns how
        many indices along dim were copied (0 when the part lies elsewhere)."""
        if not dst.flags.c_contiguous or not dst.flags.writeable:
            raise ValueError("%s: destination must be a writable C-contiguous array" % self.name)
        if dst.dtype != _NUMPY[self.dtype] or dst.ndim != len(self.shape):
            raise ValueError("%s: destination is %s %s, the tensor %s with %d dims" % (
                self.name, dst.dtype, dst.shape, self.dtype, len(self.shape)))
        n = lib().ckpt_receiver_copy_slice(self._ptr, dim, start, dst.shape[dim],
                                           dst.ctypes.data)
        return _check(n, "copy of a slice of '%s'" % self.name)

    def copy_into_part(self, dst):
        """A part (self.part) into its place in dst, the whole tensor (a contiguous torch
        tensor or numpy array of the tensor's bytes)."""
        dim, start, full = self.part
        shape = list(self.shape)
        shape[dim] = full
        whole = self.nbytes // max(self.shape[dim], 1) * full
        if _nbytes(dst) != whole:
            raise ValueError("tensor '%s': model has %d bytes, update has %d" % (
                self.name, _nbytes(dst), whole))
        if _is_torch(dst):
            import torch
            if not dst.is_contiguous():
                raise ValueError("%s: destination must be a contiguous tensor" % self.name)
            tdt = torch_dtype(torch, self.dtype)
            place = dst.view(-1).view(torch.uint8).view(tdt).reshape(shape)
            place.narrow(dim, start, self.shape[dim]).copy_(self.torch(), non_blocking=True)
            return
        if not dst.flags.c_contiguous or not dst.flags.writeable:
            raise ValueError("%s: destination must be a writable C-contiguous array" % self.name)
        self.copy_slice(dst.reshape(-1).view(np.uint8).view(_NUMPY[self.dtype]).reshape(shape),
                        dim, 0)


def _nbytes(t):
    """Bytes of a numpy array or a torch tensor."""
    return t.numel() * t.element_size() if _is_torch(t) else t.nbytes


def layout_needs(model, tp=1, pp=1, ep=1, rank=0, num_layers=0, num_experts=0, kv_heads=0):
    """What worker `rank` (stage * tp + tp rank) of an instance with this TP/PP/EP layout
    needs of each tensor of `model` ({name: (dtype, shape)}, safetensors dtype names), as
    vLLM shards a transformer (include/ckpt/layout.h): {name: None (whole) or (dim, start,
    length)} for the tensors it needs, ready for Receiver.declare_need."""
    lay = _lib.ParallelLayout(tp, pp, ep, num_layers, num_experts, kv_heads)
    meta, decl, needed = _lib.TensorMeta(), _lib.NeedDecl(), ctypes.c_int()
    out = {}
    for name, (dtype, shape) in model.items():
        if dtype not in _lib.DTYPES:
            raise ValueError("tensor '%s': unknown dtype %r" % (name, dtype))
        shape_arr = (ctypes.c_int64 * _lib.CKPT_MAX_DIMS)(*shape)
        _check(lib().ckpt_tensor_meta_init(ctypes.byref(meta), name.encode(),
                                           _lib.DTYPES[dtype][0], shape_arr, len(shape)),
               "tensor '%s'" % name)
        _check(lib().ckpt_layout_need(ctypes.byref(lay), rank, ctypes.byref(meta),
                                      ctypes.byref(needed), ctypes.byref(decl)), "layout_needs")
        if needed.value:
            out[name] = None if decl.dim < 0 else (decl.dim, decl.start, decl.length)
    return out


@dataclass
class UpdateResult:
    update_id: int
    name: str
    version: int
    completed: bool
    reason: str
    tensors: int
    seconds: float = 0.0  # from BEGIN (buffers mapped) to the engine's decision


class Receiver:
    """A connection to one engine rank's worker socket."""

    def __init__(self, handle):
        self._h = handle

    @classmethod
    def connect(cls, socket_path, timeout_ms=-1):
        """Connects to the engine rank's socket, retrying while it is not there (not started
        yet, or restarting): by default forever (timeout_ms < 0), logging a line after 1 s
        and once a minute. Bound it (timeout_ms >= 0) where the caller is itself inside an
        update, as the vLLM extension is."""
        h = ctypes.c_void_p()
        _check(lib().ckpt_receiver_connect(socket_path.encode(), timeout_ms, ctypes.byref(h)),
               "connect to %s" % socket_path)
        return cls(h)

    def close(self):
        if self._h:
            lib().ckpt_receiver_close(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def wait_update(self, timeout_ms=-1):
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            # GPU buffers open on torch's current device, whichever CUDA runtime libckpt loaded
            os.environ["CKPT_CUDA_DEVICE"] = str(torch.cuda.current_device())
        info = _lib.UpdateInfo()
        _check(lib().ckpt_receiver_wait_update(self._h, timeout_ms, ctypes.byref(info)),
               "waiting for an update")
        return info

    def next(self, timeout_ms=30000):
        """(event, bucket, [TensorView]) with event 'bucket', 'finish' or 'abort'."""
        ev, b = ctypes.c_int(), ctypes.c_uint32()
        views, n = ctypes.POINTER(_lib.TensorView)(), ctypes.c_size_t()
        _check(lib().ckpt_receiver_next(self._h, timeout_ms, ctypes.byref(ev), ctypes.byref(b),
                                        ctypes.byref(views), ctypes.byref(n)), "next event")
        kind = {EVENT_BUCKET: "bucket", EVENT_FINISH: "finish", EVENT_ABORT: "abort"}[ev.value]
        tensors = [TensorView(ctypes.pointer(views[i])) for i in range(n.value)]
        return kind, b.value, tensors

    def ack(self):
        _check(lib().ckpt_receiver_ack(self._h), "ack")

    def fail(self, message):
        _check(lib().ckpt_receiver_fail(self._h, message.encode()), "fail")

    def finish_reply(self, ok=True, message=None):
        """Answers FINISH and waits for the engine's decision: returns normally on COMMIT
        (the update is complete); raises CkptError (CKPT_ECANCELED) on ABORT, on ok=False
        or a lost engine: the update is incomplete (state() says since which version)."""
        _check(lib().ckpt_receiver_finish_reply(self._h, 1 if ok else 0,
                                                message.encode() if message else None),
               "finish reply")

    def set_model(self, model):
        """Declares the tensors this worker holds, so that every update's manifest is checked
        against them before a byte lands (include/ckpt/receiver.h): an update that misses
        some of them, or names others, is refused naming them, unless the engine marked it
        partial. `model`: {name: numpy array} (compared by size in bytes: numpy has no
        bfloat16 or fp8) or {name: (dtype, shape)} with safetensors dtype names ("BF16",
        "F32", ...) for an exact check; {} clears it."""
        metas = (_lib.TensorMeta * max(len(model), 1))()
        for i, (name, spec) in enumerate(model.items()):
            m = metas[i]
            raw = name.encode()
            if len(raw) >= _lib.CKPT_NAME_MAX:
                raise ValueError("tensor name too long: %r" % name)
            m.name = raw
            if isinstance(spec, np.ndarray) or _is_torch(spec):
                m.dtype, m.ndim, m.nbytes = 0, -1, _nbytes(spec)
            else:
                dtype, shape = spec
                if dtype not in _lib.DTYPES:
                    raise ValueError("tensor '%s': unknown dtype %r" % (name, dtype))
                if len(shape) > _lib.CKPT_MAX_DIMS:
                    raise ValueError("tensor '%s': %d dims" % (name, len(shape)))
                m.dtype, m.ndim = _lib.DTYPES[dtype][0], len(shape)
                for d, n in enumerate(shape):
                    m.shape[d] = n
        _check(lib().ckpt_receiver_set_model(self._h, metas, len(model)), "set_model")

    def declare_need(self, needs):
        """Tells the engine which tensors this worker needs, between updates (protocol
        version 4, include/ckpt/receiver.h): from the next update on it sends only those,
        and a tensor that no worker needs fails the update unless it asks unneeded=ignore.
        `needs`: {name: None} for a whole tensor, {name: (dim, start, length)} for a slice
        (rows of dim 0, columns of dim 1, ...); {} declares that it needs nothing."""
        decls = (_lib.NeedDecl * max(len(needs), 1))()
        for i, (name, part) in enumerate(needs.items()):
            raw = name.encode()
            if len(raw) >= _lib.CKPT_NAME_MAX:
                raise ValueError("tensor name too long: %r" % name)
            decls[i].name = raw
            if part is None:
                decls[i].dim = -1
            else:
                decls[i].dim, decls[i].start, decls[i].length = part
        _check(lib().ckpt_receiver_declare_need(self._h, decls, len(needs)), "declare_need")

    STATES = {0: "none", 1: "updating", 2: "consistent", 3: "incomplete"}

    def state(self):
        """(state, version, update_id): 'consistent' at version V, 'incomplete' since V
        (the last consistent version, 0: none), 'updating' or 'none'. Serve only when
        'consistent'."""
        st, ver, uid = ctypes.c_int(), ctypes.c_uint64(), ctypes.c_uint64()
        _check(lib().ckpt_receiver_state(self._h, ctypes.byref(st), ctypes.byref(ver),
                                         ctypes.byref(uid)), "state")
        return self.STATES.get(st.value, "?"), ver.value, uid.value

    def apply_update(self, params, verify=None, post_hook=None, timeout_ms=-1,
                     check_model=True):
        """Runs one whole update into `params` ({name: writable numpy array, or contiguous
        torch tensor on the CPU or a GPU, holding the tensor's bytes}). From a GPU engine
        rank (CUDA views) torch tensors on that GPU are filled device to device, and the
        copies are waited for before each bucket is answered. With check_model (the default) params are the model (set_model):
        an update that does not cover every one of them, or names others, is refused
        before a byte lands, unless it is partial, so params never end up half old and
        half new. Unknown names or size mismatches in a bucket fail it. Returns an
        UpdateResult; completed is False when the engine aborted the update."""
        if check_model:
            self.set_model(params)
        try:
            info = self.wait_update(timeout_ms)
        except CkptError as e:
            if e.status != EINVAL:
                raise
            # The update's manifest does not match params: refused before any byte landed
            # (the engine fails the update); params are as they were, the connection lives.
            return UpdateResult(0, "", 0, False, str(e), 0)
        check = bool(info.verify) if verify is None else verify
        count = 0
        began = time.monotonic()
        while True:
            kind, bucket, views = self.next()
            if kind == "bucket":
                try:
                    on_gpu = False
                    for v in views:
                        dst = params.get(v.name)
                        if dst is None:
                            raise KeyError("unknown tensor '%s'" % v.name)
                        on_gpu = on_gpu or (v.memory == "cuda" and _is_torch(dst))
                        if v.part is not None:  # a part of the tensor: into its place
                            v.copy_into_part(dst)
                            count += 1
                            continue
                        if _nbytes(dst) != v.nbytes:
                            raise ValueError("tensor '%s': model has %d bytes, update has %d"
                                             % (v.name, _nbytes(dst), v.nbytes))
                        v.copy_to(dst, verify=check)
                        count += 1
                    if on_gpu:  # the engine refills the buffer once the bucket is answered
                        import torch
                        torch.cuda.current_stream().synchronize()
                except (KeyError, ValueError, CkptError, RuntimeError) as e:
                    self.fail(str(e).strip('"'))
                    continue
                self.ack()
            elif kind == "finish":
                ok, msg = True, None
                if post_hook:
                    try:
                        post_hook()
                    except Exception as e:  # the engine reports the worker's reason
                        ok, msg = False, "post-hook: %s" % e
                try:
                    self.finish_reply(ok, msg)
                except CkptError as e:  # ABORT after FINISH, or the engine went away
                    ok = False
                    reason = lib().ckpt_receiver_reason(self._h) or b""
                    msg = msg or reason.decode(errors="replace") or str(e)
                return UpdateResult(info.update_id, info.name.decode(), info.version, ok,
                                    msg or "", count, time.monotonic() - began)
            else:
                reason = lib().ckpt_receiver_reason(self._h) or b""
                return UpdateResult(info.update_id, info.name.decode(), info.version, False,
                                    reason.decode(errors="replace"), count,
                                    time.monotonic() - began)


def follow(socket_path, params, verify=None, post_hook=None, engine_wait_ms=-1,
           check_model=True):
    """Yields an UpdateResult for every update the engine rank at socket_path sends into
    `params` (see Receiver.apply_update), for as long as the caller iterates. When the
    engine goes away (killed, restarted) the connection is made again, waiting for the new
    engine up to engine_wait_ms (default forever); params keep their last complete weights
    meanwhile, and an update cut by the engine's death is yielded as not completed.
    A refusal (another worker holds the socket, another uid) raises CkptError."""
    rx = None
    try:
        while True:
            if rx is None:
                rx = Receiver.connect(socket_path, engine_wait_ms)
            try:
                yield rx.apply_update(params, verify=verify, post_hook=post_hook,
                                      check_model=check_model)
            except CkptError as e:
                if e.status != EPEER:
                    raise
                rx.close()  # the engine went away: wait for the next one
                rx = None
    finally:
        if rx is not None:
            rx.close()
