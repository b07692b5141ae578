"""Render the EnergyPolicy CustomResourceDefinition from the pydantic models in `model.py`.

Pydantic emits JSON Schema 2020-12; a Kubernetes 1.20 structural schema is OpenAPI v3.0 with
extra rules: no $ref, no const, no anyOf-with-null, boolean exclusive bounds, and no
`additionalProperties: false` next to `properties`. `openapi_schema` does that translation.
`python -m perseus_operator.crd` (or scripts/gen_crds.py) prints the YAML checked in under crds/.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from pydantic import BaseModel

from perseus_operator.model import (
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    EnergyPolicySpec,
    EnergyPolicyStatus,
)

__all__ = ["SHORT_NAME", "build_crd", "openapi_schema", "render_yaml"]

SHORT_NAME = "enp"
CATEGORY = "perseus"
_DROP = {"title"}


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's schema as a self-contained structural OpenAPI v3.0 schema."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs: dict[str, Any] = raw.pop("$defs", {})
    converted: dict[str, Any] = _convert(raw, defs)
    return converted


def _convert(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_convert(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _convert({**target, **extra}, defs)
    any_of = node.get("anyOf")
    if any_of is not None:
        non_null = [s for s in any_of if s.get("type") != "null"]
        if len(non_null) == 1 and len(non_null) < len(any_of):
            rest = {k: v for k, v in node.items() if k not in ("anyOf", "default")}
            return _convert({**non_null[0], **rest}, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum":
            out["minimum"] = value
            out["exclusiveMinimum"] = True
        elif key == "exclusiveMaximum":
            out["maximum"] = value
            out["exclusiveMaximum"] = True
        elif key == "additionalProperties" and value is False:
            continue
        elif key == "properties":
            out[key] = {name: _convert(sub, defs) for name, sub in value.items()}
        else:
            out[key] = _convert(value, defs)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def _without_defaults(node: Any) -> Any:
    """Status is written by the operator only: defaults there would only fight its patches."""
    if isinstance(node, list):
        return [_without_defaults(n) for n in node]
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if k != "default"}
    return node


def _printer_columns() -> list[dict[str, Any]]:
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {
            "name": "Ready",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        },
        {
            "name": "Saving%",
            "type": "number",
            "description": "measured energy saving against all GPUs at maximum clock, percent",
            "jsonPath": ".status.measuredSavingPercent",
        },
        {
            "name": "Predicted%",
            "type": "number",
            "priority": 1,
            "description": "the plan's predicted energy saving, percent",
            "jsonPath": ".status.predictedSavingPercent",
        },
        {
            "name": "Iteration(s)",
            "type": "number",
            "description": "the chosen plan's iteration time, seconds",
            "jsonPath": ".status.iterationTimeSeconds",
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def build_crd() -> dict[str, Any]:
    """The CRD object (apiextensions.k8s.io/v1) as a plain dict."""
    schema = {
        "type": "object",
        "description": "Cuts the GPU energy of a pipeline-parallel training job (Perseus).",
        "required": ["spec"],
        "properties": {
            "spec": openapi_schema(EnergyPolicySpec),
            "status": _without_defaults(openapi_schema(EnergyPolicyStatus)),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": [SHORT_NAME],
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _printer_columns(),
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def render_yaml() -> str:
    header = (
        "# Generated by scripts/gen_crds.py from operator/perseus_operator/model.py: do not edit.\n"
    )
    body: str = yaml.safe_dump(build_crd(), sort_keys=False, width=100)
    return header + body


def main() -> int:
    sys.stdout.write(render_yaml())
    return 0


if __name__ == "__main__":
    sys.exit(main())
