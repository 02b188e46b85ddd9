"""Conveyor's OpenAI-compatible model simulator: offline endpoint, test peer, fault injector.

Run it with `python -m app.sim --port 8100` (see `python -m app.sim --help`), or from tests
with `devtools.simprocess.SimulatorProcess`. It speaks:

- `GET /v1/models` and `POST /v1/chat/completions` (streamed or not, `response_format`
  json_object / json_schema, `max_tokens` / `max_completion_tokens`, usage).
- `POST /v1/images/generations`: deterministic PNGs, sizes checked per model.
- The Batch API: `POST /v1/files`, `GET /v1/files/{id}[/content]`, `POST /v1/batches`,
  `GET /v1/batches[/{id}]`, `POST /v1/batches/{id}/cancel`, with batches that progress over
  time, expire or fail on request (see app/sim/batches.py).
- ComfyUI's API at the root: `POST /prompt`, `GET /ws`, `GET /history`, `GET /view`,
  `POST /interrupt`, `GET|POST /queue` (see app/sim/comfy.py).
- Admin: `GET /_sim/stats`, `POST /_sim/reset`, `GET|POST /_sim/config`, `GET /_sim/batches`.

Answers are deterministic: a function of the request's messages (or of an image's prompt and
seed) only. Per-request knobs go in the last user message (or the image prompt) as
`[[sim fault=429 times=2 retry_after=1 ttft=0.5 tps=50 tokens=40 duration=2]]` (any subset),
or as headers `X-Sim-Fault`, `X-Sim-Times`, ... (the message wins). Faults: 429, 500, 400, 401,
hang, drop, malformed, invalid_json, schema_mismatch, execution_error (ComfyUI prompts), and
`none` to opt out of the run's random faults (`--faults "429=0.05,500=0.02"`). A fault that
does not apply to an endpoint is ignored there.
"""

from app.sim.config import SimConfig
from app.sim.directives import Directives, parse_directive_text, parse_headers
from app.sim.faults import FAULT_KINDS, FaultRates
from app.sim.server import MODEL_IDS, make_app

__all__ = [
    "FAULT_KINDS",
    "MODEL_IDS",
    "Directives",
    "FaultRates",
    "SimConfig",
    "make_app",
    "parse_directive_text",
    "parse_headers",
]
