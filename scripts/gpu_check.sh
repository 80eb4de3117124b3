#!/usr/bin/env bash
# The one GPU check (scripts/gpu_check.py): GPU tests + DDPM and solver benchmarks, report.md/report.json in --out.
#   scripts/gpu_check.sh --out gpu_check_report            # PYTHON=/path/to/python3 to pick the interpreter
# Without a GPU it prints one line and exits 0; `scripts/gpu_check.sh --help` for every option.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
