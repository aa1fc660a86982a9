"""A throw-away Slurm cluster of several nodes on one machine, for tests (issue 14).

Each node is a network namespace on a bridge, with its own UTS (hostname), mount (its own
/etc/hosts and a private /dev/shm) and IPC namespaces, so MPI treats the nodes as separate
hosts and its messages between them cross the veth links (../shared/NOTES.md, "Several nodes
on one machine"). The controller sits in a namespace of its own too: the bridge has no
address, so every address exists only inside namespaces this fixture made (no route out, no
forwarding). munged (its own key, a pathname socket every namespace reaches), slurmctld and one
`slurmd -N nodeI` per node run with MARKER in their environment; stop() ends exactly those
processes (by PID, through the marker, as the single-node cluster does) and deletes the
namespaces, the veths and the bridge.

    cluster = MultiNodeCluster(root, nodes=3).start()
    cluster.run("srun", "-N", "2", "hostname")      # clients run in the controller's namespace
    cluster.tx_bytes("node1")                       # bytes node1 sent over its link
    cluster.kill_node("node2")                      # its slurmd and every process on it
    cluster.stop()
"""

import json
import os
import secrets
import subprocess

from slurm_cluster import MARKER, SlurmCluster, kill_marked, tool

CPUS_PER_NODE = 4


class NamespacesRefused(RuntimeError):
    """The kernel refused network namespaces (not root, or a sandbox without CAP_SYS_ADMIN)."""


def ip(*args, check=True):
    r = subprocess.run(["ip", *map(str, args)], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(map(str, args))}: {r.stderr.strip()}")
    return r


class MultiNodeCluster(SlurmCluster):
    def __init__(self, root, nodes=3, log=print):
        super().__init__(root, cpus=CPUS_PER_NODE, log=log)
        self.nodes = [f"node{i + 1}" for i in range(nodes)]
        tag = secrets.token_hex(3)
        self.bridge = f"mgb{tag}"           # ≤ 15 characters, unique per cluster
        self.netns = {n: f"mpigpt2-{tag}-{n}" for n in ["ctl"] + self.nodes}
        self.veth = {n: f"mgv{tag}{i}" for i, n in enumerate(["ctl"] + self.nodes)}
        net = 16 + secrets.randbelow(200)
        self.addr = {n: f"10.213.{net}.{1 if n == 'ctl' else 10 + i}"
                     for i, n in enumerate(["ctl"] + self.nodes)}
        self.hosts = self.root / "hosts"

    # -- the network --------------------------------------------------------------------------
    def _network(self):
        if os.geteuid() != 0:
            raise NamespacesRefused("network namespaces need root")
        r = ip("netns", "add", self.netns["ctl"], check=False)
        if r.returncode != 0:
            raise NamespacesRefused(f"the kernel refused a network namespace: {r.stderr.strip()}")
        ip("link", "add", self.bridge, "type", "bridge")
        ip("link", "set", self.bridge, "up")  # no address: the host is not on this network
        for n in ["ctl"] + self.nodes:
            if n != "ctl":
                ip("netns", "add", self.netns[n])
            ns, peer = self.netns[n], self.veth[n]
            ip("link", "add", peer, "type", "veth", "peer", "name", peer + "i")
            ip("link", "set", peer, "master", self.bridge)
            ip("link", "set", peer, "up")
            ip("link", "set", peer + "i", "netns", ns)
            ip("-n", ns, "link", "set", peer + "i", "name", "eth0")
            ip("-n", ns, "addr", "add", self.addr[n] + "/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        self.hosts.write_text("127.0.0.1 localhost\n" + "".join(
            f"{a} {n}\n" for n, a in self.addr.items()))

    def _teardown_network(self):
        for n, ns in self.netns.items():
            ip("netns", "del", ns, check=False)  # (its veth end goes, and with it the peer)
            ip("link", "del", self.veth[n], check=False)
        ip("link", "del", self.bridge, check=False)

    def in_ns(self, node, cmd, shm=False):
        """cmd inside node's namespaces: its network (nsenter keeps the host's /sys, which
        slurmd's cgroup check needs), and new UTS, mount and IPC namespaces with the node's
        hostname, /etc/hosts and (shm) a private /dev/shm."""
        script = f"mount --bind {self.hosts} /etc/hosts && hostname {node} && "
        if shm:
            script += f"mount -t tmpfs -o size=2g,mode=1777 shm{node} /dev/shm && "
        script += 'exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.netns[node]}", "unshare", "--uts",
                "--mount", "--propagation", "private", "--ipc", "sh", "-c", script, node,
                *map(str, cmd)]

    # -- start / stop ---------------------------------------------------------------------------
    def start(self, timeout=90):
        from slurm_cluster import ensure_installed
        ensure_installed(self.log)
        for d in ("munge", "state", "spool", "log", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        self._start_watchdog()
        try:
            self._network()
            self._start_munge()
            self._write_conf()
            self._daemon("slurmctld", self.in_ns("ctl", [tool("slurmctld"), "-D", "-f",
                                                         self.conf]))
            for n in self.nodes:
                self._daemon(f"slurmd-{n}", self.in_ns(n, [tool("slurmd"), "-D", "-f",
                                                           self.conf, "-N", n], shm=True))
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        try:
            super().stop()
        finally:
            self._teardown_network()

    def _write_conf(self):
        super()._write_conf(f"{len(self.nodes)} nodes in network namespaces",
                            host=f"ctl({self.addr['ctl']})", per_node="%n",
                            nodes={n: self.addr[n] for n in self.nodes},
                            extra="SlurmdTimeout=10\n")

    def run(self, *cmd, timeout=60, check=True, env=None):
        """A Slurm client command in the controller's namespace (where its address is)."""
        return super().run("nsenter", f"--net=/run/netns/{self.netns['ctl']}", *cmd,
                           timeout=timeout, check=check, env=env)

    # -- what tests look at -------------------------------------------------------------------
    def tx_bytes(self, node):
        """Bytes node has sent over its link (its eth0's counter)."""
        r = ip("-n", self.netns[node], "-s", "-j", "link", "show", "eth0")
        return json.loads(r.stdout)[0]["stats64"]["tx"]["bytes"]

    def node_pids(self, node):
        """The marked processes running on node (in its network namespace)."""
        want = os.stat(f"/run/netns/{self.netns[node]}").st_ino
        out = []
        for pid in self._marked():
            try:
                if os.stat(f"/proc/{pid}/ns/net").st_ino == want:
                    out.append(pid)
            except OSError:
                pass
        return out

    def _marked(self):
        from slurm_cluster import marked_pids
        return marked_pids(self.marker)

    def kill_node(self, node):
        """A node dies: SIGKILL its slurmd and every process on it, at once."""
        import signal
        for pid in self.node_pids(node):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.procs.pop(f"slurmd-{node}", None)


__all__ = ["MultiNodeCluster", "NamespacesRefused", "MARKER", "kill_marked"]
