"""`image`: a prompt in, 1-4 images out, each stored as an artifact (app/jobs/artifacts.py).

Two providers (docs/images.md):
- `openai`: the Images API (`images.generate`) through the official client, base64 output; the
  job's `model` picks the model (`CONVEYOR_IMAGE_MODEL`, gpt-image-1, by default), and the
  sizes are those the model allows. OpenAI takes no negative prompt, seed or steps: asking
  for them is a 422, not silently ignored.
- `comfyui`: a workflow file (API format) whose nodes get the prompt, negative prompt, size,
  seed, steps and count; ComfyUI's progress messages are the job's progress; a cancel removes
  or interrupts the prompt.

Images reach users only when the job succeeds: an attempt that fails, is canceled or loses its
lease leaves none visible.
"""

from __future__ import annotations

import io
import random
from decimal import Decimal
from typing import Literal, Self

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.config import Settings
from app.jobs.artifacts import SavedArtifact
from app.kinds.base import Admission
from app.kinds.context import JobContext
from app.llm.comfyui import WORKFLOW_NAME, Workflow, WorkflowError, load_workflow
from app.llm.errors import ModelError
from app.llm.images import generate_openai, size_error

NAME = "image"
DESCRIPTION = (
    "Images from a prompt (1-4), through OpenAI's Images API or a ComfyUI workflow; each image "
    "is an artifact (GET /jobs/{id}/artifacts)."
)

MIN_SIDE, MAX_SIDE = 64, 2048
MAX_SEED = 2**53 - 1  # a JSON number every client reads exactly
CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
# The share of the job's progress the provider's own progress covers; storing is the rest.
GENERATION_SHARE = 90.0


class ImageInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=4_000)
    negative_prompt: str | None = Field(None, max_length=4_000)
    width: int = Field(1024, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8, description="pixels")
    height: int = Field(1024, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8, description="pixels")
    steps: int | None = Field(None, ge=1, le=150, description="sampling steps (ComfyUI)")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="ComfyUI; random (and reported) when not given"
    )
    count: int = Field(1, ge=1, le=4, description="images to make")
    provider: Literal["openai", "comfyui"] | None = Field(
        None,
        description="default: `comfyui` when a workflow is named, else CONVEYOR_IMAGE_PROVIDER",
    )
    workflow: str | None = Field(
        None, pattern=WORKFLOW_NAME.pattern, description="a ComfyUI workflow file's name"
    )

    @model_validator(mode="after")
    def _workflow_is_comfyui(self) -> Self:
        if self.workflow is not None and self.provider == "openai":
            raise ValueError("a workflow is run by ComfyUI; leave `provider` out or use comfyui")
        return self

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def provider_for(self, settings: Settings) -> str:
        if self.provider is not None:
            return self.provider
        return "comfyui" if self.workflow is not None else settings.image_provider


Input = ImageInput


class ImageOut(BaseModel):
    artifact_id: str
    name: str
    content_type: str
    size: int
    width: int | None
    height: int | None


class ImageOutput(BaseModel):
    provider: str
    model: str
    workflow: str | None = None
    seed: int | None = Field(None, description="the seed ComfyUI used (for a rerun)")
    gpu_seconds: float | None = Field(None, description="ComfyUI's execution time")
    images: list[ImageOut]


Output = ImageOutput


def admit(job_input: ImageInput, admission: Admission) -> list[tuple[str, str]]:
    """What the provider the job will go to cannot do, found at submit."""
    settings = admission.settings
    if job_input.provider_for(settings) == "openai":
        refused = {
            "negative_prompt": "OpenAI's Images API takes no negative prompt; use ComfyUI",
            "seed": "OpenAI's Images API takes no seed; use ComfyUI",
            "steps": "OpenAI's Images API takes no steps; use ComfyUI",
        }
        errors = [(name, why) for name, why in refused.items() if getattr(job_input, name)]
        if (why := size_error(admission.model, job_input.size)) is not None:
            errors.append(("width", why))
        return errors
    try:
        workflow = _workflow(job_input, settings)
    except WorkflowError as exc:
        return [("workflow", str(exc))]
    return [
        (name, f"the workflow {workflow.name!r} does not map {name!r}")
        for name in ("negative_prompt", "seed", "steps")
        if getattr(job_input, name) is not None and not workflow.accepts(name)
    ]


def run(ctx: JobContext, job_input: ImageInput) -> ImageOutput:
    if job_input.provider_for(ctx.settings) == "comfyui":
        return _run_comfyui(ctx, job_input)
    return _run_openai(ctx, job_input)


def _run_openai(ctx: JobContext, job_input: ImageInput) -> ImageOutput:
    model = ctx.llm.model_for_job()
    try:
        generated = generate_openai(
            ctx.llm.client,
            model=model,
            prompt=job_input.prompt,
            size=job_input.size,
            count=job_input.count,
        )
    except ModelError as exc:
        for record in getattr(exc, "records", ()):
            ctx.llm.record(record)
        raise
    for record in generated.records:
        ctx.llm.record(record)
    ctx.check()  # a cancel during the request takes effect now
    ctx.progress(GENERATION_SHARE, force=True)
    images = _store_all(ctx, generated.images)
    return ImageOutput(provider="openai", model=model, images=images)


def _run_comfyui(ctx: JobContext, job_input: ImageInput) -> ImageOutput:
    settings = ctx.settings
    try:
        workflow = _workflow(job_input, settings)
    except WorkflowError as exc:
        # Checked at submit; a file removed since is the deployment's change, not retryable.
        raise ModelError("model_bad_request", str(exc), retryable=False) from None
    seed = job_input.seed if job_input.seed is not None else random.randrange(MAX_SEED)
    graph = workflow.render(job_input.model_dump() | {"seed": seed})
    client = ctx.llm.client.comfyui
    name = f"workflow:{workflow.name}"
    try:
        result = client.run(
            graph,
            model=name,
            on_progress=lambda done: ctx.progress(GENERATION_SHARE * done),
            interrupted=lambda: ctx.interrupted,
            register_closer=ctx.set_closer,
        )
    except Exception as exc:
        if (record := getattr(exc, "record", None)) is not None:
            ctx.llm.record(record)
        ctx.check()  # Interrupted by a cancel or a lost lease: that is the outcome
        raise
    result.record.fixed_cost = _gpu_cost(result.gpu_seconds, settings)
    ctx.llm.record(result.record)
    ctx.check()
    images = _store_all(ctx, result.images)
    return ImageOutput(
        provider="comfyui",
        model=name,
        workflow=workflow.name,
        seed=seed,
        gpu_seconds=round(result.gpu_seconds, 3),
        images=images,
    )


def _workflow(job_input: ImageInput, settings: Settings) -> Workflow:
    name = job_input.workflow or settings.comfyui_default_workflow
    return load_workflow(name, settings.comfyui_workflows_dir)


def _gpu_cost(gpu_seconds: float, settings: Settings) -> Decimal:
    return Decimal(str(settings.comfyui_usd_per_gpu_second)) * Decimal(str(round(gpu_seconds, 3)))


def _store_all(ctx: JobContext, images: list[bytes]) -> list[ImageOut]:
    stored = []
    for index, data in enumerate(images):
        saved = _store(ctx, index, data)
        stored.append(ImageOut(**saved.reference()))
        share = GENERATION_SHARE + (100 - GENERATION_SHARE) * (index + 1) / len(images)
        ctx.progress(min(99.0, share))
    return stored


def _store(ctx: JobContext, index: int, data: bytes) -> SavedArtifact:
    """Checked to be an image (its type and size read from its own header) before storing."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind, (width, height) = image.format, image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ModelError(
            "model_bad_response", f"image {index + 1} is not an image: {exc}", retryable=True
        ) from exc
    content_type = CONTENT_TYPES.get(kind or "")
    if content_type is None:
        raise ModelError(
            "model_bad_response", f"image {index + 1} is {kind}, not PNG/JPEG/WebP", retryable=True
        )
    extension = content_type.split("/")[1].replace("jpeg", "jpg")
    name = f"image-{index + 1}.{extension}"
    return ctx.save_artifact(name, data, content_type, width=width, height=height)
