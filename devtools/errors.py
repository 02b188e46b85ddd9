"""The errors of the dev servers."""

from __future__ import annotations


class ServiceError(RuntimeError):
    """A dev service could not be located, started or stopped."""


class PortInUseError(ServiceError):
    """Another process holds the port; retried on a fresh port if we picked it."""
