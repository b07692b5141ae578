"""Print the project's import picture: which of its parts imports which, in words.

The parts are the five packages, with the operator's planner and the sidecar's GPU backends shown
on their own (they carry the boundaries the import contracts in pyproject.toml enforce). One line
per part: what it imports of ours, and the third-party packages it imports. Run it after a
change of structure and compare with docs/operator.md's picture.

    .venv/bin/python scripts/import_picture.py
"""

from __future__ import annotations

import sys

import grimp

PACKAGES = (
    "perseus_hooks",
    "perseus_profiles",
    "perseus_sidecar",
    "perseus_operator",
    "perseus_sim",
)
# Sub-packages shown as parts of their own, most specific first.
PARTS = ("perseus_operator.planner", "perseus_sidecar.gpu", *PACKAGES)


def part_of(module: str) -> str | None:
    """The part a module belongs to, or None for a module that is not ours."""
    for part in PARTS:
        if module == part or module.startswith(part + "."):
            return part
    return None


def picture() -> dict[str, tuple[set[str], set[str]]]:
    """Each part -> (parts of ours it imports, third-party top-level packages it imports)."""
    graph = grimp.build_graph(*PACKAGES, include_external_packages=True)
    out: dict[str, tuple[set[str], set[str]]] = {p: (set(), set()) for p in PARTS}
    for module in graph.modules:
        source = part_of(module)
        if source is None:
            continue
        for imported in graph.find_modules_directly_imported_by(module):
            target = part_of(imported)
            if target is None:
                top = imported.split(".")[0]
                if top not in sys.stdlib_module_names:
                    out[source][1].add(top)
            elif target != source:
                out[source][0].add(target)
    return out


def main() -> int:
    for part, (ours, external) in picture().items():
        arrows = ", ".join(sorted(ours)) or "nothing of ours"
        third = ", ".join(sorted(external)) or "standard library only"
        print(f"{part:26} -> {arrows}\n{'':26}    third-party: {third}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
