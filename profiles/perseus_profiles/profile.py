"""The stage profile: per (stage, instruction, SM frequency) time and energy on one GPU.

CSV layout `stage,instruction,frequency,time,energy` (0-based stage, `forward`|`backward`, MHz,
seconds and joules per instruction), the same as Zeus's Perseus tooling writes. Every problem is
reported as one :class:`ProfileError` line that names the row or the stage at fault.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "INSTRUCTIONS",
    "Instruction",
    "Measurement",
    "ProfileError",
    "StageProfile",
    "parse_profile_csv",
    "read_profile",
]

Instruction = Literal["forward", "backward"]
INSTRUCTIONS: tuple[Instruction, ...] = ("forward", "backward")
COLUMNS = ("stage", "instruction", "frequency", "time", "energy")


class ProfileError(ValueError):
    """A profile that cannot be used; the message is one readable line."""


@dataclass(frozen=True, slots=True)
class Measurement:
    """One profiled option: at `frequency_mhz` the instruction takes `time_s` and `energy_j`."""

    frequency_mhz: int
    time_s: float
    energy_j: float


@dataclass(frozen=True)
class StageProfile:
    """Validated profile. `options[s][i]` lists stage s, instruction i (0 forward, 1 backward),
    sorted by frequency, highest first. Every stage has both instructions and the same clocks."""

    options: tuple[tuple[tuple[Measurement, ...], tuple[Measurement, ...]], ...]

    def __post_init__(self) -> None:
        _validate_structure(self.options)

    @property
    def num_stages(self) -> int:
        return len(self.options)

    @property
    def frequencies_mhz(self) -> tuple[int, ...]:
        """The profiled SM clocks (identical for every stage and instruction), highest first."""
        return tuple(m.frequency_mhz for m in self.options[0][0])

    @property
    def max_frequency_mhz(self) -> int:
        return self.frequencies_mhz[0]

    def instruction_options(self, stage: int, instruction: Instruction) -> tuple[Measurement, ...]:
        return self.options[stage][INSTRUCTIONS.index(instruction)]

    def measurement(self, stage: int, instruction: Instruction, frequency_mhz: int) -> Measurement:
        for m in self.instruction_options(stage, instruction):
            if m.frequency_mhz == frequency_mhz:
                return m
        raise ProfileError(f"stage {stage} {instruction} has no measurement at {frequency_mhz} MHz")

    def select_stages(self, stages: Sequence[int]) -> StageProfile:
        """A profile of the given stages, renumbered 0..len-1 (e.g. (0, 1, 2, 7) -> 4 stages)."""
        for s in stages:
            if not 0 <= s < self.num_stages:
                raise ProfileError(f"stage {s} is not in this {self.num_stages}-stage profile")
        return StageProfile(tuple(self.options[s] for s in stages))

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        for s, per_instr in enumerate(self.options):
            for name, opts in zip(INSTRUCTIONS, per_instr, strict=True):
                for m in opts:
                    writer.writerow([s, name, m.frequency_mhz, repr(m.time_s), repr(m.energy_j)])
        return out.getvalue()


def _validate_structure(
    options: tuple[tuple[tuple[Measurement, ...], tuple[Measurement, ...]], ...],
) -> None:
    if not options:
        raise ProfileError("profile has no stages")
    reference: tuple[int, ...] | None = None
    for s, per_instr in enumerate(options):
        if len(per_instr) != len(INSTRUCTIONS):
            raise ProfileError(f"stage {s} must have exactly forward and backward options")
        for name, opts in zip(INSTRUCTIONS, per_instr, strict=True):
            if not opts:
                raise ProfileError(f"stage {s} has no {name} measurements")
            freqs = tuple(m.frequency_mhz for m in opts)
            if list(freqs) != sorted(set(freqs), reverse=True):
                raise ProfileError(f"stage {s} {name}: frequencies must be distinct, highest first")
            for m in opts:
                _check_measurement(m, f"stage {s} {name} at {m.frequency_mhz} MHz")
            if reference is None:
                reference = freqs
            elif freqs != reference:
                missing = sorted(set(reference) - set(freqs))
                extra = sorted(set(freqs) - set(reference))
                detail = f"missing {missing} MHz" if missing else f"extra {extra} MHz"
                raise ProfileError(
                    f"stage {s} {name} has different frequencies from stage 0 forward: {detail}"
                )


def _check_measurement(m: Measurement, where: str) -> None:
    if m.frequency_mhz <= 0:
        raise ProfileError(f"{where}: frequency must be positive")
    for label, value in (("time", m.time_s), ("energy", m.energy_j)):
        if not math.isfinite(value) or value <= 0:
            raise ProfileError(f"{where}: {label} must be a finite positive number, got {value}")


def _parse_rows(rows: Iterable[dict[str, str | None]]) -> StageProfile:
    seen: dict[tuple[int, int, int], Measurement] = {}
    for line_no, row in enumerate(rows, start=2):
        where = f"row {line_no}"
        try:
            values = {k: (row.get(k) or "").strip() for k in COLUMNS}
            if any(v == "" for v in values.values()):
                empty = [k for k, v in values.items() if v == ""]
                raise ProfileError(f"{where}: missing value for {', '.join(empty)}")
            stage = int(values["stage"])
            freq_f = float(values["frequency"])
            time_s = float(values["time"])
            energy_j = float(values["energy"])
        except ValueError as exc:
            if isinstance(exc, ProfileError):
                raise
            raise ProfileError(f"{where}: not a number ({exc})") from None
        instr = values["instruction"]
        if instr not in INSTRUCTIONS:
            raise ProfileError(f"{where}: instruction must be forward or backward, got {instr!r}")
        if stage < 0:
            raise ProfileError(f"{where}: stage must be >= 0, got {stage}")
        if not math.isfinite(freq_f) or freq_f != int(freq_f) or freq_f <= 0:
            raise ProfileError(f"{where}: frequency must be a positive integer MHz, got {freq_f}")
        m = Measurement(int(freq_f), time_s, energy_j)
        _check_measurement(m, f"{where} (stage {stage} {instr} at {m.frequency_mhz} MHz)")
        key = (stage, INSTRUCTIONS.index(instr), m.frequency_mhz)
        previous = seen.get(key)
        if previous is not None and previous != m:
            raise ProfileError(
                f"{where}: conflicting duplicate for stage {stage} {instr} at {m.frequency_mhz} MHz"
            )
        seen[key] = m
    if not seen:
        raise ProfileError("profile has no rows")
    num_stages = max(k[0] for k in seen) + 1
    present = {k[0] for k in seen}
    missing_stages = sorted(set(range(num_stages)) - present)
    if missing_stages:
        raise ProfileError(f"profile is missing stage(s) {missing_stages} of 0..{num_stages - 1}")
    options = []
    for s in range(num_stages):
        per_instr = []
        for i, name in enumerate(INSTRUCTIONS):
            opts = sorted(
                (m for (st, ins, _), m in seen.items() if st == s and ins == i),
                key=lambda m: -m.frequency_mhz,
            )
            if not opts:
                raise ProfileError(f"stage {s} has no {name} rows")
            per_instr.append(tuple(opts))
        options.append((per_instr[0], per_instr[1]))
    return StageProfile(tuple(options))


def parse_profile_csv(text: str) -> StageProfile:
    """Parse and validate profile CSV text (a header row naming the five columns, any order)."""
    if "\x00" in text:
        raise ProfileError("profile is not a text CSV file")
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise ProfileError(
            f"profile header must name {','.join(COLUMNS)}; missing {', '.join(missing)}"
        )
    reader.fieldnames = header
    try:
        return _parse_rows(reader)
    except csv.Error as exc:
        raise ProfileError(f"malformed CSV: {exc}") from None


def read_profile(path: str | Path) -> StageProfile:
    """Read a profile CSV file; unreadable files are a ProfileError too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}") from None
    return parse_profile_csv(text)
