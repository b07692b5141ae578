"""The stage-profile parser: real examples load, every kind of bad input is one clear error."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from perseus_profiles import (
    EXAMPLES,
    Measurement,
    ProfileError,
    StageProfile,
    example,
    load_example,
    parse_profile_csv,
    read_profile,
)

HEADER = "stage,instruction,frequency,time,energy\n"


def _csv(rows: list[str]) -> str:
    return HEADER + "\n".join(rows) + "\n"


def _two_stage_rows() -> list[str]:
    return [
        "0,forward,1000,0.1,10",
        "0,forward,800,0.12,9",
        "0,backward,1000,0.2,20",
        "0,backward,800,0.25,17",
        "1,forward,1000,0.15,12",
        "1,forward,800,0.2,11",
        "1,backward,1000,0.3,25",
        "1,backward,800,0.35,22",
    ]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_load_with_eight_stages(name: str) -> None:
    profile = load_example(name)
    assert profile.num_stages == 8
    assert profile.frequencies_mhz == tuple(sorted(profile.frequencies_mhz, reverse=True))
    assert profile.max_frequency_mhz == max(profile.frequencies_mhz)


def test_examples_read_through_importlib_resources_where_not_beside_the_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A zipped install has no file path: the same text comes through `importlib.resources`."""
    direct = EXAMPLES["bloom-176b-a40"].csv_text()
    monkeypatch.setattr(Path, "is_file", lambda self: False)
    assert EXAMPLES["bloom-176b-a40"].csv_text() == direct
    assert direct.startswith("stage,instruction,frequency,time,energy")


def test_parse_sorts_highest_frequency_first_and_looks_up() -> None:
    profile = parse_profile_csv(_csv(list(reversed(_two_stage_rows()))))
    assert profile.num_stages == 2
    assert profile.frequencies_mhz == (1000, 800)
    assert profile.measurement(1, "backward", 800) == Measurement(800, 0.35, 22.0)
    with pytest.raises(ProfileError, match="no measurement at 900 MHz"):
        profile.measurement(1, "backward", 900)


def test_csv_round_trip_is_exact() -> None:
    profile = load_example("bloom-176b-a40")
    assert parse_profile_csv(profile.to_csv()) == profile


def test_select_stages_renumbers() -> None:
    profile = load_example("gpt3-175b-a100")
    four = profile.select_stages([0, 1, 2, 7])
    assert four.num_stages == 4
    assert four.options[3] == profile.options[7]
    with pytest.raises(ProfileError, match="stage 9 is not in this 8-stage profile"):
        profile.select_stages([0, 9])


def test_identical_duplicates_are_tolerated() -> None:
    rows = _two_stage_rows()
    profile = parse_profile_csv(_csv([*rows, rows[0]]))
    assert profile.num_stages == 2


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([*_two_stage_rows(), "0,forward,1000,0.11,10"], "conflicting duplicate"),
        (
            [r for r in _two_stage_rows() if not r.startswith("1,backward")],
            "stage 1 has no backward",
        ),
        ([r for r in _two_stage_rows() if r != "1,forward,800,0.2,11"], "missing \\[800\\] MHz"),
        (
            [r.replace("1,", "2,", 1) if r.startswith("1,") else r for r in _two_stage_rows()],
            "missing stage\\(s\\) \\[1\\]",
        ),
        (["0,forward,1000,nan,10", *_two_stage_rows()[1:]], "time must be a finite positive"),
        (["0,forward,1000,0.1,-1", *_two_stage_rows()[1:]], "energy must be a finite positive"),
        (["0,forward,1000,0,10", *_two_stage_rows()[1:]], "time must be a finite positive"),
        (["0,forward,1000,inf,10", *_two_stage_rows()[1:]], "time must be a finite positive"),
        (["0,sideways,1000,0.1,10", *_two_stage_rows()[1:]], "forward or backward"),
        (["-1,forward,1000,0.1,10", *_two_stage_rows()[1:]], "stage must be >= 0"),
        (["0,forward,1000.5,0.1,10", *_two_stage_rows()[1:]], "positive integer MHz"),
        (["0,forward,abc,0.1,10", *_two_stage_rows()[1:]], "not a number"),
        (["0,forward,1000,,10", *_two_stage_rows()[1:]], "missing value for time"),
        ([], "no rows"),
    ],
)
def test_bad_profiles_give_one_line_errors(rows: list[str], message: str) -> None:
    with pytest.raises(ProfileError, match=message) as info:
        parse_profile_csv(_csv(rows))
    assert "\n" not in str(info.value)


def test_bad_header_and_binary() -> None:
    with pytest.raises(ProfileError, match="missing energy"):
        parse_profile_csv("stage,instruction,frequency,time\n0,forward,1,1\n")
    with pytest.raises(ProfileError, match="not a text CSV"):
        parse_profile_csv("\x00\x01")


def test_read_profile_reports_unreadable_files(tmp_path: object) -> None:
    with pytest.raises(ProfileError, match="cannot read profile"):
        read_profile("/nonexistent/profile.csv")


def test_structure_is_validated_when_built_directly() -> None:
    m = Measurement(1000, 0.1, 1.0)
    with pytest.raises(ProfileError, match="no stages"):
        StageProfile(())
    with pytest.raises(ProfileError, match="must be a finite positive"):
        StageProfile((((Measurement(1000, math.nan, 1.0),), (m,)),))


def test_unknown_example_lists_choices() -> None:
    with pytest.raises(ProfileError, match="choose one of gpt3-175b-a100"):
        example("llama")


def test_per_chunk_rows_round_trip_and_name_the_chunk() -> None:
    """A `chunk` column gives per-chunk rows (an interleaved pipeline's profile); without it the
    profile is the one-chunk case and writes the five-column layout as before."""
    one = parse_profile_csv(_csv(_two_stage_rows()))
    assert one.chunks == 1 and one.to_csv().startswith(HEADER)
    assert parse_profile_csv(one.to_csv()) == one
    split = one.split_chunks(2)
    assert (split.num_stages, split.chunks, len(split.options)) == (2, 2, 4)
    for c in range(2):
        m = split.measurement(1, "backward", 800, chunk=c)
        assert (m.time_s, m.energy_j) == pytest.approx((0.35 / 2, 22 / 2))
    text = split.to_csv()
    assert text.startswith("stage,chunk,instruction,frequency,time,energy\n")
    assert parse_profile_csv(text) == split
    assert split.select_stages((1,)) == parse_profile_csv(text).select_stages((1,))
    assert split.select_stages((1,)).options == split.options[2:]
    with pytest.raises(ProfileError, match="only a one-chunk profile splits"):
        split.split_chunks(2)
    with pytest.raises(ProfileError, match="chunks per stage must be an integer 1-64"):
        one.split_chunks(0)
    # A chunk missing from one stage, and a bad chunk number, are one line each.
    rows = [line for line in text.splitlines()[1:] if not line.startswith("1,1,")]
    with pytest.raises(ProfileError, match=r"stage 1 chunk 1 has no forward rows"):
        parse_profile_csv("stage,chunk,instruction,frequency,time,energy\n" + "\n".join(rows))
    with pytest.raises(ProfileError, match="row 2: chunk must be 0-63, got -1"):
        parse_profile_csv(
            "stage,chunk,instruction,frequency,time,energy\n0,-1,forward,1000,0.1,1\n"
        )
    with pytest.raises(ProfileError, match="stage 0 chunk 1 forward at 800 MHz"):
        bad = text.replace("0,1,forward,800,", "0,1,forward,800,-")
        parse_profile_csv(bad)
