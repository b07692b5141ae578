"""The shipped examples are valid: the policies parse, and the PyTorchJob's pods carry what the
hooks need (downward-API address and identity, the optional job-token mount)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from perseus_operator.kube import job_secret_name
from perseus_operator.model import parse_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def test_demo_policy_parses() -> None:
    (policy,) = docs("energypolicy-demo.yaml")
    spec = parse_spec(policy["spec"])
    assert spec.pipeline.ranks == 8 and spec.profile.import_ is not None


def test_pytorchjob_pods_have_the_hook_environment() -> None:
    policy, job = docs("pytorchjob.yaml")
    spec = parse_spec(policy["spec"])
    assert spec.pipeline.ranks == 512 and spec.profile.measure is not None
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]
        assert spec.selector.matches(pod["metadata"]["labels"])
        (container,) = pod["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["PERSEUS_SIDECAR_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
        assert env["PERSEUS_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["PERSEUS_POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.namespace"
        )
        (volume,) = pod["spec"]["volumes"]
        assert volume["secret"] == {
            "secretName": job_secret_name(policy["metadata"]["name"]),
            "optional": True,
        }
        (mount,) = container["volumeMounts"]
        assert mount["mountPath"] + "/token" == env["PERSEUS_JOB_TOKEN_FILE"]["value"]
