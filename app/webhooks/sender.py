"""One attempt to deliver a webhook: a POST to the address the guard checked, never to the
name again (no DNS rebinding), no redirects followed, bounded in time and in what it reads."""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from functools import lru_cache

import httpx

from app.webhooks.guard import Destination

USER_AGENT = "Conveyor-Webhooks/1"


@dataclass(frozen=True)
class Limits:
    connect_timeout: float
    timeout: float  # the whole attempt, response included
    response_max_bytes: int


@dataclass(frozen=True)
class Answer:
    """What came back: a status (None when no response arrived), the start of the body, and
    an error when the attempt failed before or while reading."""

    status_code: int | None
    body: str
    error: str | None
    duration_ms: float

    @property
    def delivered(self) -> bool:
        code = self.status_code
        return self.error is None and code is not None and 200 <= code < 300


@lru_cache(maxsize=1)
def _tls() -> ssl.SSLContext:
    # Loading the CA bundle costs milliseconds; one context serves every attempt.
    return httpx.create_ssl_context()


def post(destination: Destination, body: str, headers: dict[str, str], limits: Limits) -> Answer:
    """POSTs `body` to `destination.address`, with the URL's host in the Host header and, for
    https, in TLS (server name and certificate check). A redirect is an answer like any other
    non-2xx: not followed. At most `response_max_bytes` of the response are read."""
    started = time.monotonic()
    deadline = started + limits.timeout
    timeout = httpx.Timeout(limits.timeout, connect=limits.connect_timeout)
    request_headers = {
        **headers,
        "Host": destination.host_header,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }
    extensions = {"sni_hostname": destination.host} if destination.url.scheme == "https" else {}
    status, received, error = None, b"", None
    # A client per attempt and no keep-alive: a pooled connection is keyed by address, and
    # must not carry one host's TLS session to another host on the same address. No proxy
    # from the environment either: it would resolve the name itself.
    with httpx.Client(
        follow_redirects=False, timeout=timeout, trust_env=False, verify=_tls()
    ) as client:
        try:
            with client.stream(
                "POST",
                destination.pinned_url,
                content=body.encode(),
                headers=request_headers,
                extensions=extensions,
            ) as response:
                status = response.status_code
                received = _read_capped(response, limits.response_max_bytes, deadline)
        except TimeoutError as exc:
            error = f"timeout: {exc}"
        except httpx.TimeoutException as exc:
            error = f"timeout: {type(exc).__name__}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
    duration_ms = (time.monotonic() - started) * 1000
    return Answer(status, received.decode("utf-8", "replace"), error, round(duration_ms, 1))


def _read_capped(response: httpx.Response, cap: int, deadline: float) -> bytes:
    """At most `cap` bytes of the body, before `deadline`; the rest is never read (closing the
    response drops the connection)."""
    received = bytearray()
    if cap == 0:
        return b""
    for chunk in response.iter_raw():
        received += chunk
        if len(received) >= cap:
            break
        if time.monotonic() > deadline:
            raise TimeoutError("the response took longer than the attempt may")
    return bytes(received[:cap])
