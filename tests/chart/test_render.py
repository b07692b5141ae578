"""What the chart renders: security posture, placement, wiring.

Marked e2e because helm arrives with the control-plane build (scripts/cluster.sh build), which
CI runs in its e2e stage; no cluster is contacted. Skipped where helm is absent."""

from __future__ import annotations

import importlib
import os
import subprocess
from typing import Any

import pytest
import yaml

from tests.chart._scripts import CHART, helm_binary, helm_template

HELM = helm_binary()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(HELM is None, reason="helm not found: run scripts/cluster.sh build"),
]

Obj = dict[str, Any]


def render_all(*args: str) -> list[Obj]:
    """Every rendered object, in order."""
    assert HELM is not None
    return [d for d in yaml.safe_load_all(helm_template(HELM, *args)) if d]


def render(*args: str) -> dict[str, Obj]:
    """Rendered objects keyed "Kind/name" (names are unique per kind outside RoleBindings)."""
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in render_all(*args)}


def pod_spec(objs: dict[str, Obj], key: str) -> Obj:
    spec: Obj = objs[key]["spec"]["template"]["spec"]
    return spec


def container(objs: dict[str, Obj], key: str) -> Obj:
    first: Obj = pod_spec(objs, key)["containers"][0]
    return first


@pytest.fixture(scope="module")
def default() -> dict[str, Obj]:
    return render()


def test_operator_is_one_non_root_read_only_replica_replaced_not_rolled(
    default: dict[str, Obj],
) -> None:
    dep = default["Deployment/perseus-operator"]
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = pod_spec(default, "Deployment/perseus-operator")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    ctr = container(default, "Deployment/perseus-operator")
    assert ctr["command"] == ["perseus-operator"]
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
    assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
    assert ctr["securityContext"]["capabilities"]["drop"] == ["ALL"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert ctr[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_sidecar_gets_sys_admin_only_and_privilege_only_by_opt_in(
    default: dict[str, Obj],
) -> None:
    ctx = container(default, "DaemonSet/perseus-sidecar")["securityContext"]
    assert ctx["privileged"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN"]}
    assert ctx["readOnlyRootFilesystem"] is True
    opted = container(render("--set", "sidecar.privileged=true"), "DaemonSet/perseus-sidecar")
    assert opted["securityContext"]["privileged"] is True
    assert "capabilities" not in opted["securityContext"]


def test_sidecar_lands_on_gpu_nodes_and_is_reachable_on_host_ports(
    default: dict[str, Obj],
) -> None:
    ds = default["DaemonSet/perseus-sidecar"]
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    pod = pod_spec(default, "DaemonSet/perseus-sidecar")
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert pod["automountServiceAccountToken"] is False
    assert "runtimeClassName" not in pod and "priorityClassName" not in pod
    ctr = container(default, "DaemonSet/perseus-sidecar")
    assert ctr["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert ctr["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {p["name"]: (p["containerPort"], p["hostPort"]) for p in ctr["ports"]}
    assert ports == {"http": (8080, 8080), "events": (8081, 8081)}
    # The operator takes only this DaemonSet's pods as sidecars, on the configured port (a pod
    # annotation naming a port is never read).
    operator_env = default["ConfigMap/perseus-operator"]["data"]
    assert operator_env["PERSEUS_OPERATOR_SIDECAR_DAEMONSET"] == "perseus-sidecar"
    assert operator_env["PERSEUS_OPERATOR_SIDECAR_PORT"] == "8080"
    annotations = default["DaemonSet/perseus-sidecar"]["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert "perseus.dev/port" not in annotations
    env = {e["name"]: e for e in ctr["env"]}
    assert env["PERSEUS_SIDECAR_NODE_NAME"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "spec.nodeName"}
    }
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    state = next(v for v in pod["volumes"] if v["name"] == "state")
    assert state["hostPath"] == {"path": "/var/lib/perseus", "type": "DirectoryOrCreate"}


def test_runtime_and_priority_class_are_values() -> None:
    objs = render(
        "--set",
        "sidecar.runtimeClassName=nvidia",
        "--set",
        "sidecar.priorityClassName=system-node-critical",
        "--set",
        "sidecar.port=9090",
    )
    pod = pod_spec(objs, "DaemonSet/perseus-sidecar")
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["priorityClassName"] == "system-node-critical"
    http = container(objs, "DaemonSet/perseus-sidecar")["ports"][0]
    assert (http["containerPort"], http["hostPort"]) == (9090, 9090)
    assert objs["ConfigMap/perseus-sidecar"]["data"]["PERSEUS_SIDECAR_PORT"] == "9090"


def test_operator_token_is_mounted_in_both_at_the_contract_path(default: dict[str, Obj]) -> None:
    for key in ("Deployment/perseus-operator", "DaemonSet/perseus-sidecar"):
        mounts = {m["name"]: m for m in container(default, key)["volumeMounts"]}
        assert mounts["operator-token"]["mountPath"] == "/var/run/perseus/operator-token"
        volumes = {v["name"]: v for v in pod_spec(default, key)["volumes"]}
        assert volumes["operator-token"]["secret"]["secretName"] == "perseus-operator-token"
    assert "token" in default["Secret/perseus-operator-token"]["data"]
    existing = render("--set", "operatorToken.existingSecret=site-token")
    assert "Secret/perseus-operator-token" not in existing
    volumes = pod_spec(existing, "DaemonSet/perseus-sidecar")["volumes"]
    assert {"secretName": "site-token"} in [v.get("secret") for v in volumes]


def test_a_config_change_changes_the_checksum_annotation(default: dict[str, Obj]) -> None:
    def checksum(objs: dict[str, Obj], key: str) -> str:
        value: str = objs[key]["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return value

    changed = render("--set", "operator.logLevel=debug", "--set", "sidecar.gpuBackend=simulated")
    for key in ("Deployment/perseus-operator", "DaemonSet/perseus-sidecar"):
        assert checksum(default, key) != checksum(changed, key)


def test_rbac_grants_status_apart_and_nothing_broad(default: dict[str, Obj]) -> None:
    rules = default["ClusterRole/perseus-operator"]["rules"]
    by_resource = {r: set(rule["verbs"]) for rule in rules for r in rule["resources"]}
    assert by_resource["energypolicies/status"] == {"get", "patch", "update"}
    assert "update" not in by_resource["energypolicies"]
    assert "delete" not in by_resource["energypolicies"]
    assert by_resource["secrets"] == {"get", "create", "patch"}
    assert by_resource["pods"] == {"get", "list", "watch"}
    every = [v for rule in rules for v in rule["verbs"]] + [
        r for rule in rules for r in rule["resources"]
    ]
    assert "*" not in every


def test_watched_namespaces_get_role_bindings_instead_of_a_cluster_binding() -> None:
    args = ("--set", "operator.watchNamespaces={team-a,team-b}")
    objs = render(*args)
    assert "ClusterRoleBinding/perseus-operator" not in objs
    bindings = [
        o
        for o in render_all(*args)
        if o["kind"] == "RoleBinding" and o["roleRef"]["name"] == "perseus-operator"
    ]
    namespaces = ["perseus-system", "team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == namespaces
    served = objs["ConfigMap/perseus-operator"]["data"]["PERSEUS_OPERATOR_NAMESPACES"]
    assert sorted(served.split(",")) == namespaces
    assert render()["ConfigMap/perseus-operator"]["data"]["PERSEUS_OPERATOR_NAMESPACES"] == ""


def test_service_monitor_only_when_its_api_exists() -> None:
    assert not any(k.startswith("ServiceMonitor/") for k in render())
    objs = render("--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")
    assert "ServiceMonitor/perseus-sidecar" in objs


def test_network_policies_are_optional() -> None:
    assert not any(k.startswith("NetworkPolicy/") for k in render())
    objs = render("--set", "networkPolicy.enabled=true")
    ingress = objs["NetworkPolicy/perseus-sidecar"]["spec"]["ingress"][0]
    assert sorted(p["port"] for p in ingress["ports"]) == [8080, 8081]


def test_selectors_never_carry_the_chart_version(default: dict[str, Obj]) -> None:
    for key in ("Deployment/perseus-operator", "DaemonSet/perseus-sidecar"):
        selector = default[key]["spec"]["selector"]["matchLabels"]
        assert "helm.sh/chart" not in selector
        assert selector.items() <= default[key]["spec"]["template"]["metadata"]["labels"].items()


def test_crd_keep_policy_is_a_value() -> None:
    crd = render("--set", "crds.keep=false")["CustomResourceDefinition/energypolicies.perseus.dev"]
    assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})
    assert not any(
        k.startswith("CustomResourceDefinition/") for k in render("--set", "crds.install=false")
    )


def _rendered_env(objs: dict[str, Obj], workload: str, configmap: str) -> dict[str, str]:
    """The literal environment a container gets: its ConfigMap (envFrom) plus plain env values;
    downward-API values are stood in for by a sample."""
    env: dict[str, str] = dict(objs[configmap]["data"])
    for item in container(objs, workload)["env"]:
        env[item["name"]] = item.get("value", "from-downward-api")
    return env


@pytest.mark.parametrize(
    ("workload", "configmap", "prefix", "settings_module"),
    [
        (
            "Deployment/perseus-operator",
            "ConfigMap/perseus-operator",
            "PERSEUS_OPERATOR_",
            "perseus_operator.settings",
        ),
        (
            "DaemonSet/perseus-sidecar",
            "ConfigMap/perseus-sidecar",
            "PERSEUS_SIDECAR_",
            "perseus_sidecar.settings",
        ),
    ],
)
def test_every_rendered_setting_is_one_the_component_reads(
    default: dict[str, Obj],
    monkeypatch: pytest.MonkeyPatch,
    workload: str,
    configmap: str,
    prefix: str,
    settings_module: str,
) -> None:
    settings_cls = importlib.import_module(settings_module).Settings
    env = _rendered_env(default, workload, configmap)
    ours = {k: v for k, v in env.items() if k.startswith(prefix)}
    unknown = [k for k in ours if k[len(prefix) :].lower() not in settings_cls.model_fields]
    assert unknown == [], f"{workload} sets variables {settings_module} ignores"
    for key in [k for k in os.environ if k.startswith(prefix)]:
        monkeypatch.delenv(key)
    for key, value in ours.items():
        monkeypatch.setenv(key, value)
    settings = settings_cls()
    assert str(settings.token_file) == "/var/run/perseus/operator-token/token"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("sidecar.gpuBackend=cuda", 'must be one of the following: "nvml", "simulated"'),
        ("sidecar.privilegd=true", "Additional property privilegd is not allowed"),
        ("sidecar.port=70000", "sidecar.port"),
        ("operator.watchNamespaces[0]=Team_A", "operator.watchNamespaces.0"),
        ("sidecar.maxUnavailable=0", "sidecar.maxUnavailable"),
        ("image.pullPolicy=Sometimes", "image.pullPolicy"),
        ("sidecar.stateHostPath=relative/dir", "sidecar.stateHostPath"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(value: str, message: str) -> None:
    assert HELM is not None
    done = subprocess.run(
        [str(HELM), "template", "perseus", str(CHART), "--set", value],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


def test_percent_max_unavailable_is_accepted() -> None:
    objs = render("--set", "sidecar.maxUnavailable=25%")
    strategy = objs["DaemonSet/perseus-sidecar"]["spec"]["updateStrategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == "25%"
