"""Where a webhook may go: the SSRF guard.

A URL is checked when a webhook is registered (the API answers 422) and again before every
attempt, because what a name resolves to can change in between (DNS rebinding). A destination
is allowed when it is http(s) and every address its host resolves to is a public one; the
sender then connects to the very address that was checked, never resolving the name again.

Not public: loopback, private, link-local (the cloud metadata address 169.254.169.254
included), multicast, unspecified, reserved and shared (carrier-grade NAT) addresses, and the
IPv6 forms that carry one of those IPv4 addresses (IPv4-mapped `::ffff:a.b.c.d`, 6to4
`2002::/16`, NAT64 `64:ff9b::/96`). An operator allows more with
`CONVEYOR_WEBHOOK_ALLOWED_NETWORKS`: networks, and host names whose addresses are then all
allowed.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SCHEMES = ("http", "https")
MAX_URL_LENGTH = 2000
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NOT_PUBLIC = (
    ("is_loopback", "a loopback address"),
    ("is_link_local", "a link-local address"),
    ("is_multicast", "a multicast address"),
    ("is_unspecified", "the unspecified address"),
    ("is_private", "a private address"),
    ("is_reserved", "a reserved address"),
)


class DestinationRefused(ValueError):
    """A webhook URL that may not be called: the message says why."""


@dataclass(frozen=True)
class AllowList:
    """What the operator allows besides public addresses."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def of(cls, entries: Iterable[str]) -> AllowList:
        networks, hosts = [], set()
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if "/" in entry or ":" in entry:
                    raise ValueError(f"not a network: {entry!r}") from None
                hosts.add(entry.lower().rstrip("."))
        return cls(tuple(networks), frozenset(hosts))

    def allows(self, address: IPAddress) -> bool:
        return any(
            address in network for network in self.networks if network.version == address.version
        )


@dataclass(frozen=True)
class Destination:
    """A checked URL: where to connect (`address`) and what to call it (`host`, for the Host
    header and TLS)."""

    url: httpx.URL
    host: str
    port: int
    address: IPAddress

    @property
    def pinned_url(self) -> httpx.URL:
        """The URL with the checked address in place of the name, so that nothing resolves
        the name again."""
        return self.url.copy_with(host=str(self.address))

    @property
    def host_header(self) -> str:
        default = 443 if self.url.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def parse_url(url: str) -> httpx.URL:
    """The URL, if its form is one a webhook may have (no resolution yet)."""
    if len(url) > MAX_URL_LENGTH:
        raise DestinationRefused(f"must be at most {MAX_URL_LENGTH} characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise DestinationRefused(f"not a valid URL: {exc}") from None
    if parsed.scheme not in SCHEMES:
        raise DestinationRefused("must be an http or https URL")
    if not parsed.host:
        raise DestinationRefused("must name a host")
    if parsed.userinfo:
        raise DestinationRefused("must not carry credentials (user:password@)")
    return parsed


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (the system's resolver)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise DestinationRefused(f"the host {host!r} does not resolve: {exc}") from None
    # The scope of a link-local IPv6 address ("fe80::1%eth0") is not part of the address.
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for: IPv4-mapped, 6to4 or NAT64."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal(address: IPAddress) -> str | None:
    """Why `address` is not public, or None when it is."""
    if isinstance(address, ipaddress.IPv6Address) and (inner := embedded_ipv4(address)):
        reason = refusal(inner)
        return f"{reason} ({inner}) in IPv6 form" if reason else None
    for attribute, reason in _NOT_PUBLIC:
        if getattr(address, attribute):
            return reason
    if not address.is_global:
        return "not a public address"
    return None


def check(url: str, allow: AllowList) -> Destination:
    """The destination to connect to, once every address of the URL's host is allowed; the
    first of them is the one to use. Resolves the host (the URL may name an address)."""
    parsed = parse_url(url)
    host = parsed.host.rstrip(".")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        addresses = resolve(parsed.raw_host.decode("ascii"), port)
    if not addresses:
        raise DestinationRefused(f"the host {host!r} has no address")
    if host.lower() not in allow.hosts:
        for address in addresses:
            reason = refusal(address)
            if reason and not allow.allows(address):
                where = host if str(address) == host else f"{host} (resolves to {address})"
                raise DestinationRefused(f"{where} is {reason}; webhooks go to public addresses")
    return Destination(parsed, host, port, addresses[0])
