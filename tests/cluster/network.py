"""Several hosts on one machine: a Linux bridge in the root network namespace (the switch) and
one network namespace per host, each plugged into the bridge by a veth pair (its cable).

Every name starts with `cvc<pid>-`, the pid of the test process that made it, so two runs never
collide and a run removes what a crashed run left behind (a name whose pid is gone), processes
still inside those namespaces included. The subnet is a free /24 of 10.213.0.0/16, chosen
against every address and route of the machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from devtools.processes import pid_alive

PREFIX = "cvc"
_OURS = re.compile(rf"^{PREFIX}(\d+)-")
SUPERNET = ipaddress.ip_network("10.213.0.0/16")


def ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Host:
    name: str  # also its hostname, as the workers' names and the jobs' `worker` column show it
    namespace: str
    address: str
    link: str  # the bridge's end of its veth pair: set down, the host's cable is cut

    @property
    def wrap(self) -> list[str]:
        """The prefix that runs a command on this host: in its network namespace, with its own
        hostname (a UTS namespace of its own; `ip netns exec` and `unshare` both exec, so the
        process id is the command's)."""
        return [
            "ip", "netns", "exec", self.namespace,
            "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.name,
        ]  # fmt: skip


class Network:
    def __init__(self, names: Sequence[str]) -> None:
        self.run = f"{PREFIX}{os.getpid()}"
        self.subnet = free_subnet()
        addresses = [str(address) for address in self.subnet.hosts()]
        self.gateway = addresses[0]  # the root namespace's address on the bridge
        self.bridge = f"{self.run}-br"
        self.hosts = {
            name: Host(name, f"{self.run}-{name}", addresses[index + 1], f"{self.run}-{index}")
            for index, name in enumerate(names)
        }

    def create(self) -> Network:
        prefix = self.subnet.prefixlen
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for host in self.hosts.values():
            ip("netns", "add", host.namespace)
            ip("link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns",
               host.namespace)  # fmt: skip
            ip("link", "set", host.link, "master", self.bridge)
            ip("link", "set", host.link, "up")
            ip("-n", host.namespace, "addr", "add", f"{host.address}/{prefix}", "dev", "eth0")
            ip("-n", host.namespace, "link", "set", "eth0", "up")
            ip("-n", host.namespace, "link", "set", "lo", "up")
        return self

    def cut(self, host: Host) -> None:
        ip("link", "set", host.link, "down")

    def reconnect(self, host: Host) -> None:
        ip("link", "set", host.link, "up")

    def destroy(self) -> None:
        for host in self.hosts.values():
            # Deleting the pair from this end is synchronous; a namespace's own deletion frees
            # its devices in the background, after `ip netns del` has returned.
            ip("link", "del", host.link, check=False)
            remove_namespace(host.namespace)
        ip("link", "del", self.bridge, check=False)


def remove_namespace(namespace: str) -> None:
    """Kills what still runs in it, then deletes it (its veth pair goes with it)."""
    for pid in ip("netns", "pids", namespace, check=False).split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    ip("netns", "del", namespace, check=False)


def namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def links() -> list[str]:
    return [line.split(":")[1].strip().split("@")[0] for line in ip("-o", "link").splitlines()]


def remove_leftovers() -> list[str]:
    """Removes what runs whose process is gone left: their namespaces (and what still runs
    there), links and stores; returns what it removed."""
    removed = []
    for namespace in namespaces():
        if (match := _OURS.match(namespace)) and not pid_alive(int(match.group(1))):
            remove_namespace(namespace)
            removed.append(namespace)
    for link in links():
        if (match := _OURS.match(link)) and not pid_alive(int(match.group(1))):
            ip("link", "del", link, check=False)
            removed.append(link)
    # The stores of the root namespace outlive a killed run, listening on its bridge's
    # address, which no interface holds once the bridge is gone.
    held = {line.split()[3].split("/")[0] for line in ip("-o", "-4", "addr").splitlines()}
    for pid, address in listeners():
        if address in held or address in ("*", "::"):
            continue
        if ipaddress.ip_address(address) in SUPERNET:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            removed.append(f"pid {pid} on {address}")
    return removed


def listeners() -> list[tuple[int, str]]:
    """(pid, address) of every TCP listener of the root namespace, IPv4 and IPv6 (`*` and
    `[::]` both as they are: listening everywhere)."""
    table = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in table.splitlines():
        address = line.split()[3].rsplit(":", 1)[0].strip("[]").split("%")[0]
        found += [(int(pid), address) for pid in re.findall(r"pid=(\d+)", line)]
    return found


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 of SUPERNET that no address or route of the root namespace overlaps."""
    taken = []
    for line in ip("-o", "-4", "addr", "show").splitlines():
        taken.append(ipaddress.ip_interface(line.split()[3]).network)
    for line in ip("-4", "route", "show").splitlines():
        destination = line.split()[0]
        if destination != "default":
            taken.append(ipaddress.ip_network(destination, strict=False))
    candidates = list(SUPERNET.subnets(new_prefix=24))
    start = os.getpid() % len(candidates)  # two runs at once start at different places
    for subnet in candidates[start:] + candidates[:start]:
        if not any(subnet.overlaps(other) for other in taken):
            return subnet
    raise RuntimeError(f"no free /24 left in {SUPERNET}")
