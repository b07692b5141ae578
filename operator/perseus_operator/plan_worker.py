"""The planner in a child process of the operator: `python -m perseus_operator.plan_worker
MEMORY_MIB` reads one request (JSON) on stdin and writes the frontier (JSON) on stdout.

The child caps its own address space (RLIMIT_AS) before it imports numpy and offers itself to
the kernel's OOM killer first (oom_score_adj 1000): a pipeline too big for the memory it is given
ends this process with MemoryError, or at worst a SIGKILL, never the operator. Standard library
only at import time, so the limit is in place before anything large loads.

Exit codes: 0 done; 2 the planner refused the inputs (one line on stderr); 3 out of memory.
Each stage's clocks go out as one string, a character per instruction (`chr(CODE_BASE + i)`
for the profile's i-th clock, highest first): a large frontier then costs the operator a small
document to parse and, once decoded into the profile's own int objects, pointers, not ints.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["CODE_BASE", "EXIT_OUT_OF_MEMORY", "EXIT_REFUSED", "main"]

EXIT_REFUSED = 2
EXIT_OUT_OF_MEMORY = 3
CODE_BASE = 48
"""The first clock's character ("0"): JSON writes the first 79 clocks as one ASCII byte each."""


def limit_memory(memory_mib: int) -> None:
    limit = memory_mib << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    with contextlib.suppress(OSError):  # not Linux, or no /proc: the limit above still holds
        Path("/proc/self/oom_score_adj").write_text("1000", encoding="ascii")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m perseus_operator.plan_worker MEMORY_MIB", file=sys.stderr)
        return EXIT_REFUSED
    limit_memory(int(args[0]))
    try:
        request = json.load(sys.stdin)
        from perseus_operator.planner import SCHEDULES, PipelineShape, compute_frontier
        from perseus_profiles import parse_profile_csv

        profile = parse_profile_csv(str(request["profile_csv"]))
        schedule = request.get("schedule", "1f1b")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}")
        shape = PipelineShape(
            int(request["stages"]),
            int(request["microbatches"]),
            schedule,
            int(request.get("virtual_stages", 1)),
        )
        frontier = compute_frontier(profile, shape, float(request["blocking_power_w"]))
        code = {f: chr(CODE_BASE + i) for i, f in enumerate(profile.frequencies_mhz)}
        out = {
            "t0_s": frontier.t0_s,
            "baseline_energy_j": frontier.baseline_energy_j,
            "plans": [
                [
                    p.iteration_time_s,
                    p.energy_j,
                    ["".join(code[f] for f in row) for row in p.frequencies_mhz],
                ]
                for p in frontier.plans
            ],
        }
        sys.stdout.buffer.write(json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode())
        sys.stdout.flush()
    except MemoryError:
        print("out of memory", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    except (ValueError, KeyError, TypeError) as exc:  # ProfileError is a ValueError
        text = str(exc).strip().splitlines()
        print(text[0] if text else type(exc).__name__, file=sys.stderr)
        return EXIT_REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
