"""Installing the way users do: `pip install .` into a fresh virtualenv (the package then
loads its own libckpt.so with no environment variables set), and `make install` into a
prefix (cmake --install), used by a C program built with pkg-config. A missing tool
(venv support, network for pip, pkg-config, a C compiler) fails the test: it names what to
install rather than skipping."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import BUILD_DIR, SANITIZED, SOURCE_DIR


def _clean_env(**extra):
    """The environment of a user who has set nothing of ours: no CKPT_*, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CKPT_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def _run(cmd, hint="", timeout=120, **kw):
    cmd = [str(c) for c in cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except FileNotFoundError as e:
        pytest.fail(f"{cmd[0]} not found ({e}). {hint}")
    if proc.returncode != 0:
        pytest.fail(f"`{' '.join(cmd)}` exited {proc.returncode}. {hint}\n"
                    f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc.stdout


def _project_version():
    text = (SOURCE_DIR / "CMakeLists.txt").read_text()
    return re.search(r"project\(ckpt-engine\s+VERSION\s+([0-9.]+)", text).group(1)


def _inside(path, root):
    path, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([path, root]) == root


# Run by the virtualenv's Python from outside the checkout: where the package and the
# library it loaded are (/proc/self/maps: what the loader really mapped).
CHECK_SCRIPT = """
import importlib.metadata, json, sysconfig
import ckpt_engine
from ckpt_engine import receiver
lib = receiver.lib()
maps = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libckpt" in line})
print(json.dumps({
    "package": ckpt_engine.__file__, "lib": lib._name, "mapped": maps,
    "platlib": sysconfig.get_paths()["platlib"],
    "version": importlib.metadata.version("ckpt-engine"),
    "strerror": lib.ckpt_strerror(-1).decode(),
    "receiver": hasattr(ckpt_engine, "Receiver"),
}))
"""


def test_pip_install_into_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    # A clean venv (no --system-site-packages): nothing of the checkout or of the test
    # interpreter's site-packages can stand in for what pip installed.
    _run([sys.executable, "-m", "venv", venv],
         hint="Python's venv module (with ensurepip) is needed: on Debian `apt-get install "
              "python3-venv` (scripts/install-deps installs it).")
    py = venv / "bin" / "python"
    env = _clean_env()
    # Build isolation fetches scikit-build-core, and numpy is a dependency: PyPI (or the
    # index pip is configured with) must be reachable.
    _run([py, "-m", "pip", "install", SOURCE_DIR], cwd=tmp_path, env=env, timeout=600,
         hint="`pip install .` failed: the output says why (no network for PyPI: set "
              "PIP_INDEX_URL to a mirror; missing -dev packages: run scripts/install-deps).")
    info = json.loads(_run([py, "-c", CHECK_SCRIPT], cwd=tmp_path, env=env).splitlines()[-1])

    site = info["platlib"]
    assert _inside(site, venv), info
    assert _inside(info["package"], site), f"ckpt_engine imported from outside the venv: {info}"
    want_lib = os.path.join(os.path.dirname(info["package"]), "libckpt.so")
    assert info["lib"] == want_lib, f"the package did not load its own libckpt.so: {info}"
    assert info["mapped"] and all(_inside(m, site) for m in info["mapped"]), \
        f"a libckpt from outside the venv is mapped: {info['mapped']}"
    assert info["strerror"] == "invalid argument", info
    assert info["version"] == _project_version(), \
        f"package version {info['version']} is not CMake's project version {_project_version()}"
    assert info["receiver"], info

    # Editable (`pip install -e .`): the Python files stay in the checkout, the library goes
    # to site-packages, and the package must still load that one, not a build tree's.
    _run([py, "-m", "pip", "install", "-e", SOURCE_DIR], cwd=tmp_path, env=env, timeout=600)
    info = json.loads(_run([py, "-c", CHECK_SCRIPT], cwd=tmp_path, env=env).splitlines()[-1])
    assert _inside(info["package"], SOURCE_DIR / "python"), info
    assert _inside(info["lib"], site) and info["mapped"] and \
        all(_inside(m, site) for m in info["mapped"]), \
        f"the editable install did not load the libckpt.so it installed: {info}"


def _cache_value(name):
    text = (BUILD_DIR / "CMakeCache.txt").read_text()
    m = re.search(r"^%s:[A-Z]+=(.*)$" % re.escape(name), text, re.M)
    assert m, f"{name} not in {BUILD_DIR}/CMakeCache.txt"
    return m.group(1)


def _api_functions(header_text):
    """Names of the functions a public header declares with CKPT_API."""
    text = re.sub(r"/\*.*?\*/", "", header_text, flags=re.S)
    return set(re.findall(r"\bCKPT_API\b[^;{()]*?\b(ckpt_\w+)\s*\(", text))


# Every installed header, compiled with only pkg-config's flags; the library found through
# LD_LIBRARY_PATH must be the installed one (dladdr says which file the symbol came from).
C_PROGRAM = """
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
%s
int main(void)
{
    Dl_info info;
    if (!dladdr((void *)ckpt_strerror, &info) || !info.dli_fname)
        return 2;
    printf("%%s\\n%%s\\n%%s\\n", ckpt_strerror(CKPT_EINVAL), ckpt_version(), info.dli_fname);
    return 0;
}
"""


@pytest.mark.skipif(SANITIZED, reason="an ASan/UBSan libckpt.so cannot be linked into a plain "
                                      "program; the release tree tests the install")
def test_cmake_install_with_pkg_config(tmp_path):
    assert (BUILD_DIR / "CMakeCache.txt").is_file(), \
        f"no CMake build tree at {BUILD_DIR}: run `make build` or set CKPT_BUILD_DIR"
    prefix = tmp_path / "prefix"
    _run(["cmake", "--install", BUILD_DIR, "--prefix", prefix], timeout=300,
         hint=f"is {BUILD_DIR} fully built? (`make build`)")
    libdir = prefix / _cache_value("CMAKE_INSTALL_LIBDIR")
    incdir = prefix / _cache_value("CMAKE_INSTALL_INCLUDEDIR") / "ckpt"
    version = _project_version()

    # The SONAME chain, the tools, the headers of what libckpt exports.
    assert os.readlink(libdir / "libckpt.so") == "libckpt.so.0"
    assert os.readlink(libdir / "libckpt.so.0") == "libckpt.so.%s" % version
    for tool in ("ckpt-engine", "ckpt-worker"):
        _run([prefix / "bin" / tool, "--help"], hint=f"the installed {tool} does not start")
    headers = sorted(p.name for p in incdir.glob("*.h"))
    assert {"ckpt.h", "receiver.h", "safetensors.h", "store.h"} <= set(headers), headers
    assert not {"engine.h", "server.h"} & set(headers), \
        f"engine.h/server.h declare functions libckpt.so does not have: {headers}"
    exported = {sym.split("@")[0] for sym in _run(  # ckpt_x@@CKPT_0: versioned symbols
        ["nm", "-D", "--defined-only", "--format=just-symbols", libdir / "libckpt.so"],
        hint="nm comes with binutils").split()}
    for h in headers:
        missing = sorted(_api_functions((incdir / h).read_text()) - exported)
        assert not missing, (f"installed {h} declares {missing}, which libckpt.so does not "
                             "export: keep the header out of install() (CMakeLists.txt) or "
                             "build those functions into libckpt")
    # No run path into the build tree: the installed files must not depend on it.
    for f in [libdir / "libckpt.so", prefix / "bin" / "ckpt-engine", prefix / "bin" / "ckpt-worker"]:
        dyn = _run(["readelf", "-d", f])
        assert str(BUILD_DIR) not in dyn, f"{f} has a run path into the build tree:\n{dyn}"

    # A user's program: flags from pkg-config only.
    assert shutil.which("pkg-config"), "pkg-config is needed (scripts/install-deps installs it)"
    env = _clean_env(PKG_CONFIG_PATH=str(libdir / "pkgconfig"))
    assert _run(["pkg-config", "--modversion", "ckpt"], env=env).strip() == version
    flags = _run(["pkg-config", "--cflags", "--libs", "ckpt"], env=env).split()
    assert "-I%s" % (incdir.parent) in flags and "-L%s" % libdir in flags, flags
    src = tmp_path / "user.c"
    src.write_text(C_PROGRAM % "".join("#include <ckpt/%s>\n" % h for h in headers))
    exe = tmp_path / "user"
    cc = os.environ.get("CC", "cc")
    _run([cc, "-std=c11", "-Wall", "-Werror", src, "-o", exe, *flags], env=env,
         hint="a C compiler is needed (build-essential)")
    out = _run([exe], env=dict(env, LD_LIBRARY_PATH=str(libdir))).splitlines()
    assert out[:2] == ["invalid argument", version], out
    assert _inside(out[2], libdir), f"the program loaded {out[2]}, not the installed library"


def test_make_install_passes_prefix():
    """`make install PREFIX=... DESTDIR=...` installs the build tree with cmake --install."""
    out = _run(["make", "-n", "-C", SOURCE_DIR, "install", "PREFIX=/opt/x", "DESTDIR=/stage",
                "BUILD=%s" % BUILD_DIR])
    assert "DESTDIR=/stage cmake --install %s --prefix /opt/x" % BUILD_DIR in out, out
