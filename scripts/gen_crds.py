#!/usr/bin/env python3
"""Regenerate crds/energypolicy.yaml from the pydantic models (tests fail when it is stale).

Usage: .venv/bin/python scripts/gen_crds.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

from perseus_operator.crd import render_yaml

TARGET = Path(__file__).resolve().parent.parent / "crds" / "energypolicy.yaml"


def main(argv: list[str]) -> int:
    text = render_yaml()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is stale: run scripts/gen_crds.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
