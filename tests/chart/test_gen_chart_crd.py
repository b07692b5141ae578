"""The chart's CRD template is generated from crds/energypolicy.yaml and cannot go stale."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.chart._scripts import CHART, ROOT, load_script

gen = load_script("gen_chart_crd")
SOURCE = ROOT / "crds" / "energypolicy.yaml"
TEMPLATE = CHART / "templates" / "crd-energypolicy.yaml"


def test_committed_template_matches_the_generated_crd() -> None:
    assert TEMPLATE.read_text() == gen.render(SOURCE.read_text()), (
        "run scripts/gen_chart_crd.py after scripts/gen_crds.py"
    )


def _strip_template_lines(text: str) -> str:
    """The template with Helm directives removed: what it renders with keep=true, labels aside."""
    kept = [line for line in text.splitlines() if "{{" not in line and "*/}}" not in line]
    start = kept.index("apiVersion: apiextensions.k8s.io/v1")
    return "\n".join(kept[start:])


def test_template_carries_the_source_spec_and_the_keep_policy() -> None:
    source = yaml.safe_load(SOURCE.read_text())
    rendered = yaml.safe_load(_strip_template_lines(TEMPLATE.read_text()))
    assert rendered["spec"] == source["spec"]
    assert rendered["metadata"]["name"] == source["metadata"]["name"]
    assert rendered["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_check_mode_fails_on_a_stale_template(tmp_path: Path) -> None:
    out = tmp_path / "crd.yaml"
    out.write_text("stale\n")
    assert gen.main(["--check", "--out", str(out)]) == 1
    assert gen.main(["--out", str(out)]) == 0
    assert gen.main(["--check", "--out", str(out)]) == 0


def test_a_schema_change_changes_the_template() -> None:
    crd = yaml.safe_load(SOURCE.read_text())
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"] = "changed"
    assert gen.render(yaml.safe_dump(crd)) != TEMPLATE.read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "exactly one YAML document"),
        ("a: 1\n---\nb: 2\n", "exactly one YAML document"),
        ("kind: ConfigMap\n", "kind CustomResourceDefinition"),
        ("kind: CustomResourceDefinition\napiVersion: apiextensions.k8s.io/v1beta1\n", "v1"),
        (
            "kind: CustomResourceDefinition\napiVersion: apiextensions.k8s.io/v1\nspec: {}\n",
            "metadata.name",
        ),
        (
            "kind: CustomResourceDefinition\napiVersion: apiextensions.k8s.io/v1\n"
            "metadata: {name: x}\n",
            "spec is missing",
        ),
        (
            "kind: CustomResourceDefinition\napiVersion: apiextensions.k8s.io/v1\n"
            "metadata: {name: x}\nspec: {description: 'use {{ .Values }}'}\n",
            "template",
        ),
    ],
)
def test_bad_sources_are_rejected_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(gen.CrdError, match=message):
        gen.render(text)


def test_cli_reports_a_bad_source_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: ConfigMap\n")
    assert gen.main(["--source", str(bad), "--out", str(tmp_path / "o.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "CustomResourceDefinition" in err
    assert gen.main(["--source", str(tmp_path / "missing.yaml")]) == 2
