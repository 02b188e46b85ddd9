"""The registry of job kinds. A kind is one module: `Input`, `Output`, `run(ctx, input)`, and
`STEPS` when it runs in checkpointed steps (docs/kinds.md).

Adding a kind is adding a module and a line here; the API, events and docs pick it up.
"""

from __future__ import annotations

from app.kinds import article, canvas, character_card, chat, image, structured
from app.kinds.base import Kind, KindError, Step

KINDS: dict[str, Kind] = {
    module.NAME: Kind(
        module.NAME,
        module.DESCRIPTION,
        module.Input,
        module.Output,
        module.run,
        getattr(module, "STEPS", ()),
        getattr(module, "admit", None),
        getattr(module, "batch_request", None),
        getattr(module, "batch_result", None),
    )
    for module in (chat, structured, article, character_card, image, canvas)
}


def get_kind(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise KindError(f"unknown kind {name!r}; known kinds: {', '.join(sorted(KINDS))}") from None


__all__ = ["KINDS", "Kind", "KindError", "Step", "get_kind"]
