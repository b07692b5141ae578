"""Standalone mode: announce the simulated job to its sidecars as the operator would (and withdraw
it afterwards), for runs without the operator. Needs the operator's token."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import httpx

from perseus_sim.spec import NodeSpec, SimulationError

__all__ = ["announce_job", "withdraw_job"]


def _url(node: NodeSpec, namespace: str, job: str) -> str:
    return f"http://{node.host}:{node.port}/v1/jobs/{namespace}/{job}"


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return str(detail)[:300]


def announce_job(
    nodes: Sequence[NodeSpec],
    pods_by_node: Sequence[Sequence[dict[str, object]]],
    *,
    namespace: str,
    job: str,
    job_token: str,
    operator_token: str,
    timeout_s: float = 5.0,
) -> None:
    """PUT the job (its pods on that node and the job token's sha256) to every node's sidecar."""
    digest = hashlib.sha256(job_token.encode()).hexdigest()
    headers = {"Authorization": f"Bearer {operator_token}"}
    with httpx.Client(timeout=timeout_s) as client:
        for node, pods in zip(nodes, pods_by_node, strict=True):
            if not pods:
                continue
            try:
                response = client.put(
                    _url(node, namespace, job),
                    json={"token_sha256": digest, "pods": list(pods)},
                    headers=headers,
                )
            except httpx.HTTPError as exc:
                raise SimulationError(
                    f"cannot reach the sidecar at {node.host}:{node.port}: {exc}"
                ) from None
            if response.status_code not in (200, 201):
                raise SimulationError(
                    f"the sidecar at {node.host}:{node.port} refused the job announcement "
                    f"(HTTP {response.status_code}): {_detail(response)}"
                )


def withdraw_job(
    nodes: Sequence[NodeSpec],
    *,
    namespace: str,
    job: str,
    operator_token: str,
    timeout_s: float = 5.0,
) -> list[str]:
    """DELETE the job from every sidecar (which resets the clocks it locked for it); returns the
    problems met, as the run is over either way."""
    problems = []
    headers = {"Authorization": f"Bearer {operator_token}"}
    with httpx.Client(timeout=timeout_s) as client:
        for node in nodes:
            try:
                response = client.delete(_url(node, namespace, job), headers=headers)
            except httpx.HTTPError as exc:
                problems.append(f"{node.host}:{node.port}: {exc}")
                continue
            if response.status_code not in (204, 404):
                problems.append(
                    f"{node.host}:{node.port}: HTTP {response.status_code} {_detail(response)}"
                )
    return problems
