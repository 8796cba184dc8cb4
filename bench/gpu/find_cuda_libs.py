"""Finds the CUDA runtime and NCCL that pip installed for torch (nvidia-* wheels) and prints
them as shell assignments for scripts/gpu-check to eval:

    CKPT_CUDART=/.../site-packages/nvidia/cu13/lib/libcudart.so.13
    CKPT_NCCL=/.../site-packages/nvidia/nccl/lib/libnccl.so.2

Searched: the `nvidia` namespace package's folders, then every site-packages folder's
nvidia/ and torch/lib/. Exit status 1, naming what is missing, when either is not found.
Standard library only (torch is not imported: it takes seconds)."""
import os
import re
import shlex
import site
import sys

WANTED = {"CKPT_CUDART": re.compile(r"^libcudart\.so\.13(\.\d+)*$"),
          "CKPT_NCCL": re.compile(r"^libnccl\.so\.2(\.\d+)*$")}


def roots():
    out = []
    try:
        import nvidia  # a namespace package of the nvidia-* wheels
        out += list(getattr(nvidia, "__path__", []))
    except ImportError:
        pass
    dirs = list(sys.path)
    try:
        dirs += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:
        pass
    for d in dirs:
        if d and os.path.isdir(d):
            out += [os.path.join(d, "nvidia"), os.path.join(d, "torch", "lib")]
    seen, result = set(), []
    for r in out:
        r = os.path.realpath(r)
        if os.path.isdir(r) and r not in seen:
            seen.add(r)
            result.append(r)
    return result


def find():
    found = {}
    searched = roots()
    for r in searched:
        for dirpath, _, files in os.walk(r):
            for f in sorted(files, key=len):  # the soname itself before longer versions
                for var, pat in WANTED.items():
                    if var not in found and pat.match(f):
                        found[var] = os.path.join(dirpath, f)
    return found, searched


def main():
    found, searched = find()
    missing = [v for v in WANTED if v not in found]
    if missing:
        print("not found: %s (libcudart.so.13 / libnccl.so.2 of pip's nvidia-* wheels) under %s"
              % (", ".join(missing), ", ".join(searched) or "no site-packages with nvidia/"),
              file=sys.stderr)
        return 1
    for var in WANTED:
        print("%s=%s" % (var, shlex.quote(found[var])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
