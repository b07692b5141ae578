"""Stage profiles: the CSV format, its validation, and the real example profiles shipped as data;
and, in `perseus_profiles.pipeline`, the pipeline vocabulary (schedules, instruction orders and
names, dependencies, iteration time).

Standard library only, so the planner, the sidecar, the simulator and the operator all read
profiles through the same validated parser and speak of pipelines in the same terms.
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
