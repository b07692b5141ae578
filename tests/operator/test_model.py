"""Spec parsing: defaults, and one readable line for every bad input."""

from __future__ import annotations

import re
from typing import Any

import pytest

from perseus_operator.model import SpecError, parse_spec


def spec(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "selector": {"matchLabels": {"job": "gpt"}},
        "pipeline": {"stages": 4, "microbatches": 8, "dataParallel": 2},
        "profile": {"import": {"configMap": "gpt-profile"}},
        "blockingPowerW": 83.64,
    }
    base.update(over)
    return base


def test_defaults() -> None:
    s = parse_spec(spec())
    assert s.mode == "Optimize" and not s.suspend and s.max_slowdown == 0
    assert s.pipeline.tensor_parallel == 1 and s.pipeline.ranks == 8
    assert s.stragglers.enabled and s.stragglers.threshold == 0.05
    assert s.profile.import_ is not None and s.profile.import_.key == "profile.csv"
    assert s.selector.as_query() == "job=gpt"


@pytest.mark.parametrize(
    ("over", "fragment"),
    [
        ({"pipeline": {"stages": 0, "microbatches": 8}}, "spec.pipeline.stages"),
        ({"mode": "Fast"}, "spec.mode"),
        ({"blockingPowerW": float("nan")}, "spec.blockingPowerW"),
        ({"blockingPowerW": -1}, "spec.blockingPowerW"),
        ({"profile": {}}, "set exactly one of measure or import"),
        (
            {"profile": {"measure": {}, "import": {"configMap": "x"}}},
            "set exactly one of measure or import",
        ),
        (
            {"profile": {"measure": {"frequencies": {"minMHz": 1400, "maxMHz": 900}}}},
            "minMHz (1400) exceeds maxMHz (900)",
        ),
        ({"selector": {"matchLabels": {}}}, "spec.selector.matchLabels"),
        ({"blockingPowerW": None}, "spec.blockingPowerW: required with an imported profile"),
        ({"unknownField": 1}, "spec.unknownField"),
    ],
)
def test_bad_specs_give_one_line(over: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec(**over))
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_blocking_power_may_be_measured() -> None:
    s = parse_spec(spec(blockingPowerW=None, profile={"measure": {}}))
    assert s.blocking_power_w is None


def test_label_selector_matching() -> None:
    s = parse_spec(spec(selector={"matchLabels": {"job": "gpt", "team": "a"}}))
    assert s.selector.matches({"job": "gpt", "team": "a", "x": "y"})
    assert not s.selector.matches({"job": "gpt"})


def test_interleaved_pipeline_and_its_rules() -> None:
    interleaved = {"stages": 4, "microbatches": 8, "schedule": "interleaved-1f1b"}
    s = parse_spec(spec(pipeline={**interleaved, "virtualStages": 2}))
    assert (s.pipeline.schedule, s.pipeline.virtual_stages) == ("interleaved-1f1b", 2)
    assert parse_spec(spec()).pipeline.virtual_stages == 1
    bad = [
        ({**interleaved}, "spec.pipeline.virtualStages: interleaved-1f1b needs 2 or more"),
        ({**interleaved, "virtualStages": 2, "microbatches": 6},
         "spec.pipeline.microbatches: interleaved-1f1b needs a multiple of the stages (4)"),
        ({**interleaved, "virtualStages": 2, "stages": 1}, "spec.pipeline.stages: interleaved"),
        ({"stages": 4, "microbatches": 8, "virtualStages": 2}, "need schedule interleaved-1f1b"),
        ({**interleaved, "virtualStages": 65}, "less than or equal to 64"),
        ({**interleaved, "schedule": "gpipe"}, "spec.pipeline.schedule"),
    ]  # fmt: skip
    for pipeline, fragment in bad:
        with pytest.raises(SpecError, match=re.escape(fragment)):
            parse_spec(spec(pipeline=pipeline))
    with pytest.raises(SpecError, match="per-chunk rows: import them"):
        parse_spec(spec(pipeline={**interleaved, "virtualStages": 2}, profile={"measure": {}}))
