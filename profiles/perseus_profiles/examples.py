"""The four real stage profiles of the Perseus paper's artifact, shipped as package data.

GPT-3 175B and BLOOM 176B, bf16, 8 pipeline stages of 8-way tensor parallelism, measured on
A100 80G SXM and A40 GPUs (Apache-2.0, from the Zeus project's SOSP'24 artifact).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from perseus_profiles.profile import ProfileError, StageProfile, parse_profile_csv

__all__ = ["EXAMPLES", "Example", "example", "load_example"]


@dataclass(frozen=True)
class Example:
    name: str
    model: str
    gpu: str
    filename: str
    blocking_power_w: float
    """Power drawn while waiting on pipeline communication, as the paper uses for this GPU."""

    def csv_text(self) -> str:
        # Beside this module in any regular install; `importlib.resources` (zipped installs)
        # only when not, since importing it costs about 15 ms of a 0.37 s `perseus plan`.
        path = Path(__file__).with_name("data") / self.filename
        if path.is_file():
            return path.read_text(encoding="utf-8")
        from importlib import resources

        packaged = resources.files("perseus_profiles").joinpath("data", self.filename)
        return packaged.read_text(encoding="utf-8")

    def load(self) -> StageProfile:
        return parse_profile_csv(self.csv_text())


A100 = "A100 80G SXM"

EXAMPLES: dict[str, Example] = {
    e.name: e
    for e in (
        Example(
            "gpt3-175b-a100", "GPT-3 175B", "A100 80G SXM", "gpt3-175b+a100_sxm_bf16.csv", 83.64
        ),
        Example("bloom-176b-a100", "BLOOM 176B", "A100 80G SXM", "bloom+a100_sxm_bf16.csv", 83.64),
        Example("gpt3-175b-a40", "GPT-3 175B", "A40", "gpt3-175b+a40_bf16.csv", 70.38),
        Example("bloom-176b-a40", "BLOOM 176B", "A40", "bloom+a40_bf16.csv", 70.38),
    )
}


def example(name: str) -> Example:
    try:
        return EXAMPLES[name]
    except KeyError:
        raise ProfileError(
            f"unknown example {name!r}; choose one of {', '.join(EXAMPLES)}"
        ) from None


def load_example(name: str) -> StageProfile:
    return example(name).load()
