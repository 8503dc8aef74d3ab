"""Ray clusters: the embedded one (loopback only, a reaper for a killed driver, one retry),
attaching to a running one, node liveness, and the rule that a multi-node run's storage
is shared. orchestrate.py runs the training on whatever this hands it."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from shardtune.errors import RunError
from shardtune.recipe import Recipe


def connect(recipe: Recipe, address: str | None, extra_cpus: int = 0) -> bool:
    """Attach to `address`, or start an embedded single-node cluster (with `extra_cpus`
    logical CPUs more than the machine's: a sweep's trial drivers, which only wait, hold
    a sliver each). True if started here."""
    import ray

    if ray.is_initialized():
        return False  # a caller (a test session, a notebook) owns the cluster
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    if address:
        global _embedded
        _embedded = False
        try:
            ray.init(address=address, **quiet)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, AuthenticationError...
            # Ray's exception does not say whether the address or the token was wrong (the
            # reason is only in its C++ log), so name both fixes.
            first_line = (str(exc).splitlines() or [repr(exc)])[0]
            hints = ["check the address (the head's host:port, or ray://host:10001)",
                     "or leave cluster.address unset for an embedded cluster"]
            if os.environ.get("RAY_AUTH_MODE") != "token":
                hints.insert(0, "if the cluster uses token authentication (`ray start` turns it on), "
                                "set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or "
                                "~/.ray/auth_token on this machine)")
            raise RunError(f"cannot attach to the Ray cluster at {address} ({first_line}); "
                           + "; ".join(hints)) from None
        return True
    # Ray announces its (automatic) token on every start of a cluster that only this
    # machine's loopback can reach; the token itself is what guards it.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    cl = recipe.cluster
    needed = cl.workers * cl.cpus_per_worker
    start_embedded_cluster(num_cpus=max(needed, os.cpu_count() or 1) + extra_cpus,
                           num_gpus=int(cl.workers * cl.gpus_per_worker) or None, **quiet)
    return True


# Run in its own session beside an embedded cluster: when this process dies without saying
# goodbye (SIGKILL, the OOM killer), the pipe closes unanswered and the cluster's processes
# go too. Ray's own agents otherwise outlive their raylet for minutes.
_REAPER = """
import sys, psutil
procs = []
for spec in sys.argv[1:]:
    pid, created = spec.split(":")
    try:
        p = psutil.Process(int(pid))
        if abs(p.create_time() - float(created)) < 0.01:
            procs.append(p)
    except psutil.Error:
        pass
if sys.stdin.read() != "ok":
    found = list(procs)
    for p in procs:
        try:
            found += p.children(recursive=True)
        except psutil.Error:
            pass
    for p in found:
        try:
            p.kill()
        except psutil.Error:
            pass
"""


def _reap_if_killed() -> None:
    import atexit
    import subprocess

    import psutil

    mine = psutil.Process().children(recursive=True)
    specs = [f"{p.pid}:{p.create_time()}" for p in mine]
    reaper = subprocess.Popen([sys.executable, "-c", _REAPER, *specs], stdin=subprocess.PIPE, text=True,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def goodbye() -> None:  # a normal exit: Ray's own shutdown stops its processes
        try:
            reaper.stdin.write("ok")
            reaper.stdin.close()
        except OSError:
            pass

    atexit.register(goodbye)


@contextmanager
def _cluster_mode_off(ray_constants):
    """Only while the embedded cluster starts (its processes inherit the switch): clusters
    this process starts or joins later (`ray start` in a test, --address) are not changed."""
    name, before = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    was = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = was
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


_embedded = False  # whether this process's Ray cluster is one start_embedded_cluster started


def is_embedded() -> bool:
    import ray

    return _embedded and ray.is_initialized()


def mark_embedded(embedded: bool) -> None:
    """In a process attached to the cluster by Ray itself (a sweep's trial actor): whether
    that cluster is the embedded one its driver started."""
    global _embedded
    _embedded = embedded


def start_embedded_cluster(**kwargs) -> None:
    """A single-node Ray cluster in this process that listens on 127.0.0.1 only.

    On Linux, Ray replaces a node address of 127.0.0.1 with the machine's own address and
    then binds its GCS, raylet, worker, agent and metrics ports to all interfaces. With
    "cluster mode" off (the switch Ray reads on macOS and Windows) it keeps 127.0.0.1 and
    binds every port there; Ray's child processes read the same switch from the
    environment. "local" never attaches to a cluster left running on the host; no
    dashboard (measured here: +1 GB of memory and 11 processes), so no state API either,
    which is why orchestrate leaves out Ray Train's PlacementGroupCleaner on it. A start
    that times out under load is retried once."""
    import ray
    import ray._private.ray_constants as ray_constants

    for attempt in (1, 2):
        try:
            with _cluster_mode_off(ray_constants):
                ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
            _reap_if_killed()
            global _embedded
            _embedded = True
            return
        except Exception as exc:  # Ray raises a bare Exception for a node that did not come up
            if "timed out during startup" not in str(exc) and "Timed out" not in str(exc):
                raise
            if ray.is_initialized():
                ray.shutdown()
            if attempt == 2:
                raise RunError("the embedded Ray cluster did not start twice in a row (\"The current node timed "
                               "out during startup\"): the machine is probably overloaded or short of memory; "
                               "retry when it is quieter, or attach to a running cluster with --address") from None


# File systems that live on one node. A multi-node run on one of these would write each
# worker's checkpoint shards to a different disk.
LOCAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "tmpfs", "ramfs", "overlay", "vfat",
                     "exfat", "ntfs", "ntfs3", "devtmpfs"}


def filesystem_type(path: Path) -> str:
    """The type of the file system holding `path`, from /proc/mounts (longest mount prefix)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3:
            point = fields[1].replace("\\040", " ")
            if (str(path) == point or str(path).startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best, kind = point, fields[2]
    return kind


def check_storage_is_shared(recipe: Recipe, staging: Path, nodes: list[str]) -> None:
    """Every worker writes its checkpoint shards to the run's storage; on several nodes
    that must be one shared file system."""
    if len(nodes) <= 1 or recipe.cluster.shared_storage:
        return
    kind = filesystem_type(staging)
    if kind in LOCAL_FILESYSTEMS:
        raise RunError(f"the cluster has {len(nodes)} nodes ({', '.join(nodes)}) but output.dir "
                       f"{recipe.output.dir} is on a node-local file system ({kind}); every worker writes "
                       "checkpoints there, so use a path on storage all nodes share (NFS, Lustre, GPFS, ...), "
                       "or set cluster.shared_storage: true if this path is shared (e.g. every node on one machine)")


def node_alive(node_id: str, wait_s: float = 30.0) -> bool:
    """Whether a worker's node is still up. Ray notices a dead worker within seconds but
    declares its node dead only after ~10-20 s of missed heartbeats, so a node that is
    gone is given that long to show it."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        try:
            alive = any(n.get("NodeID") == node_id and n.get("Alive") for n in ray.nodes())
        except Exception:  # no cluster to ask: assume the node, not the worker, is fine
            return True
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(2)


def alive_nodes() -> list[str]:
    import ray

    return sorted(n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive"))
