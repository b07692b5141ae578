"""`perseus plan`: the summary, the JSON it writes, and one-line errors (exit 2) for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from perseus_operator.cli import main
from perseus_operator.frontier_io import FrontierFormatError, dump_frontier, load_frontier
from perseus_profiles import StageProfile, load_example
from tests.planner import reference

HEADER = "stage,instruction,frequency,time,energy"
GOOD_ROWS = [
    "0,forward,1000,0.10,10",
    "0,forward,800,0.12,9",
    "0,backward,1000,0.20,20",
    "0,backward,800,0.24,17",
    "1,forward,1000,0.11,11",
    "1,forward,800,0.13,10",
    "1,backward,1000,0.22,22",
    "1,backward,800,0.26,18",
]


def write_csv(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "profile.csv"
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


def plan(tmp_path: Path, *extra: str) -> list[str]:
    return ["plan", "--out", str(tmp_path / "out" / "frontier.json"), *extra]


def test_profile_run_writes_valid_frontier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = write_csv(tmp_path, GOOD_ROWS)
    args = plan(tmp_path, "--profile", str(csv), "--stages", "2", "--microbatches", "3",
                "--blocking-power-w", "5")  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "baseline (all GPUs at max clock)" in out
    assert "fastest plan" in out and "least energy (T*)" in out and "plans written" in out
    assert "no slowdown (<= T0)" in out
    doc = json.loads((tmp_path / "out" / "frontier.json").read_text())
    assert doc["format"] == "perseus-frontier/v1"
    assert doc["pipeline"] == {"schedule": "1f1b", "stages": 2, "microbatches": 3}
    assert doc["blocking_power_w"] == 5.0
    assert doc["order"] == [
        ["F0", "F1", "B0", "F2", "B1", "B2"],
        ["F0", "B0", "F1", "B1", "F2", "B2"],
    ]
    from perseus_profiles import read_profile

    profile = read_profile(csv)
    for p in doc["plans"]:
        t, e = reference.cost(profile, 3, 5.0, p["frequencies_mhz"])
        assert p["iteration_time_s"] == pytest.approx(t)
        assert p["energy_j"] == pytest.approx(e)
    assert len(load_frontier(json.dumps(doc), profile).plans) == len(doc["plans"])


def test_fewer_microbatches_than_stages_is_valid(tmp_path: Path) -> None:
    csv = write_csv(tmp_path, GOOD_ROWS)
    assert main(plan(tmp_path, "--profile", str(csv), "--microbatches", "1",
                     "--blocking-power-w", "5")) == 0  # fmt: skip


def test_example_with_plot_as_a_user_runs_it(tmp_path: Path) -> None:
    out = tmp_path / "f.json"
    png = tmp_path / "f.png"
    proc = subprocess.run(
        [sys.executable, "-m", "perseus_operator.cli", "plan", "--example", "gpt3-175b-a100",
         "--microbatches", "4", "--out", str(out), "--plot", str(png)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "blocking power 83.64 W" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fr = load_frontier(out.read_text(), load_example("gpt3-175b-a100"))
    assert fr.fastest.iteration_time_s <= fr.t0_s


def test_without_out_the_summary_is_printed_and_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's `perseus plan --example bloom-176b-a40 --microbatches 48`, smaller."""
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--example", "bloom-176b-a40", "--microbatches", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("no slowdown (<= T0)") for line in lines)
    assert "(--out FILE saves them)" in lines[-1] and "written" not in lines[-1]
    assert list(tmp_path.iterdir()) == []


def test_plot_title_names_the_profile_and_the_saving_at_t0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.axes import Axes

    titles: list[str] = []
    set_title = Axes.set_title

    def record(self: Axes, label: str, *args: Any, **kwargs: Any) -> Any:
        titles.append(label)
        return set_title(self, label, *args, **kwargs)

    monkeypatch.setattr(Axes, "set_title", record)
    png = tmp_path / "f.png"
    assert main(["plan", "--example", "gpt3-175b-a40", "--microbatches", "4",
                 "--plot", str(png)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    saved = next(line for line in out.splitlines() if line.startswith("no slowdown"))
    saving = saved.rsplit("(", 1)[1].split()[0]  # "12.30%"
    assert len(titles) == 1
    assert titles[0].startswith("gpt3-175b-a40, 1f1b: 8 stages x 4 microbatches")
    assert f"{saving} less energy at T0" in titles[0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot {png}" in out.splitlines()[-1]


BAD_PROFILES = {
    "missing stage": ([r for r in GOOD_ROWS if not r.startswith("0,")], "missing stage"),
    "missing instruction": ([r for r in GOOD_ROWS if "1,backward" not in r], "no backward"),
    "nan": ([*GOOD_ROWS[:-1], "1,backward,800,nan,18"], "finite positive"),
    "negative": ([*GOOD_ROWS[:-1], "1,backward,800,-0.26,18"], "finite positive"),
    "zero": ([*GOOD_ROWS[:-1], "1,backward,800,0.26,0"], "finite positive"),
    "conflicting duplicate": ([*GOOD_ROWS, "1,backward,800,0.27,18"], "conflicting duplicate"),
    "frequency missing on one stage": (GOOD_ROWS[:-1], "different frequencies"),
    "empty": ([], "no rows"),
}


@pytest.mark.parametrize("name", sorted(BAD_PROFILES))
def test_bad_profiles_are_one_line_exit_2(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows, message = BAD_PROFILES[name]
    csv = write_csv(tmp_path, rows)
    code = main(plan(tmp_path, "--profile", str(csv), "--microbatches", "4",
                     "--blocking-power-w", "5"))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stages", "3", "--microbatches", "4", "--blocking-power-w", "5"], "does not match"),
        (["--microbatches", "0", "--blocking-power-w", "5"], "positive"),
        (["--microbatches", "4", "--blocking-power-w", "nan"], "blocking-power-w"),
        (["--microbatches", "4", "--blocking-power-w", "-3"], "blocking-power-w"),
        (["--microbatches", "4"], "--blocking-power-w is required"),
    ],
)
def test_bad_shapes_and_powers(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = write_csv(tmp_path, GOOD_ROWS)
    assert main(plan(tmp_path, "--profile", str(csv), *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_unknown_example_and_unreadable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(plan(tmp_path, "--example", "nope", "--microbatches", "4")) == 2
    assert "unknown example" in capsys.readouterr().err
    missing = tmp_path / "missing.csv"
    assert main(plan(tmp_path, "--profile", str(missing), "--microbatches", "4",
                     "--blocking-power-w", "5")) == 2  # fmt: skip
    assert "cannot read profile" in capsys.readouterr().err


def test_example_shape_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(plan(tmp_path, "--example", "bloom-176b-a40", "--stages", "4",
                     "--microbatches", "4")) == 2  # fmt: skip
    assert "does not match the profile's 8 stages" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_doc() -> tuple[dict[str, Any], StageProfile]:
    from perseus_operator.planner import PipelineShape, compute_frontier

    profile = load_example("gpt3-175b-a100").select_stages((0, 1, 2, 7))
    fr = compute_frontier(profile, PipelineShape(stages=4, microbatches=4), 83.64)
    return json.loads(dump_frontier(fr)), profile


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda d: d.update(format="v0"), "format"),
        (lambda d: d["plans"][0].update(energy_j=d["plans"][0]["energy_j"] * 0.9), "costs"),
        (lambda d: d["plans"][0].update(iteration_time_s=float("nan")), "finite"),
        (lambda d: d["plans"].reverse(), "not sorted"),
        (lambda d: d["plans"].append(d["plans"][-1]), "not useful"),
        (lambda d: d["plans"][0]["frequencies_mhz"][0].__setitem__(0, 1411), "not a profiled"),
        (lambda d: d["plans"][0]["frequencies_mhz"][0].pop(), "frequencies"),
        (lambda d: d["order"][0].reverse(), "canonical"),
        (lambda d: d["pipeline"].update(stages=3), "stages"),
        (lambda d: d.update(blocking_power_w=-1), "blocking_power_w"),
        (lambda d: d.update(plans=[]), "non-empty"),
    ],
)
def test_loader_rejects_tampered_documents(
    small_doc: tuple[dict[str, Any], StageProfile],
    tamper: Callable[[dict[str, Any]], object],
    message: str,
) -> None:
    doc, profile = small_doc
    doc = json.loads(json.dumps(doc))
    tamper(doc)
    with pytest.raises(FrontierFormatError, match=message):
        load_frontier(json.dumps(doc), profile)


def test_loader_rejects_non_json(small_doc: tuple[dict[str, Any], StageProfile]) -> None:
    _, profile = small_doc
    with pytest.raises(FrontierFormatError, match="not valid JSON"):
        load_frontier("{", profile)


def test_streamed_file_equals_the_document(
    small_doc: tuple[dict[str, Any], StageProfile], tmp_path: Path
) -> None:
    from perseus_operator.frontier_io import write_frontier

    doc, profile = small_doc
    frontier = load_frontier(json.dumps(doc), profile)
    write_frontier(frontier, tmp_path / "f.json")
    assert json.loads((tmp_path / "f.json").read_text()) == json.loads(dump_frontier(frontier))


def test_plot_without_matplotlib_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    csv = write_csv(tmp_path, GOOD_ROWS)
    args = plan(tmp_path, "--profile", str(csv), "--microbatches", "2", "--blocking-power-w", "5",
                "--plot", str(tmp_path / "f.png"))  # fmt: skip
    assert main(args) == 2
    assert "needs matplotlib" in capsys.readouterr().err


def test_unwritable_output_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = write_csv(tmp_path, GOOD_ROWS)
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = ["plan", "--profile", str(csv), "--microbatches", "2", "--blocking-power-w", "5",
            "--out", str(blocker / "f.json")]  # fmt: skip
    assert main(args) == 2
    assert "cannot write output" in capsys.readouterr().err


def test_run_as_a_user_writes_everything_before_its_quick_exit(tmp_path: Path) -> None:
    """`perseus plan` skips the interpreter's teardown: stdout (a pipe, block-buffered), the
    JSON file and the exit code must all be complete anyway."""
    out = tmp_path / "f.json"
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run(
        [sys.executable, "-m", "perseus_operator.cli", "plan", "--example", "bloom-176b-a40",
         "--microbatches", "6", "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=False, env=buffered,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plans = len(json.loads(out.read_text())["plans"])
    assert proc.stdout.splitlines()[-1].startswith(f"{plans} plans written")
    assert "least energy (T*)" in proc.stdout


def test_run_as_a_user_a_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "perseus_operator.cli", "plan", "--profile",
         str(tmp_path / "missing.csv"), "--microbatches", "4", "--out", str(tmp_path / "f.json")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("perseus plan: error: ")
    assert not (tmp_path / "f.json").exists()


def test_interleaved_run_writes_a_valid_frontier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--schedule interleaved-1f1b --virtual-stages 2` on a per-chunk profile, and on a
    one-chunk one split with `--split-chunks`: the same frontier, which loads back checked."""
    one = load_example("gpt3-175b-a40").select_stages((0, 3, 7))
    split_csv = tmp_path / "chunks.csv"
    split_csv.write_text(one.split_chunks(2).to_csv())
    one_csv = tmp_path / "one.csv"
    one_csv.write_text(one.to_csv())
    common = ("--microbatches", "6", "--blocking-power-w", "70.38")
    assert main(plan(tmp_path, "--profile", str(split_csv), "--schedule", "interleaved-1f1b",
                     *common)) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "3 stages x 6 microbatches (interleaved 1F1B, 2 chunks per stage)" in out
    text = (tmp_path / "out" / "frontier.json").read_text()
    doc = json.loads(text)
    assert doc["pipeline"] == {
        "schedule": "interleaved-1f1b", "stages": 3, "microbatches": 6, "virtual_stages": 2
    }  # fmt: skip
    assert doc["order"][2][:3] == ["F0c0", "F1c0", "F2c0"]
    frontier = load_frontier(text, one.split_chunks(2))
    assert frontier.pipeline.virtual_stages == 2
    with pytest.raises(FrontierFormatError, match=r"3 stages x 2 chunk\(s\) but the profile"):
        load_frontier(text, one)
    assert main(plan(tmp_path, "--profile", str(one_csv), "--schedule", "interleaved-1f1b",
                     "--virtual-stages", "2", "--split-chunks", *common)) == 0  # fmt: skip
    assert (tmp_path / "out" / "frontier.json").read_text() == text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--microbatches", "4"), "4 is not a multiple of 3"),
        (("--microbatches", "6", "--virtual-stages", "2"), "need schedule interleaved-1f1b"),
        (("--microbatches", "6", "--schedule", "interleaved-1f1b"), "split each stage evenly"),
        (
            ("--microbatches", "6", "--schedule", "interleaved-1f1b", "--virtual-stages", "1"),
            "needs 2-64 virtual stages",
        ),
        (("--microbatches", "6", "--split-chunks"), "--split-chunks is for interleaved-1f1b"),
    ],
)
def test_interleaved_bad_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], message: str
) -> None:
    one = tmp_path / "one.csv"
    one.write_text(load_example("gpt3-175b-a40").select_stages((0, 3, 7)).to_csv())
    args = ["--profile", str(one), "--blocking-power-w", "70", *extra]
    if "--microbatches" in extra and extra[1] == "4":
        args += ["--schedule", "interleaved-1f1b", "--split-chunks"]
    assert main(plan(tmp_path, *args)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
