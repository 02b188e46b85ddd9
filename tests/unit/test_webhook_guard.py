"""The SSRF guard's rules, address by address, with a resolver the test controls."""

from __future__ import annotations

import ipaddress

import pytest

from app.webhooks import guard
from app.webhooks.guard import AllowList, DestinationRefused

NOTHING = AllowList.of([])


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.0.9",
        "10.0.0.1",
        "172.31.255.255",
        "192.168.0.1",
        "169.254.169.254",
        "169.254.0.1",
        "100.64.0.1",
        "0.0.0.0",
        "0.1.2.3",
        "224.0.0.251",
        "255.255.255.255",
        "240.0.0.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    ],
)
def test_addresses_that_are_not_public_are_refused(address: str) -> None:
    assert guard.refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "::ffff:93.184.216.34"]
)
def test_public_addresses_pass(address: str) -> None:
    assert guard.refusal(ipaddress.ip_address(address)) is None


def test_the_metadata_address_is_named_link_local() -> None:
    with pytest.raises(DestinationRefused, match="link-local"):
        guard.check("http://169.254.169.254/latest/meta-data/", NOTHING)


def test_a_name_is_refused_if_any_of_its_addresses_is_not_public(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    both = [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("10.0.0.7")]
    monkeypatch.setattr(guard, "resolve", lambda host, port: both)
    with pytest.raises(DestinationRefused, match=r"resolves to 10\.0\.0\.7"):
        guard.check("https://mixed.example.test/h", NOTHING)


def test_localhost_is_refused_through_the_real_resolver() -> None:
    with pytest.raises(DestinationRefused, match="loopback"):
        guard.check("http://localhost:8080/h", NOTHING)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "http://user:secret@example.com/",
        "http:///path-only",
        "https://example.com/" + "a" * guard.MAX_URL_LENGTH,
    ],
)
def test_urls_of_the_wrong_form_are_refused_before_any_lookup(url: str) -> None:
    with pytest.raises(DestinationRefused):
        guard.parse_url(url)


def test_the_allow_list_admits_networks_and_host_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard, "resolve", lambda host, port: [ipaddress.ip_address("10.9.8.7")])
    allow = AllowList.of(["10.0.0.0/8", "hooks.internal"])
    assert str(guard.check("http://10.1.1.1/", allow).address) == "10.1.1.1"
    assert str(guard.check("http://hooks.internal/", allow).address) == "10.9.8.7"
    with pytest.raises(DestinationRefused):
        guard.check("http://192.168.1.1/", allow)
    # An IPv4 network does not admit the IPv6 forms of its addresses.
    with pytest.raises(DestinationRefused):
        guard.check("http://[::ffff:10.1.1.1]/", allow)


def test_a_malformed_network_in_the_allow_list_is_an_error() -> None:
    with pytest.raises(ValueError, match="not a network"):
        AllowList.of(["10.0.0.0/33"])


def test_the_destination_keeps_the_name_for_host_and_tls_and_the_address_for_the_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        guard, "resolve", lambda host, port: [ipaddress.ip_address("2606:4700::6810:84e5")]
    )
    destination = guard.check("https://hooks.example.test:8443/in?x=1", NOTHING)
    assert destination.host == "hooks.example.test" and destination.port == 8443
    assert destination.host_header == "hooks.example.test:8443"
    assert str(destination.pinned_url) == "https://[2606:4700::6810:84e5]:8443/in?x=1"
    default_port = guard.check("https://hooks.example.test/in", NOTHING)
    assert default_port.host_header == "hooks.example.test"
