"""Property-based API test from the sidecar's own OpenAPI document: with and without the operator
token, no generated request may cause a 5xx or a response outside the documented schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from perseus_profiles import load_example
from perseus_sidecar.api import JobAnnouncement, PodAnnouncement
from perseus_sidecar.app import create_app
from perseus_sidecar.gpu.simulated import SimulatedBackend
from perseus_sidecar.node import Node

from .conftest import JOB_SHA, NAME, NS, OP, make_settings

schemathesis.experimental.OPEN_API_3_1.enable()  # FastAPI emits OpenAPI 3.1
_backend_profile = load_example("gpt3-175b-a100").select_stages((0, 1, 2, 7))


def _make_app(state: Path) -> object:
    backend = SimulatedBackend(_backend_profile, 2, state / "sim", node_name="n1")
    return create_app(make_settings(state / "state"), backend)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> object:
    """The app; schemathesis runs its lifespan around every call (node state persists)."""
    application = _make_app(tmp_path_factory.mktemp("schemathesis"))
    node: Node = application.state.node  # type: ignore[attr-defined]
    node.announce(  # a job exists, so job paths get past 404 sometimes
        NS,
        NAME,
        JobAnnouncement(
            token_sha256=JOB_SHA,
            pods=[PodAnnouncement(namespace=NS, name="p", uid="u", ip="x", host_network=True)],
        ),
    )
    return application


schema = schemathesis.from_pytest_fixture("schema_fixture")


@pytest.fixture(scope="module")
def schema_fixture(app: object) -> object:
    return schemathesis.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_with_operator_token(case: schemathesis.Case) -> None:
    case.headers = {**dict(case.headers or {}), **OP}  # type: ignore[assignment]
    response = case.call()
    case.validate_response(response)


@schema.parametrize()
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_without_token(case: schemathesis.Case) -> None:
    response = case.call()
    case.validate_response(response)
    if case.method.upper() not in ("GET", "HEAD", "OPTIONS"):
        assert response.status_code == 401


def test_node_survives(app: object) -> None:
    node: Node = app.state.node  # type: ignore[attr-defined]
    assert (NS, NAME) in node.jobs or not node.jobs
