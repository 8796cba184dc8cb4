"""What the processes of bench/peers.py share: the checkpoint's layout as a worker learns it
(safetensors headers), XXH3-64 checksums (libckpt's ckpt_checksum, the engine's own), and
buffers allocated and touched up front. numpy and the standard library only, so that the
torch ranks can import it from another Python."""
import ctypes
import json
import mmap
import os
import struct

import numpy as np

# safetensors dtype -> element size in bytes.
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
            "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4,
            "U64": 8, "I64": 8, "F64": 8, "C64": 8}
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def files_of(path):
    """The .safetensors files of PATH (a file, or a directory of them), sorted."""
    if os.path.isfile(path):
        return [path]
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError("%s: no .safetensors file in it" % path)
    return files


def read_header(f):
    """(tensors, data_start) of an open safetensors file: tensors = [(name, dtype, shape,
    begin, end)] in file order, offsets relative to data_start."""
    head = f.read(8)
    if len(head) != 8:
        raise ValueError("%s: shorter than a safetensors header" % f.name)
    (n,) = struct.unpack("<Q", head)
    header = json.loads(f.read(n))
    out = []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        out.append((name, t["dtype"], tuple(t["shape"]), b, e))
    out.sort(key=lambda x: x[3])
    return out, 8 + n


def layout(path):
    """[(name, dtype, shape, nbytes, file, absolute offset)] of every tensor of PATH."""
    out = []
    for fn in files_of(path):
        with open(fn, "rb") as f:
            tensors, start = read_header(f)
        out += [(name, dt, shape, e - b, fn, start + b) for name, dt, shape, b, e in tensors]
    return out


def _libckpt():
    here = os.path.dirname(os.path.abspath(__file__))
    builds = [os.environ.get("CKPT_BUILD_DIR"), os.path.join(here, "..", "build", "release")]
    tried = []
    for b in builds:
        if not b:
            continue
        p = os.path.join(b, "src", "libckpt.so")
        tried.append(p)
        if os.path.exists(p):
            lib = ctypes.CDLL(p)
            lib.ckpt_checksum.restype = ctypes.c_uint64
            lib.ckpt_checksum.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            return lib
    raise FileNotFoundError("libckpt.so not found (tried %s): build first (make build) or set "
                            "CKPT_BUILD_DIR" % ", ".join(tried))


_LIB = None


def checksum_at(addr, nbytes):
    """XXH3-64 of nbytes at address addr: what registration stores and workers verify."""
    global _LIB
    if _LIB is None:
        _LIB = _libckpt()
    return int(_LIB.ckpt_checksum(ctypes.c_void_p(addr), nbytes))


def checksum(arr):
    return checksum_at(arr.ctypes.data, arr.nbytes)


def reference_checksums(path):
    """{name: XXH3-64 as 16 hex digits, as ckpt-worker --checksum-out writes them} of every
    tensor of PATH, read tensor by tensor (little memory)."""
    out = {}
    for name, _, _, nbytes, fn, off in layout(path):
        with open(fn, "rb", buffering=0) as f:
            buf = np.empty(nbytes, np.uint8)
            f.seek(off)
            got = f.readinto(memoryview(buf)) if nbytes else 0
            if got != nbytes:
                raise IOError("%s: tensor %s is cut short" % (fn, name))
            out[name] = "%016x" % checksum(buf)
    return out


def touched(nbytes):
    """A page-aligned byte buffer whose pages exist already (a serving worker's tensors
    are resident: first-touch faults are no part of an update)."""
    m = mmap.mmap(-1, max(nbytes, 1))
    a = np.frombuffer(m, np.uint8, count=nbytes)
    a.fill(0)
    return a


def tensor_buffers(lay):
    """{name: array} with the right element size and shape, allocated and touched."""
    out = {}
    for name, dt, shape, nbytes, _, _ in lay:
        a = np.empty(nbytes // ITEMSIZE[dt], UINT[ITEMSIZE[dt]])
        a.view(np.uint8).fill(0)
        out[name] = a.reshape(shape)
    return out


def readv_into(fd, arrays, offset):
    """Reads consecutive file bytes from `offset` straight into `arrays` (one copy from the
    page cache, no intermediate buffer), as few system calls as IOV_MAX allows."""
    views = [memoryview(a.reshape(-1).view(np.uint8)) for a in arrays if a.nbytes]
    pos = offset
    i = 0
    while i < len(views):
        batch = views[i:i + 512]
        want = sum(len(v) for v in batch)
        got = os.preadv(fd, batch, pos)
        if got == want:
            pos += got
            i += len(batch)
            continue
        if got <= 0:
            raise IOError("read at %d: end of file" % pos)
        # A short read: finish the batch view by view.
        pos += got
        while got >= len(views[i]):
            got -= len(views[i])
            i += 1
        views[i] = views[i][got:]
    return pos - offset
