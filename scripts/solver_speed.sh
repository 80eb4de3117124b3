#!/usr/bin/env bash
# Issue 16's solver-speed measurements, all through `emu bench` (interleaved rounds, per-round
# ratios), on an otherwise idle machine: QG vs pyqg and Kolmogorov vs jax-cfd, one and two threads,
# each with one busy process on the side for the loaded/quiet ratio. The two-thread runs leave the
# peers out: a peer's own two-thread pool, spinning between its rounds, would be measured against emu's.
#
#   scripts/solver_speed.sh PYQG_PYTHON JAXCFD_PYTHON [OUT_DIR]
#
# PYQG_PYTHON: a side environment with pyqg 0.7.2 (scripts/pyqg_reference.py says how);
# JAXCFD_PYTHON: one with jax-cfd (python3 -m venv v && v/bin/pip install "jax[cpu]" jax-cfd).
set -euo pipefail
pyqg_python=${1:?usage: scripts/solver_speed.sh PYQG_PYTHON JAXCFD_PYTHON [OUT_DIR]}
jaxcfd_python=${2:?usage: scripts/solver_speed.sh PYQG_PYTHON JAXCFD_PYTHON [OUT_DIR]}
out=${3:-docs/evidence/solver-speed}
mkdir -p "$out"
common=(--rounds 7 --seconds 2 --busy-cores 1)
for threads in 1 2; do
  if [ "$threads" = 1 ]; then
    qg_peer=(--pyqg-python "$pyqg_python"); kolmogorov_peer=(--jaxcfd-python "$jaxcfd_python")
  else
    qg_peer=(--no-peers); kolmogorov_peer=(--no-peers)
  fi
  python3 -m emu.cli bench --threads "$threads" --system qg --backend numpy,torch --grid 64,128,256 \
    "${qg_peer[@]}" "${common[@]}" --json "$out/qg_threads$threads.json" | tee "$out/qg_threads$threads.txt"
  for dtype in float64 float32; do
    python3 -m emu.cli bench --threads "$threads" --system kolmogorov --backend numpy --grid 128,256,512 \
      --dtype "$dtype" "${kolmogorov_peer[@]}" "${common[@]}" --json "$out/kolmogorov_${dtype}_threads$threads.json" \
      | tee "$out/kolmogorov_${dtype}_threads$threads.txt"
  done
done
