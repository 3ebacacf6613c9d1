#!/usr/bin/env bash
# Run CI (or some tests) in a fresh clone while a CPU-burning busy loop holds one core: a test
# that depends on timing fails here first (issue 31). Prints one PASS/FAIL line per run, with its
# wall time, and exits non-zero if any run failed.
#
#   scripts/ci_under_load.sh                     # CI=true bash .ci/run, once
#   scripts/ci_under_load.sh --runs 3            # three times, one after the other
#   scripts/ci_under_load.sh -- tests/test_engine_server.py -k usage   # pytest args instead of CI
#
# --runs N     runs, one after the other (default 1)
# --core C     the core the busy loop is pinned to (default 0)
# --ref REF    what to clone (default HEAD: committed work only)
# --venv PATH  an installed environment to use instead of installing one into the clone (pytest
#              mode only: .ci/run always installs); the clone goes first on PYTHONPATH, so its
#              own code is tested even though the environment's vllm-namm is an editable install
# --keep       keep the clones and logs (default: kept only for failed runs)
# Logs: one file per run, named on its result line.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
runs=1 core=0 ref=HEAD venv="" keep=0
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --core) core="$2"; shift 2 ;;
        --ref) ref="$2"; shift 2 ;;
        --venv) venv="$(cd "$2" && pwd)"; shift 2 ;;
        --keep) keep=1; shift ;;
        --) shift; break ;;
        *) echo "ci_under_load.sh: unknown argument '$1' (see the header of this script)" >&2; exit 2 ;;
    esac
done
command -v taskset >/dev/null || { echo "ci_under_load.sh: needs taskset (util-linux)" >&2; exit 2; }
commit="$(git rev-parse --verify "$ref^{commit}")"

busy=""
stop_busy() { [ -z "$busy" ] || kill "$busy" 2>/dev/null || true; busy=""; }
trap stop_busy EXIT INT TERM

failed=0
for i in $(seq 1 "$runs"); do
    work="$(mktemp -d "${TMPDIR:-/tmp}/ci-under-load.XXXXXX")"
    log="$work/run.log"
    git clone -q --no-hardlinks "$repo" "$work/repo"
    git -C "$work/repo" checkout -q "$commit"
    taskset -c "$core" sh -c 'while :; do :; done' &
    busy=$!
    start=$(date +%s)
    set +e
    if [ $# -eq 0 ]; then
        (cd "$work/repo" && CI=true bash .ci/run) >"$log" 2>&1
    else
        if [ -n "$venv" ]; then
            ln -s "$venv" "$work/repo/.venv"
        else
            (cd "$work/repo" && bash scripts/install.sh) >"$log" 2>&1
        fi
        (cd "$work/repo" && PYTHONPATH="$work/repo${PYTHONPATH:+:$PYTHONPATH}" \
            VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" \
            .venv/bin/python -m pytest -q -ra -p no:cacheprovider "$@") >>"$log" 2>&1
    fi
    rc=$?
    set -e
    secs=$(( $(date +%s) - start ))
    stop_busy
    summary="$(grep -E '[0-9]+ (passed|failed)' "$log" | tail -1 || true)"
    if [ "$rc" -eq 0 ]; then verdict=PASS; else verdict=FAIL; failed=1; fi
    if [ "$verdict" = PASS ] && [ "$keep" = 0 ]; then  # keep the log, drop the clone
        kept="${TMPDIR:-/tmp}/ci-under-load-${commit:0:7}-run$i-$(date +%s).log"
        cp "$log" "$kept" && rm -rf "$work" && log="$kept"
    fi
    printf '%s run %d/%d  %dm%02ds  commit %s  busy core %s  %s  log %s\n' \
        "$verdict" "$i" "$runs" $((secs / 60)) $((secs % 60)) "${commit:0:7}" "$core" "${summary:-rc=$rc}" "$log"
done
exit "$failed"
