"""Webhooks: a tenant's endpoints, the signing secret of jobs' own webhooks, and the delivery
log with redelivery (docs/webhooks.md). Every query is scoped to the caller: another owner's
endpoint or delivery is a 404."""

from __future__ import annotations

import uuid

from flask import Blueprint, Response

from app.api.auth import current_principal
from app.api.destinations import webhook_refusal
from app.api.jobs import PREFIX, owned_job
from app.api.pages import keyset_page
from app.api.problems import ApiProblem, field_problem
from app.api.schemas import (
    WebhookDeliveriesQuery,
    WebhookDeliveryOut,
    WebhookDeliveryPage,
    WebhookEndpointCreate,
    WebhookEndpointCreated,
    WebhookEndpointList,
    WebhookEndpointOut,
    WebhookEndpointUpdate,
    WebhookSecretOut,
)
from app.api.spec import json_response, operation
from app.jobs import webhooks
from app.models import WebhookDelivery, WebhookEndpoint
from app.runtime import runtime

bp = Blueprint("webhooks", __name__)
TAG = "webhooks"


def _checked_url(url: str, field: str = "url") -> str:
    if (refused := webhook_refusal(url)) is not None:
        raise field_problem(field, refused)
    return url


@bp.post("/webhooks")
@operation(
    summary="Create a webhook endpoint",
    tag=TAG,
    body=WebhookEndpointCreate,
    responses={201: (WebhookEndpointCreated, "Created; its secret is shown this once")},
)
def create_webhook(body: WebhookEndpointCreate) -> Response:
    """Every event of your jobs that `events` names is POSTed to `url`, signed with the
    endpoint's own secret, which this answer shows once. The URL must reach a public address
    (422 naming `url` otherwise); CONVEYOR_WEBHOOK_MAX_ENDPOINTS endpoints at most."""
    url = _checked_url(body.url)
    limit = runtime().settings.webhook_max_endpoints
    try:
        with runtime().db.transaction() as session:
            endpoint = webhooks.create_endpoint(
                session, current_principal().owner, url, body.events, body.description, limit
            )
    except webhooks.EndpointLimitReached as exc:
        raise ApiProblem(
            422, "webhook-endpoint-limit", "Too many webhook endpoints", str(exc)
        ) from None
    out = WebhookEndpointCreated(
        **WebhookEndpointOut.of(endpoint, PREFIX).model_dump(), secret=endpoint.secret
    )
    return json_response(out, 201, {"Location": out.links.self})


@bp.get("/webhooks")
@operation(
    summary="List webhook endpoints",
    tag=TAG,
    responses={200: (WebhookEndpointList, "Oldest first")},
)
def list_webhooks() -> Response:
    found = webhooks.list_endpoints(runtime().db.request_session, current_principal().owner)
    return json_response(
        WebhookEndpointList(items=[WebhookEndpointOut.of(e, PREFIX) for e in found])
    )


@bp.get("/webhooks/<uuid:endpoint_id>")
@operation(
    summary="Get a webhook endpoint",
    tag=TAG,
    responses={200: (WebhookEndpointOut, "The endpoint (without its secret)")},
)
def get_webhook(endpoint_id: uuid.UUID) -> Response:
    return json_response(WebhookEndpointOut.of(_owned_endpoint(endpoint_id), PREFIX))


@bp.patch("/webhooks/<uuid:endpoint_id>")
@operation(
    summary="Change a webhook endpoint",
    tag=TAG,
    body=WebhookEndpointUpdate,
    responses={200: (WebhookEndpointOut, "The endpoint as changed")},
)
def update_webhook(endpoint_id: uuid.UUID, body: WebhookEndpointUpdate) -> Response:
    """Changes its URL, events, description or whether it is enabled; a disabled endpoint
    gets no new deliveries. Deliveries made before keep the URL they were made for."""
    changes = body.model_dump(exclude_unset=True)
    for name in ("url", "events", "enabled"):
        if name in changes and changes[name] is None:
            raise field_problem(name, "must not be null")
    if "url" in changes:
        _checked_url(changes["url"])
    with runtime().db.transaction() as session:
        endpoint = webhooks.get_endpoint(session, current_principal().owner, endpoint_id)
        if endpoint is None:
            raise _not_found("webhook endpoint", endpoint_id)
        webhooks.update_endpoint(endpoint, changes)
    return json_response(WebhookEndpointOut.of(endpoint, PREFIX))


@bp.delete("/webhooks/<uuid:endpoint_id>")
@operation(
    summary="Delete a webhook endpoint",
    tag=TAG,
    responses={204: (None, "Deleted, with its deliveries and their log")},
)
def delete_webhook(endpoint_id: uuid.UUID) -> Response:
    with runtime().db.transaction() as session:
        endpoint = webhooks.get_endpoint(session, current_principal().owner, endpoint_id)
        if endpoint is None:
            raise _not_found("webhook endpoint", endpoint_id)
        session.delete(endpoint)
    return Response(status=204)


@bp.get("/webhooks/<uuid:endpoint_id>/deliveries")
@operation(
    summary="List an endpoint's deliveries",
    tag=TAG,
    query=WebhookDeliveriesQuery,
    responses={200: (WebhookDeliveryPage, "Newest first, keyset-paginated, with their attempts")},
)
def list_webhook_deliveries(endpoint_id: uuid.UUID, query: WebhookDeliveriesQuery) -> Response:
    endpoint = _owned_endpoint(endpoint_id)
    session = runtime().db.request_session
    page, next_cursor = keyset_page(
        query.cursor,
        query.limit,
        lambda n, before: webhooks.deliveries_of_endpoint(session, endpoint.id, n, before),
    )
    return json_response(WebhookDeliveryPage(items=_deliveries_out(page), next_cursor=next_cursor))


@bp.get("/jobs/<uuid:job_id>/webhook-deliveries")
@operation(
    summary="List a job's webhook deliveries",
    tag=TAG,
    responses={200: (WebhookDeliveryPage, "Oldest first, with their attempts")},
)
def list_job_webhook_deliveries(job_id: uuid.UUID) -> Response:
    """Every delivery of the job's events: to its own webhook and to your endpoints."""
    job = owned_job(job_id)
    found = webhooks.deliveries_of_job(runtime().db.request_session, job.owner, job.id)
    return json_response(WebhookDeliveryPage(items=_deliveries_out(found)))


@bp.get("/webhook-deliveries/<uuid:delivery_id>")
@operation(
    summary="Get a webhook delivery",
    tag=TAG,
    responses={200: (WebhookDeliveryOut, "The delivery, with its attempts")},
)
def get_webhook_delivery(delivery_id: uuid.UUID) -> Response:
    session = runtime().db.request_session
    delivery = webhooks.get_delivery(session, current_principal().owner, delivery_id)
    if delivery is None:
        raise _not_found("webhook delivery", delivery_id)
    return json_response(_deliveries_out([delivery])[0])


@bp.post("/webhook-deliveries/<uuid:delivery_id>/redeliver")
@operation(
    summary="Redeliver a webhook delivery",
    tag=TAG,
    responses={
        202: (WebhookDeliveryOut, "Due again: the same webhook-id and body, a new retry window"),
        409: (None, "The delivery is still being tried"),
    },
)
def redeliver_webhook(delivery_id: uuid.UUID) -> Response:
    """Sends a delivery that succeeded or gave up again, exactly as it was (same
    `webhook-id`, same body, a fresh signature), with retries for another window."""
    try:
        with runtime().db.transaction() as session:
            delivery = webhooks.redeliver(session, current_principal().owner, delivery_id)
    except webhooks.DeliveryPending as exc:
        raise ApiProblem(
            409, "webhook-delivery-pending", "Delivery in progress", str(exc)
        ) from None
    if delivery is None:
        raise _not_found("webhook delivery", delivery_id)
    out = _deliveries_out([delivery])[0]
    return json_response(out, 202, {"Location": out.links.self})


@bp.get("/webhook-secret")
@operation(
    summary="Get the signing secret of your jobs' webhooks",
    tag=TAG,
    responses={200: (WebhookSecretOut, "The secret, made on first use")},
)
def get_webhook_secret() -> Response:
    """The secret that signs the webhooks of single jobs (`webhook` on `POST /jobs`); an
    endpoint has its own. Made the first time it is asked for or needed."""
    with runtime().db.transaction() as session:
        secret = webhooks.tenant_secret(session, current_principal().owner)
    return json_response(WebhookSecretOut(secret=secret))


@bp.post("/webhook-secret/rotate")
@operation(
    summary="Rotate the signing secret of your jobs' webhooks",
    tag=TAG,
    responses={200: (WebhookSecretOut, "The new secret, which signs every attempt from now")},
)
def rotate_webhook_secret() -> Response:
    with runtime().db.transaction() as session:
        secret = webhooks.rotate_tenant_secret(session, current_principal().owner)
    return json_response(WebhookSecretOut(secret=secret))


def _deliveries_out(deliveries: list[WebhookDelivery]) -> list[WebhookDeliveryOut]:
    session = runtime().db.request_session
    attempts = webhooks.attempts_of(session, [delivery.id for delivery in deliveries])
    return [
        WebhookDeliveryOut.of(
            delivery, attempts[delivery.id], PREFIX, webhooks.message_id(delivery.id)
        )
        for delivery in deliveries
    ]


def _owned_endpoint(endpoint_id: uuid.UUID) -> WebhookEndpoint:
    session = runtime().db.request_session
    endpoint = webhooks.get_endpoint(session, current_principal().owner, endpoint_id)
    if endpoint is None:
        raise _not_found("webhook endpoint", endpoint_id)
    return endpoint


def _not_found(what: str, id_: uuid.UUID) -> ApiProblem:
    return ApiProblem(404, "not-found", "Not found", f"no {what} {id_}")
