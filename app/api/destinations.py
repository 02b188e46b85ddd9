"""The SSRF guard at the door: a webhook URL is checked when it is given (a job's `webhook`,
an endpoint's `url`), so a refused one is a 422 naming the field. Workers check it again
before every attempt (app/jobs/webhooks.py)."""

from __future__ import annotations

from app.runtime import runtime
from app.webhooks import guard


def webhook_refusal(url: str) -> str | None:
    """Why `url` may not receive webhooks, or None. Resolves its host."""
    try:
        guard.check(url, guard.AllowList.of(runtime().settings.webhook_allowed_networks))
    except guard.DestinationRefused as exc:
        return str(exc)
    return None
