"""The CRD YAML is generated from the models: stale YAML fails here; the schema is structural."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from perseus_operator.crd import SHORT_NAME, build_crd, openapi_schema, render_yaml
from perseus_operator.model import EnergyPolicySpec

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_crd_is_current() -> None:
    on_disk = (ROOT / "crds" / "energypolicy.yaml").read_text()
    assert on_disk == render_yaml(), "crds/energypolicy.yaml is stale: run scripts/gen_crds.py"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        out.append((path, node))
        for k, v in node.items():
            out += _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _walk(v, f"{path}[{i}]")
    return out


def test_schema_is_structural_openapi_v3() -> None:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node and "anyOf" not in node and "const" not in node, path
        assert node.get("additionalProperties") is not False, path
        if "properties" in node:
            assert node.get("type") == "object", path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True, path
    status = schema["properties"]["status"]
    assert all("default" not in n for _, n in _walk(status))


def test_profile_is_one_of_measure_or_import() -> None:
    profile = openapi_schema(EnergyPolicySpec)["properties"]["profile"]
    assert profile["oneOf"] == [{"required": ["measure"]}, {"required": ["import"]}]
    assert set(profile["properties"]) == {"measure", "import"}


def test_names_columns_and_required_fields() -> None:
    crd = build_crd()
    names = crd["spec"]["names"]
    assert names["shortNames"] == [SHORT_NAME] and SHORT_NAME != "ep"
    assert names["categories"] == ["perseus"]
    version = crd["spec"]["versions"][0]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Ready", "Saving%", "Predicted%", "Iteration(s)", "Age"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["selector", "pipeline", "profile"]
    assert spec["properties"]["mode"]["enum"] == ["Optimize", "Observe"]
    assert spec["properties"]["pipeline"]["properties"]["stages"]["minimum"] == 1


def test_yaml_round_trips() -> None:
    text = render_yaml()
    assert yaml.safe_load(text) == build_crd()
