"""The carried wheels of checkpoint-engine and its dependencies (standard library only).

  check_wheels.py --requirements WHEEL
      prints what WHEEL's METADATA requires (Requires-Dist, no extras) that the GPU machine
      does not already have: torch and numpy come with torch from pip, uvicorn only serves
      checkpoint-engine's HTTP CLI (checkpoint_engine/__main__.py), which is not used.
  check_wheels.py --check DIR [--import SITE]
      every requirement of every wheel in DIR is met by another wheel in DIR or by what the
      GPU machine has (torch, numpy, nvidia-*); with --import, `checkpoint_engine` and the
      calls reference_ce.py makes import from SITE (where the wheels were installed), when
      torch can be imported here.
"""
import argparse
import glob
import os
import re
import subprocess
import sys
import zipfile

PRESENT = {"torch", "numpy", "typing-extensions", "filelock", "sympy", "networkx", "jinja2",
           "fsspec", "setuptools", "triton", "markupsafe", "mpmath"}  # torch's own
OMITTED = {"uvicorn": "only checkpoint_engine/__main__.py (the HTTP CLI) imports it"}


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def metadata(whl):
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(name).decode("utf-8", "replace")
    head = text.split("\n\n", 1)[0]
    fields = {}
    for line in head.splitlines():
        k, _, v = line.partition(": ")
        fields.setdefault(k, []).append(v.strip())
    return fields


def marker_applies(marker):
    """A requirement's environment marker on the GPU machine (CPython 3.12, Linux x86-64);
    extras are never asked for."""
    if not marker:
        return True
    if "extra" in marker:
        return False
    env = {"python_version": "'3.12'", "python_full_version": "'3.12.0'",
           "sys_platform": "'linux'", "platform_system": "'Linux'", "os_name": "'posix'",
           "platform_machine": "'x86_64'", "implementation_name": "'cpython'",
           "platform_python_implementation": "'CPython'"}
    expr = marker
    for k, v in env.items():
        expr = re.sub(r"\b%s\b" % k, v, expr)
    # version comparisons as tuples of ints: '3.12' < '3.9' must be False
    expr = re.sub(r"""['"](\d+(?:\.\d+)*)['"]""",
                  lambda m: "(%s,)" % ",".join(m.group(1).split(".")), expr)
    try:
        return bool(eval(expr, {"__builtins__": {}}, {}))  # noqa: S307 (our own markers)
    except Exception:  # noqa: BLE001 -- an unknown marker: count the requirement in
        return True


def requirements(fields):
    out = []
    for r in fields.get("Requires-Dist", []):
        spec, _, marker = r.partition(";")
        if not marker_applies(marker.strip()):
            continue
        spec = spec.strip().replace(" ", "")
        name = norm(re.match(r"[A-Za-z0-9_.\-]+", spec).group(0))
        out.append((name, re.sub(r"\[.*?\]", "", spec)))
    return out


def cmd_requirements(whl):
    reqs = [spec for name, spec in requirements(metadata(whl))
            if name not in PRESENT and name not in OMITTED and not name.startswith("nvidia-")]
    print(" ".join(reqs))
    return 0


def cmd_check(d, site):
    wheels = sorted(glob.glob(os.path.join(d, "*.whl")))
    have = {}
    for w in wheels:
        f = metadata(w)
        have[norm(f["Name"][0])] = (f["Version"][0], w)
    ce = have.get("checkpoint-engine")
    bad = 0
    if not ce:
        print("gpu-check: no checkpoint_engine wheel in %s" % d)
        return 1
    print("gpu-check: %d wheels in %s, checkpoint-engine %s" % (len(wheels), d, ce[0]))
    for name, (version, w) in sorted(have.items()):
        for req, spec in requirements(metadata(w)):
            if req in have or req in PRESENT or req.startswith("nvidia-"):
                continue
            if req in OMITTED and name == "checkpoint-engine":
                print("  %s -> %s: left out, %s" % (name, spec, OMITTED[req]))
                continue
            print("  %s %s requires %s: MISSING from the wheels" % (name, version, spec))
            bad = 1
    print("  %s" % ", ".join("%s %s" % (n, v) for n, (v, _) in sorted(have.items())))
    if site:
        env = dict(os.environ, PYTHONPATH=site + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if subprocess.run([sys.executable, "-c", "import torch"], env=env,
                          capture_output=True).returncode != 0:
            print("gpu-check: torch cannot be imported here: checkpoint_engine's import not tried "
                  "(it imports torch)")
        else:
            code = ("import checkpoint_engine, inspect\n"
                    "from checkpoint_engine.ps import ParameterServer\n"
                    "from checkpoint_engine.worker import update_weights_from_ipc\n"
                    "print('gpu-check: import checkpoint_engine', checkpoint_engine.__version__, "
                    "'from', checkpoint_engine.__file__)\n"
                    "print('  ParameterServer.update', inspect.signature(ParameterServer.update))\n"
                    "print('  update_weights_from_ipc', inspect.signature(update_weights_from_ipc))\n")
            r = subprocess.run([sys.executable, "-c", code], env=env)
            bad |= r.returncode != 0
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requirements", metavar="WHEEL")
    ap.add_argument("--check", metavar="DIR")
    ap.add_argument("--import", dest="site", metavar="SITE")
    a = ap.parse_args()
    if a.requirements:
        return cmd_requirements(a.requirements)
    if a.check:
        return cmd_check(a.check, a.site)
    ap.error("--requirements or --check")


if __name__ == "__main__":
    sys.exit(main())
