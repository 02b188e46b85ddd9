"""ComfyUI API-format workflows: what the simulator reads from one, and ComfyUI's refusals.

A workflow is `{node_id: {"class_type": ..., "inputs": {...}}}`, where an input is a value or
a link `[node_id, output_index]`. The simulator runs any node graph that has an output node
(SaveImage, PreviewImage); it reads the sampler (KSampler or KSamplerAdvanced: seed, steps),
the texts wired to the sampler's `positive` and `negative` inputs, the empty latent (width,
height, batch_size) and the outputs' filename prefixes. Every other node just "executes".
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

SEED_INPUTS = {"KSampler": "seed", "KSamplerAdvanced": "noise_seed"}
LATENT_NODES = ("EmptyLatentImage", "EmptySD3LatentImage")
TEXT_NODES = ("CLIPTextEncode",)
# Output node class -> the folder type its images are listed under.
OUTPUT_NODES = {"SaveImage": "output", "PreviewImage": "temp"}
DEFAULT_PREFIX = "ComfyUI"
DEFAULT_SIDE = 512
DEFAULT_STEPS = 20
# ComfyUI allows sides up to 16384 and batches of 4096; the simulator caps both so that one
# prompt cannot make it render for minutes.
SIDE_RANGE = (16, 4096)
BATCH_RANGE = (1, 16)
STEPS_RANGE = (1, 10_000)
SEED_RANGE = (0, 2**64 - 1)
# How far `positive`/`negative` links are followed through other nodes to find the text.
MAX_LINK_HOPS = 16


class WorkflowError(ValueError):
    """A workflow ComfyUI would refuse; `body()` is the 400 it answers with."""

    def __init__(
        self,
        error_type: str,
        message: str,
        details: str = "",
        node_errors: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.details = details
        self.node_errors = node_errors or {}

    def body(self) -> dict[str, Any]:
        error = {"type": self.error_type, "message": str(self), "details": self.details}
        return {"error": {**error, "extra_info": {}}, "node_errors": self.node_errors}


@dataclass(frozen=True)
class Output:
    node_id: str
    folder_type: str  # "output" (SaveImage) or "temp" (PreviewImage)
    prefix: str


@dataclass(frozen=True)
class Workflow:
    nodes: Mapping[str, Any]
    order: tuple[str, ...]  # the nodes the outputs depend on, dependencies first
    outputs: tuple[Output, ...]
    sampler: str | None = None
    positive: str = ""
    negative: str = ""
    seed: int = 0
    steps: int = 0
    width: int = DEFAULT_SIDE
    height: int = DEFAULT_SIDE
    batch_size: int = 1
    checkpoint: str | None = None

    def class_type(self, node_id: str) -> str:
        return str(self.nodes[node_id]["class_type"])


def is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str | int)
        and not isinstance(value[1], bool)
        and isinstance(value[1], int)
    )


def parse_workflow(prompt: Any) -> Workflow:
    """What the simulator needs from a workflow; a WorkflowError if ComfyUI would refuse it."""
    nodes = _checked_nodes(prompt)
    output_ids = [i for i, node in nodes.items() if node["class_type"] in OUTPUT_NODES]
    if not output_ids:
        raise WorkflowError("prompt_no_outputs", "Prompt has no outputs")
    order = _execution_order(nodes, output_ids)
    sampler = next((i for i in order if nodes[i]["class_type"] in SEED_INPUTS), None)
    checks = _Checks(nodes, output_ids)
    outputs = tuple(checks.output(i) for i in output_ids)
    found: dict[str, Any] = {}
    if sampler is not None:
        inputs = nodes[sampler]["inputs"]
        found["positive"] = _text_behind(nodes, inputs.get("positive"))
        found["negative"] = _text_behind(nodes, inputs.get("negative"))
        found["seed"] = checks.integer(
            sampler, SEED_INPUTS[nodes[sampler]["class_type"]], 0, SEED_RANGE
        )
        found["steps"] = checks.integer(sampler, "steps", DEFAULT_STEPS, STEPS_RANGE)
    latent = _latent_node(nodes, order, sampler)
    if latent is not None:
        found["width"] = checks.integer(latent, "width", DEFAULT_SIDE, SIDE_RANGE)
        found["height"] = checks.integer(latent, "height", DEFAULT_SIDE, SIDE_RANGE)
        found["batch_size"] = checks.integer(latent, "batch_size", 1, BATCH_RANGE)
    checks.raise_any()
    checkpoint = next(
        (nodes[i]["inputs"].get("ckpt_name") for i in order if "ckpt_name" in nodes[i]["inputs"]),
        None,
    )
    return Workflow(
        nodes=nodes,
        order=order,
        outputs=outputs,
        sampler=sampler,
        checkpoint=checkpoint if isinstance(checkpoint, str) else None,
        **found,
    )


def _checked_nodes(prompt: Any) -> dict[str, Any]:
    if not isinstance(prompt, Mapping) or not prompt:
        raise WorkflowError("invalid_prompt", "The prompt must be an object of nodes.")
    for node_id, node in prompt.items():
        if not isinstance(node, Mapping) or not isinstance(node.get("class_type"), str):
            raise WorkflowError(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'",
            )
        if not isinstance(node.get("inputs"), Mapping):
            raise WorkflowError(
                "invalid_prompt",
                f"Node {node_id} ({node['class_type']}) has no inputs object.",
                f"Node ID '#{node_id}'",
            )
    return {str(node_id): node for node_id, node in prompt.items()}


def _execution_order(nodes: Mapping[str, Any], output_ids: list[str]) -> tuple[str, ...]:
    """The nodes the outputs depend on, each after the nodes it links to (a depth-first walk
    with its own stack, so a long chain of nodes cannot exhaust Python's recursion)."""
    order: list[str] = []
    done: set[str] = set()
    for output_id in output_ids:
        if output_id in done:
            continue
        stack = [(output_id, _sources(nodes, output_id))]
        visiting = {output_id}
        while stack:
            node_id, sources = stack[-1]
            source = next(sources, None)
            if source is None:
                stack.pop()
                visiting.discard(node_id)
                done.add(node_id)
                order.append(node_id)
            elif source in visiting:
                raise WorkflowError(
                    "invalid_prompt",
                    f"The workflow has a cycle: node {node_id} links back to node {source}.",
                    f"Node ID '#{node_id}'",
                )
            elif source not in done:
                visiting.add(source)
                stack.append((source, _sources(nodes, source)))
    return tuple(order)


def _sources(nodes: Mapping[str, Any], node_id: str) -> Iterator[str]:
    """The ids of the nodes `node_id` links to."""
    for name, value in nodes[node_id]["inputs"].items():
        if not is_link(value):
            continue
        source = str(value[0])
        if source not in nodes:
            raise WorkflowError(
                "invalid_prompt",
                f"Node {node_id} input '{name}' links to node {source}, which does not exist.",
                f"Node ID '#{node_id}'",
            )
        yield source


def _text_behind(nodes: Mapping[str, Any], link: Any) -> str:
    """The text of the CLIPTextEncode a conditioning input comes from, through any nodes in
    between (their first linked input is followed)."""
    for _ in range(MAX_LINK_HOPS):
        if not is_link(link):
            return ""
        node = nodes[str(link[0])]
        text = node["inputs"].get("text")
        if node["class_type"] in TEXT_NODES or isinstance(text, str):
            return text if isinstance(text, str) else ""
        link = next((value for value in node["inputs"].values() if is_link(value)), None)
    return ""


def _latent_node(
    nodes: Mapping[str, Any], order: tuple[str, ...], sampler: str | None
) -> str | None:
    if sampler is not None:
        link = nodes[sampler]["inputs"].get("latent_image")
        if is_link(link) and nodes[str(link[0])]["class_type"] in LATENT_NODES:
            return str(link[0])
    return next((i for i in order if nodes[i]["class_type"] in LATENT_NODES), None)


@dataclass
class _Checks:
    """Input checks that, like ComfyUI's, gather every bad value before refusing."""

    nodes: Mapping[str, Any]
    output_ids: list[str]
    errors: dict[str, Any] = field(default_factory=dict)

    def integer(self, node_id: str, name: str, default: int, bounds: tuple[int, int]) -> int:
        value = self.nodes[node_id]["inputs"].get(name, default)
        if is_link(value):  # fed by another node (a primitive): its value is not known here
            return default
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole:
            self.fail(
                node_id,
                "invalid_input_type",
                "Failed to convert an input value to a INT value",
                f"{name}, {value!r}",
            )
            return default
        low, high = bounds
        if value < low:
            self.fail(
                node_id,
                "value_smaller_than_min",
                f"Value {value} smaller than min of {low}",
                f"{name}",
            )
        elif value > high:
            self.fail(
                node_id,
                "value_bigger_than_max",
                f"Value {value} bigger than max of {high}",
                f"{name}",
            )
        return int(value)

    def output(self, node_id: str) -> Output:
        class_type = self.nodes[node_id]["class_type"]
        prefix = self.nodes[node_id]["inputs"].get("filename_prefix", DEFAULT_PREFIX)
        if class_type == "PreviewImage":
            prefix = "ComfyUI_temp"
        if not isinstance(prefix, str) or not prefix.strip():
            prefix = DEFAULT_PREFIX
        if posixpath.isabs(prefix) or ".." in prefix.split("/"):
            self.fail(
                node_id,
                "value_not_valid",
                "Saving image outside the output folder is not allowed.",
                f"filename_prefix, {prefix!r}",
            )
        return Output(node_id, OUTPUT_NODES[class_type], prefix)

    def fail(self, node_id: str, error_type: str, message: str, details: str) -> None:
        entry = self.errors.setdefault(
            node_id,
            {
                "errors": [],
                "dependent_outputs": self.output_ids,
                "class_type": self.nodes[node_id]["class_type"],
            },
        )
        entry["errors"].append(
            {"type": error_type, "message": message, "details": details, "extra_info": {}}
        )

    def raise_any(self) -> None:
        if self.errors:
            raise WorkflowError(
                "prompt_outputs_failed_validation",
                "Prompt outputs failed validation",
                node_errors=self.errors,
            )
