#!/usr/bin/env python3
"""Validate rendered manifests strictly against a Kubernetes release's published schemas.

Unlike the kubernetes-validate CLI, a kind with no schema in that release is an error, not a
warning: that is exactly how an API the 1.20 test server accepts but newer clusters removed
(e.g. policy/v1beta1 PodSecurityPolicy) shows up. Unknown fields are errors too (strict).

Usage: scripts/validate_manifests.py [-k VERSION] FILE.yaml...   (default: the newest release)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate.utils as kv
import yaml


def validate_file(path: Path, version: str) -> list[str]:
    """One message per invalid or unknown object in ``path``; empty when all are valid."""
    errors: list[str] = []
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        obj: dict[str, Any] = doc
        name = f"{obj.get('apiVersion')}/{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
        try:
            kv.validate(obj, version, strict=True)
        except kv.SchemaNotFoundError as exc:
            errors.append(f"{path.name}: {name}: {exc.message}")
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            errors.append(f"{path.name}: {name}: {where}: {exc.message}")
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", "--kubernetes-version", default=kv.latest_version())
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:
        errors = [e for f in args.files for e in validate_file(f, args.kubernetes_version)]
    except (OSError, yaml.YAMLError, kv.VersionNotSupportedError) as exc:
        print(f"validate_manifests: {exc}", file=sys.stderr)
        return 2
    for error in errors:
        print(f"INVALID {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
