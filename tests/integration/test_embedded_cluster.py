"""The embedded Ray cluster serves nothing to the network: every socket its processes
listen on is on 127.0.0.1 (it used to be 11 of 13 on all interfaces)."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess

import psutil
import pytest

pytestmark = pytest.mark.integration


def _cluster_pids() -> set[int]:
    import ray

    @ray.remote
    def pid() -> int:  # a worker process too, not only the daemons
        import os

        return os.getpid()

    pids = {psutil.Process().pid, ray.get(pid.remote())}
    for proc in psutil.Process().children(recursive=True):
        pids.add(proc.pid)
    return pids


def _listeners(pids: set[int]) -> list[tuple[str, str]]:
    """(address, process) of every listening TCP socket of these processes, from `ss -ltnp`
    (psutil's view where ss is missing)."""
    found = []
    if shutil.which("ss"):
        for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
            fields = line.split()
            if len(fields) >= 6 and any(f"pid={p}," in fields[5] for p in pids):
                found.append((fields[3].rsplit(":", 1)[0].strip("[]"), fields[5]))
        return found
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            found.append((conn.laddr.ip, str(conn.pid)))
    return found


def test_every_port_of_the_embedded_cluster_is_on_loopback(ray_session):
    listeners = _listeners(_cluster_pids())
    assert len(listeners) >= 5, listeners  # GCS, raylet, workers, agents: all found
    exposed = []
    for address, who in listeners:
        host = address.removeprefix("::ffff:")
        if host == "*" or not ipaddress.ip_address(host).is_loopback:
            exposed.append((address, who))
    assert not exposed, exposed
