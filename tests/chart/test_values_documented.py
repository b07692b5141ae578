"""Every value of the chart is documented by a comment on the line above it."""

from __future__ import annotations

import re

import yaml

from tests.chart._scripts import CHART

VALUES = CHART / "values.yaml"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z][\w.\-/]*):")
# Values that hold free-form Kubernetes objects: their inner keys are the API's, not the chart's.
FREE_FORM = {"resources", "nodeSelector", "tolerations", "affinity", "podAnnotations", "labels"}
FREE_FORM |= {"annotations", "sidecarFrom"}


def undocumented_keys(text: str) -> list[str]:
    """Dotted paths of chart keys whose previous non-blank line is not a comment."""
    missing: list[str] = []
    stack: list[tuple[int, str]] = []
    previous = ""
    for line in text.splitlines():
        match = KEY.match(line)
        if match:
            indent = len(match["indent"])
            while stack and stack[-1][0] >= indent:
                stack.pop()
            inside_free_form = any(key in FREE_FORM for _, key in stack)
            stack.append((indent, match["key"]))
            if not inside_free_form and not previous.lstrip().startswith("#"):
                missing.append(".".join(key for _, key in stack))
        if line.strip():
            previous = line
    return missing


def test_every_chart_value_has_a_comment() -> None:
    assert undocumented_keys(VALUES.read_text()) == []


def test_the_checker_finds_an_undocumented_key() -> None:
    text = "# doc\na:\n  # doc\n  b: 1\n  c: 2\nresources:\n  limits: {}\n"
    assert undocumented_keys(text) == ["a.c", "resources"]


def test_values_parse_as_yaml() -> None:
    values = yaml.safe_load(VALUES.read_text())
    assert values["sidecar"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert values["sidecar"]["privileged"] is False
