#!/usr/bin/env bash
# The main job on its embedded default: plan the energy/time frontier of a real GPT-3 175B
# profile (A100, 8 stages x 12 microbatches) and print the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/perseus plan --example gpt3-175b-a100 --microbatches 12 --out out/frontier.json --plot out/frontier.png
