"""Stage profiles: the CSV format, its validation, and the real example profiles shipped as data.

Standard library only (and the pipeline vocabulary, `perseus_hooks.pipeline`), so the planner,
the sidecar, the simulator and the operator all read profiles through the same validated parser.
"""

from perseus_profiles.examples import EXAMPLES, Example, example, load_example
from perseus_profiles.profile import (
    INSTRUCTIONS,
    Instruction,
    Measurement,
    ProfileError,
    StageProfile,
    parse_profile_csv,
    read_profile,
)

__all__ = [
    "EXAMPLES",
    "INSTRUCTIONS",
    "Example",
    "Instruction",
    "Measurement",
    "ProfileError",
    "StageProfile",
    "example",
    "load_example",
    "parse_profile_csv",
    "read_profile",
]
