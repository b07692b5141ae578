"""The stage profile: per (stage, instruction, SM frequency) time and energy on one GPU.

CSV layout `stage,instruction,frequency,time,energy` (0-based stage, `forward`|`backward`, MHz,
seconds and joules per instruction), the same as Zeus's Perseus tooling writes. Every problem is
reported as one :class:`ProfileError` line that names the row or the stage at fault.

Interleaved pipelines (each GPU holds v model chunks) need one profile per chunk: an optional
`chunk` column (0-based) gives per-chunk rows, `stage,chunk,instruction,frequency,time,energy`.
A file without it is the v = 1 case, so every existing profile reads unchanged;
:meth:`StageProfile.split_chunks` derives a v-chunk profile from a one-chunk one.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from perseus_hooks.pipeline import MAX_CHUNKS

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
CHUNK_COLUMNS = ("stage", "chunk", "instruction", "frequency", "time", "energy")


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
    """Validated profile. `options[u][i]` lists unit u, instruction i (0 forward, 1 backward),
    sorted by frequency, highest first; a unit is one model chunk of one stage, ``u = stage *
    chunks + chunk`` (with one chunk per stage, as in every plain 1F1B profile, u is the stage).
    Every unit has both instructions and the same clocks."""

    options: tuple[tuple[tuple[Measurement, ...], tuple[Measurement, ...]], ...]
    chunks: int = 1
    """Model chunks per stage (GPU): v of an interleaved pipeline, 1 otherwise."""

    def __post_init__(self) -> None:
        chunks = self.chunks
        if isinstance(chunks, bool) or not isinstance(chunks, int) or not 1 <= chunks <= MAX_CHUNKS:
            raise ProfileError(
                f"chunks per stage must be an integer 1-{MAX_CHUNKS}, got {chunks!r}"
            )
        if len(self.options) % chunks:
            raise ProfileError(f"{len(self.options)} profiled chunks are not {chunks} per stage")
        _validate_structure(self.options, chunks)

    @property
    def num_stages(self) -> int:
        return len(self.options) // self.chunks

    def unit(self, stage: int, chunk: int = 0) -> int:
        """The index in `options` of `chunk` of `stage`."""
        return stage * self.chunks + chunk

    @property
    def frequencies_mhz(self) -> tuple[int, ...]:
        """The profiled SM clocks (identical for every stage and instruction), highest first."""
        return tuple(m.frequency_mhz for m in self.options[0][0])

    @property
    def max_frequency_mhz(self) -> int:
        return self.frequencies_mhz[0]

    def instruction_options(
        self, stage: int, instruction: Instruction, chunk: int = 0
    ) -> tuple[Measurement, ...]:
        return self.options[self.unit(stage, chunk)][INSTRUCTIONS.index(instruction)]

    def measurement(
        self, stage: int, instruction: Instruction, frequency_mhz: int, chunk: int = 0
    ) -> Measurement:
        for m in self.instruction_options(stage, instruction, chunk):
            if m.frequency_mhz == frequency_mhz:
                return m
        where = _unit_name(self.unit(stage, chunk), self.chunks)
        raise ProfileError(f"{where} {instruction} has no measurement at {frequency_mhz} MHz")

    def select_stages(self, stages: Sequence[int]) -> StageProfile:
        """A profile of the given stages (all their chunks), renumbered 0..len-1 (e.g.
        (0, 1, 2, 7) -> 4 stages)."""
        for s in stages:
            if not 0 <= s < self.num_stages:
                raise ProfileError(f"stage {s} is not in this {self.num_stages}-stage profile")
        v = self.chunks
        return StageProfile(tuple(self.options[s * v + c] for s in stages for c in range(v)), v)

    def split_chunks(self, chunks: int) -> StageProfile:
        """The profile of the same model split into `chunks` chunks per stage, each stage's time
        and energy split evenly across them: a stand-in for an interleaved pipeline (v chunks
        per GPU) until per-chunk rows are measured. Only a one-chunk profile splits."""
        if self.chunks != 1:
            raise ProfileError(f"only a one-chunk profile splits; this one has {self.chunks}")
        if isinstance(chunks, bool) or not isinstance(chunks, int) or not 1 <= chunks <= MAX_CHUNKS:
            raise ProfileError(
                f"chunks per stage must be an integer 1-{MAX_CHUNKS}, got {chunks!r}"
            )
        per_chunk = tuple(
            tuple(
                tuple(Measurement(m.frequency_mhz, m.time_s / chunks, m.energy_j / chunks)
                      for m in opts)
                for opts in per_instr
            )
            for per_instr in self.options
        )  # fmt: skip
        return StageProfile(
            tuple(unit for unit in per_chunk for _ in range(chunks)),  # type: ignore[misc]
            chunks,
        )

    def to_csv(self) -> str:
        """CSV text: the five-column layout for one chunk per stage, with `chunk` otherwise."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS if self.chunks == 1 else CHUNK_COLUMNS)
        for u, per_instr in enumerate(self.options):
            s, c = divmod(u, self.chunks)
            where = [s] if self.chunks == 1 else [s, c]
            for name, opts in zip(INSTRUCTIONS, per_instr, strict=True):
                for m in opts:
                    writer.writerow(
                        [*where, name, m.frequency_mhz, repr(m.time_s), repr(m.energy_j)]
                    )
        return out.getvalue()


def _unit_name(unit: int, chunks: int) -> str:
    """How messages name a unit: "stage 3", or "stage 1 chunk 1" in a per-chunk profile."""
    if chunks == 1:
        return f"stage {unit}"
    return f"stage {unit // chunks} chunk {unit % chunks}"


def _validate_structure(
    options: tuple[tuple[tuple[Measurement, ...], tuple[Measurement, ...]], ...],
    chunks: int = 1,
) -> None:
    if not options:
        raise ProfileError("profile has no stages")
    reference: tuple[int, ...] | None = None
    for u, per_instr in enumerate(options):
        s = _unit_name(u, chunks).removeprefix("stage ")
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


def _parse_rows(rows: Iterable[dict[str, str | None]], *, has_chunk: bool) -> StageProfile:
    columns = CHUNK_COLUMNS if has_chunk else COLUMNS
    seen: dict[tuple[int, int, int, int], Measurement] = {}
    for line_no, row in enumerate(rows, start=2):
        where = f"row {line_no}"
        try:
            values = {k: (row.get(k) or "").strip() for k in columns}
            if any(v == "" for v in values.values()):
                empty = [k for k, v in values.items() if v == ""]
                raise ProfileError(f"{where}: missing value for {', '.join(empty)}")
            stage = int(values["stage"])
            chunk = int(values["chunk"]) if has_chunk else 0
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
        if not 0 <= chunk < MAX_CHUNKS:
            raise ProfileError(f"{where}: chunk must be 0-{MAX_CHUNKS - 1}, got {chunk}")
        if not math.isfinite(freq_f) or freq_f != int(freq_f) or freq_f <= 0:
            raise ProfileError(f"{where}: frequency must be a positive integer MHz, got {freq_f}")
        m = Measurement(int(freq_f), time_s, energy_j)
        unit = f"stage {stage}" + (f" chunk {chunk}" if has_chunk else "")
        _check_measurement(m, f"{where} ({unit} {instr} at {m.frequency_mhz} MHz)")
        key = (stage, chunk, INSTRUCTIONS.index(instr), m.frequency_mhz)
        previous = seen.get(key)
        if previous is not None and previous != m:
            raise ProfileError(
                f"{where}: conflicting duplicate for {unit} {instr} at {m.frequency_mhz} MHz"
            )
        seen[key] = m
    if not seen:
        raise ProfileError("profile has no rows")
    num_stages = max(k[0] for k in seen) + 1
    chunks = max(k[1] for k in seen) + 1
    present = {k[0] for k in seen}
    missing_stages = sorted(set(range(num_stages)) - present)
    if missing_stages:
        raise ProfileError(f"profile is missing stage(s) {missing_stages} of 0..{num_stages - 1}")
    grouped: dict[tuple[int, int, int], list[Measurement]] = {}
    for (st, ch, ins, _), m in seen.items():
        grouped.setdefault((st, ch, ins), []).append(m)
    options = []
    for s in range(num_stages):
        for c in range(chunks):
            per_instr = []
            for i, name in enumerate(INSTRUCTIONS):
                opts = sorted(grouped.get((s, c, i), ()), key=lambda m: -m.frequency_mhz)
                if not opts:
                    unit = f"stage {s}" + (f" chunk {c}" if has_chunk else "")
                    raise ProfileError(
                        f"{unit} has no {name} rows"
                        + (f" (every stage needs chunks 0..{chunks - 1})" if has_chunk else "")
                    )
                per_instr.append(tuple(opts))
            options.append((per_instr[0], per_instr[1]))
    return StageProfile(tuple(options), chunks)


def parse_profile_csv(text: str) -> StageProfile:
    """Parse and validate profile CSV text: a header row naming the five columns, in any order,
    plus `chunk` for per-chunk rows (an interleaved pipeline's profile)."""
    if "\x00" in text:
        raise ProfileError("profile is not a text CSV file")
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise ProfileError(
            f"profile header must name {','.join(COLUMNS)} (and chunk for per-chunk rows);"
            f" missing {', '.join(missing)}"
        )
    reader.fieldnames = header
    try:
        return _parse_rows(reader, has_chunk="chunk" in header)
    except csv.Error as exc:
        raise ProfileError(f"malformed CSV: {exc}") from None


def read_profile(path: str | Path) -> StageProfile:
    """Read a profile CSV file; unreadable files are a ProfileError too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}") from None
    return parse_profile_csv(text)
