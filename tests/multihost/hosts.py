"""Several "hosts" on one machine: network namespaces joined by a Linux bridge, so that
engine ranks, workers and P2P pulls cross a real network path (veth, bridge, TCP) as they
would between machines. ../shared/recipes/two-hosts-on-one-machine.md has the recipe this
generalises (a bridge instead of one veth pair, so 2 or 4 hosts alike).

Layout of one set of hosts (all names unique per run, see NAME below):

    ns <run>.h0   eth0 10.231.X.1/24 --veth-- p0 \
    ns <run>.h1   eth0 10.231.X.2/24 --veth-- p1  >-- br0 (in ns <run>.br)
    ...                                         /

Nothing is added to the root namespace: the bridge lives in its own namespace, so the
machine's own network, its firewall rules and the other engineers' namespaces never see a
packet of ours, and two runs cannot collide on an interface name or an address.

mpirun runs inside host 0 and starts the other hosts' daemons through an rsh agent (a
script written per run) that maps a host address to `ip netns exec <ns>`.

Every process started inside a namespace is found again by `ip netns pids`, so the harness
can kill whatever is left (mpirun can hang in its abort after a link cut) without knowing
its pid, and without touching any process it did not start.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

PREFIX = "ckmh"
NETNS_DIR = "/run/netns"
DEV = "eth0"  # the device name inside every host namespace (UCX_NET_DEVICES names it)

_seq = 0


class HostsUnavailable(Exception):
    """Network namespaces cannot be made here (not root, no netns support)."""


def required():
    """Whether a missing prerequisite fails instead of skipping: under CI (env CI set and
    not 0/false) or under CTest (its `multihost` case sets CKPT_MULTIHOST_REQUIRED=1)."""
    ci = os.environ.get("CI", "").strip().lower()
    return (ci not in ("", "0", "false", "no")
            or os.environ.get("CKPT_MULTIHOST_REQUIRED") == "1")


def _run(argv, timeout=30, check=True):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError("%s exited %d: %s" % (" ".join(argv), p.returncode,
                                                 (p.stderr or p.stdout).strip()))
    return p


def _start_time(pid):
    """The process's start time (clock ticks since boot), or None when it is gone: a pid
    alone could have been reused by now."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(") ", 1)[1].split()[19])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


# Names carry the creator's pid and start time: a run recognises its own leftovers from a
# killed run (creator gone) and never the namespaces of a run still going on.
_NAME = re.compile(r"^%s\.(\d+)\.(\d+)\.\d+\.(h\d+|br|probe)$" % PREFIX)


def _ns_pids(ns):
    p = _run(["ip", "netns", "pids", ns], check=False, timeout=10)
    return [int(x) for x in p.stdout.split()] if p.returncode == 0 else []


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _kill_ns_processes(namespaces, timeout=10.0):
    """SIGKILL every process inside the namespaces until none is left (bounded). Returns
    {pid: command line} of what was killed; raises when something survives the bound."""
    killed = {}
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for ns in namespaces for pid in _ns_pids(ns)]
        if not left:
            return killed
        if time.monotonic() > deadline:
            raise RuntimeError("processes left in the namespaces after %.0f s of SIGKILL: %s"
                               % (timeout, {p: _cmdline(p) for p in left}))
        for pid in left:
            killed.setdefault(pid, _cmdline(pid))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def clean_stale():
    """Deletes the namespaces of earlier runs of this harness whose creator is gone (a run
    killed by CTest's timeout cannot clean up after itself), with the processes in them.
    Namespaces of a run that is still going on are left alone, and so is anything without
    our prefix."""
    if not os.path.isdir(NETNS_DIR):
        return []
    stale = []
    for name in sorted(os.listdir(NETNS_DIR)):
        m = _NAME.match(name)
        if not m:
            continue
        pid, start = int(m.group(1)), int(m.group(2))
        if _start_time(pid) == start:
            continue  # its creator still runs
        stale.append(name)
    if stale:
        _kill_ns_processes(stale)
        for name in stale:
            _run(["ip", "netns", "del", name], check=False, timeout=10)
    return stale


def _run_id():
    global _seq
    _seq += 1
    return "%s.%d.%d.%d" % (PREFIX, os.getpid(), _start_time(os.getpid()), _seq)


def probe():
    """Raises HostsUnavailable naming the reason when namespaces cannot be made here."""
    if os.geteuid() != 0:
        raise HostsUnavailable("network namespaces need root (euid %d); run as root, or in "
                               "CI where root is available" % os.geteuid())
    name = _run_id() + ".probe"
    try:
        p = _run(["ip", "netns", "add", name], check=False, timeout=10)
    except FileNotFoundError:
        raise HostsUnavailable("the 'ip' command (iproute2) is not installed")
    if p.returncode != 0:
        raise HostsUnavailable("'ip netns add' failed: %s" % (p.stderr.strip() or p.returncode))
    _run(["ip", "netns", "del", name], check=False, timeout=10)


class Hosts:
    """n hosts; use as a context manager (or call up() and down()). down() kills every
    process left in the namespaces and deletes them, also after a failure."""

    def __init__(self, n, workdir):
        self.n = n
        self.workdir = str(workdir)
        self.run = _run_id()
        self.ns = ["%s.h%d" % (self.run, i) for i in range(n)]
        self.br = self.run + ".br"
        # The subnet is private to these namespaces (no route leaves them), so any /24
        # would do; one derived from the pid keeps two runs apart even in a trace.
        self.net = "10.231.%d" % (64 + os.getpid() % 160)
        self.rsh = os.path.join(self.workdir, "rsh-agent")
        self.procs = []
        self.killed = {}

    # --- lifetime -----------------------------------------------------------------------

    def up(self):
        try:
            _run(["ip", "netns", "add", self.br])
            _run(["ip", "-n", self.br, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", self.br, "link", "set", "br0", "up"])
            for i, ns in enumerate(self.ns):
                _run(["ip", "netns", "add", ns])
                # Created inside the namespaces directly: no name ever exists in the root
                # namespace, where another run's interface could hold it.
                _run(["ip", "-n", ns, "link", "add", DEV, "type", "veth", "peer", "name",
                      "p%d" % i, "netns", self.br])
                _run(["ip", "-n", self.br, "link", "set", "p%d" % i, "master", "br0"])
                _run(["ip", "-n", self.br, "link", "set", "p%d" % i, "up"])
                _run(["ip", "-n", ns, "addr", "add", self.addr(i) + "/24", "dev", DEV])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
                _run(["ip", "-n", ns, "link", "set", DEV, "up"])
            self._write_agent()
        except BaseException:
            self.down()
            raise
        return self

    def down(self, timeout=10.0):
        """Kills what is left inside the namespaces, reaps the processes this harness
        started, deletes the namespaces. Returns {pid: command line} of what it killed."""
        names = [ns for ns in self.ns + [self.br] if os.path.exists(os.path.join(NETNS_DIR, ns))]
        killed = _kill_ns_processes(names, timeout)
        self.killed.update(killed)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        for ns in names:
            _run(["ip", "netns", "del", ns], check=False, timeout=10)
        return killed

    def __enter__(self):
        return self.up()

    def __exit__(self, *exc):
        self.down()

    def _write_agent(self):
        # mpirun calls it as `AGENT [ssh options] HOST COMMAND...`; the command is one
        # shell line (orted and its arguments, with the environment set inline).
        cases = "".join("  %s) ns=%s; name=%s;;\n" % (self.addr(i), ns, self.hostname(i))
                        for i, ns in enumerate(self.ns))
        with open(self.rsh, "w") as f:
            f.write("#!/usr/bin/env bash\n"
                    "# rsh agent for mpirun: HOST is one of the namespaces' addresses.\n"
                    "while [ $# -gt 0 ] && [ \"${1#-}\" != \"$1\" ]; do shift; done\n"
                    "host=$1; shift\n"
                    "case $host in\n%s"
                    "  *) echo \"rsh agent: unknown host $host (not one of this run's "
                    "namespaces)\" >&2; exit 1;;\n"
                    "esac\n"
                    "exec ip netns exec \"$ns\" unshare --uts bash -c \"hostname $name && $*\"\n"
                    % cases)
        os.chmod(self.rsh, 0o755)

    # --- addressing and processes ----------------------------------------------------------

    def addr(self, i):
        return "%s.%d" % (self.net, i + 1)

    def hostname(self, i):
        """Host i's own hostname (a UTS namespace for mpirun and each orted). Open MPI tells
        nodes apart by hostname; with the machine's one name for every host it took ranks
        of different hosts for local peers (vader between them crashed at start with 2
        ranks per host), and the orteds of one job raced to create the same session
        directory, /tmp/ompi.HOSTNAME.UID/jf.N ("mkdir ... File exists", seen in CI)."""
        return "%s-h%d" % (PREFIX, i)

    def subnet(self):
        return self.net + ".0/24"

    def exec_argv(self, i, argv):
        return ["ip", "netns", "exec", self.ns[i]] + [str(a) for a in argv]

    def spawn(self, i, argv, log_path, env=None):
        """A process inside host i, its output appended to log_path."""
        log = open(log_path, "ab")
        try:
            p = subprocess.Popen(self.exec_argv(i, argv), stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env)
        finally:
            log.close()
        self.procs.append(p)
        return p

    def mpirun_argv(self, hosts, argv, slots=1):
        """mpirun inside hosts[0], `slots` ranks on each of `hosts` in order (rank r on
        hosts[r // slots]); MPI and its out-of-band channel over TCP on our subnet only."""
        return self.exec_argv(hosts[0], [
            # its own hostname (UTS namespace), as the other hosts' orteds (the agent)
            "unshare", "--uts", "bash", "-c", 'hostname %s && exec "$@"' % self.hostname(hosts[0]),
            "bash",
            "mpirun", "--mca", "plm_rsh_agent", self.rsh,
            "--mca", "pml", "ob1", "--mca", "btl", "tcp,vader,self",
            "--mca", "btl_tcp_if_include", self.subnet(),
            "--mca", "oob_tcp_if_include", self.subnet(),
            # Every orted shares the machine's hwloc topology through a shared-memory
            # segment mapped at a "hole" of its address space; with several namespace
            # hosts on one machine an orted crashed in hwloc_shmem_topology_write at start
            # (segfault, before any engine code; 1 run in about 15 of 4 hosts). Each
            # daemon then reads the topology itself.
            "--mca", "rtc_hwloc_vmhole", "none",
            "--bind-to", "none", "--map-by", "slot",
            "-H", ",".join("%s:%d" % (self.addr(h), slots) for h in hosts),
            "-np", str(len(hosts) * slots)] + [str(a) for a in argv])

    def pids(self, i=None):
        """Processes now inside host i (all hosts when None)."""
        nss = self.ns if i is None else [self.ns[i]]
        return [pid for ns in nss for pid in _ns_pids(ns)]

    def host_of(self, pid):
        """Index of the host namespace the process runs in, or None."""
        for i, ns in enumerate(self.ns):
            if pid in _ns_pids(ns):
                return i
        return None

    # --- network faults and figures ------------------------------------------------------

    def link_down(self, i):
        """Cuts host i off: its end of the veth pair goes down (a pulled cable)."""
        _run(["ip", "-n", self.ns[i], "link", "set", DEV, "down"])

    def limit_rate(self, i, rate):
        """Shapes the bridge's egress toward host i to `rate` (tc tbf, e.g. '40mbit'), so
        that an update into host i lasts long enough to cut it mid-way."""
        _run(["tc", "-n", self.br, "qdisc", "replace", "dev", "p%d" % i, "root", "tbf",
              "rate", rate, "burst", "64kb", "latency", "2s"])

    def unlimit_rate(self, i):
        """Takes limit_rate's shaping off host i's link."""
        _run(["tc", "-n", self.br, "qdisc", "del", "dev", "p%d" % i, "root"], check=False)

    def rx_bytes(self, i):
        """Bytes host i received on its link so far (the positive signal that an update's
        data is flowing into it)."""
        out = _run(["ip", "-j", "-s", "-n", self.ns[i], "link", "show", DEV]).stdout
        return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])


def make_hosts(n, workdir):
    """Hosts(n) after the prerequisites were checked: HostsUnavailable when namespaces
    cannot be made here (the caller skips, or fails under CI/CTest)."""
    clean_stale()
    probe()
    return Hosts(n, workdir)


if __name__ == "__main__":
    # `python3 hosts.py clean`: delete leftovers of killed runs by hand.
    if sys.argv[1:] == ["clean"]:
        print("deleted:", clean_stale() or "nothing")
