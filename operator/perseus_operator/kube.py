"""Kubernetes API calls the operator makes besides kopf's watches (kubernetes_asyncio).

Status patches, the per-policy job-token Secret, profile ConfigMaps. Every call here is one
request; the controller decides when to make it.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Mapping
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from perseus_operator.model import GROUP, KIND, PLURAL, VERSION

__all__ = [
    "Kube",
    "job_secret_name",
    "profile_configmap_name",
]

MERGE_PATCH = "application/merge-patch+json"
TOKEN_KEY = "token"
PROFILE_KEY = "profile.csv"
BLOCKING_ANNOTATION = "perseus.dev/blocking-power-w"


def job_secret_name(policy: str) -> str:
    return f"perseus-job-{policy}"[:253]


def _label_value(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")
    return cleaned[:63].strip("-_.") or "unknown"


def profile_configmap_name(
    scope: str, gpu_model: str, stages: int, tensor_parallel: int, key: str
) -> str:
    """Deterministic, so a lookup is one GET: the hash covers every part of the key, the scope
    (the policy's namespace, or `CLUSTER_SCOPE`) first."""
    text = f"{scope}|{gpu_model}|{stages}|{tensor_parallel}|{key}"
    return f"perseus-profile-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


class Kube:
    """A thin async facade over the API calls the controller needs."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    @classmethod
    async def connect(cls) -> Kube:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            await config.load_kube_config()
        return cls(client.ApiClient())

    async def close(self) -> None:
        await self.api.close()

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        await self.custom.patch_namespaced_custom_object_status(  # type: ignore[call-arg]
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": dict(status)},
            _content_type=MERGE_PATCH,
        )

    async def ensure_job_token(self, namespace: str, policy: str, policy_uid: str) -> str:
        """The policy's job token: read from its Secret, created (owned by the policy, so it
        goes with it) when missing. Training pods mount this Secret optionally."""
        name = job_secret_name(policy)
        try:
            secret = await self.core.read_namespaced_secret(name, namespace)
            data = (secret.data or {}).get(TOKEN_KEY)
            if data:
                return base64.b64decode(data).decode()
        except ApiException as exc:
            if exc.status != 404:
                raise
            secret = None
        token = secrets.token_urlsafe(32)
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=name,
                namespace=namespace,
                labels={"app.kubernetes.io/managed-by": "perseus-operator"},
                owner_references=[
                    client.V1OwnerReference(
                        api_version=f"{GROUP}/{VERSION}",
                        kind=KIND,
                        name=policy,
                        uid=policy_uid,
                        controller=True,
                    )
                ],
            ),
            type="Opaque",
            string_data={TOKEN_KEY: token},
        )
        if secret is None:
            try:
                await self.core.create_namespaced_secret(namespace, body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                return await self.ensure_job_token(namespace, policy, policy_uid)
        else:
            await self.core.patch_namespaced_secret(name, namespace, body)
        return token

    async def read_configmap_key(self, namespace: str, name: str, key: str) -> str | None:
        """The key's text, or None when the ConfigMap or the key does not exist."""
        try:
            cm = await self.core.read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        value = (cm.data or {}).get(key)
        return str(value) if value is not None else None

    async def store_profile(
        self,
        namespace: str,
        *,
        scope: str,
        gpu_model: str,
        stages: int,
        tensor_parallel: int,
        key: str,
        csv_text: str,
        source: str,
        blocking_power_w: float | None = None,
    ) -> str:
        """Create or replace the profile ConfigMap for this key; returns its name."""
        name = profile_configmap_name(scope, gpu_model, stages, tensor_parallel, key)
        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(
                name=name,
                namespace=namespace,
                labels={
                    "app.kubernetes.io/managed-by": "perseus-operator",
                    "perseus.dev/gpu-model": _label_value(gpu_model),
                    "perseus.dev/stages": str(stages),
                    "perseus.dev/tensor-parallel": str(tensor_parallel),
                    "perseus.dev/profile-key": _label_value(key),
                    "perseus.dev/profile-scope": _label_value(scope),
                },
                annotations={
                    "perseus.dev/gpu-model": gpu_model,
                    "perseus.dev/source": source,
                    **(
                        {BLOCKING_ANNOTATION: f"{blocking_power_w:.3f}"}
                        if blocking_power_w is not None
                        else {}
                    ),
                },
            ),
            data={PROFILE_KEY: csv_text},
        )
        try:
            await self.core.create_namespaced_config_map(namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            await self.core.replace_namespaced_config_map(name, namespace, body)
        return name

    async def load_profile(
        self,
        namespace: str,
        *,
        scope: str,
        gpu_model: str,
        stages: int,
        tensor_parallel: int,
        key: str,
    ) -> tuple[str, str, float | None] | None:
        """(ConfigMap name, CSV text, measured blocking power) of a stored profile, or None."""
        name = profile_configmap_name(scope, gpu_model, stages, tensor_parallel, key)
        try:
            cm = await self.core.read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        text = (cm.data or {}).get(PROFILE_KEY)
        if text is None:
            return None
        raw = (cm.metadata.annotations or {}).get(BLOCKING_ANNOTATION)
        try:
            blocking_w = float(raw) if raw is not None else None
        except ValueError:
            blocking_w = None
        return name, str(text), blocking_w
