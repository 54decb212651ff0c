#!/usr/bin/env bash
# Fuzz the HTTP API with schemathesis and every one of its checks (server errors, answers and
# headers against /openapi.json, valid input refused, invalid input taken, links followed with
# real sessions and tokens), against `python -m deployments` on the CPU default.
#
# Two runs, each on a freshly started app: the stateless phases (examples, coverage, fuzzing),
# then the stateful one, which follows the links from POST /sessions (the stateless phases
# leave sessions whose tokens nobody kept, and those would fill serve.max_sessions).
#
#   bash bench/fuzz_api.sh [--max-examples N]      (default 50; about 5 minutes on 2 cores)
#
# schemathesis lives in a virtual environment of its own ($FUZZ_VENV, default
# .fuzz-venv): it is a tool run against the app, not a dependency of it.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
venv=${FUZZ_VENV:-.fuzz-venv}
examples=50
if [ "${1:-}" = "--max-examples" ]; then examples=$2; fi
port=${FUZZ_PORT:-8321}
out=${FUZZ_OUT:-$(mktemp -d)}
mkdir -p "$out"

if [ ! -x "$venv/bin/schemathesis" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "schemathesis>=4.1,<5"
fi

app_pid=
stop_app() {
    if [ -n "$app_pid" ] && kill -0 "$app_pid" 2>/dev/null; then
        kill -TERM "$app_pid"
        wait "$app_pid" || true
    fi
    app_pid=
}
trap stop_app EXIT

start_app() {
    "$python" -m deployments serve.http_port="$port" serve.max_sessions=4 > "$out/app-$1.log" 2>&1 &
    app_pid=$!
    for _ in $(seq 600); do
        # Ready when the app says so: the Ingress answers before the replicas behind it are up,
        # and the first request would wait for them (and fail the response-time check).
        if grep -q "^serving '" "$out/app-$1.log" && curl -sf "http://127.0.0.1:$port/openapi.json" > /dev/null; then
            return
        fi
        kill -0 "$app_pid" 2>/dev/null || { tail -20 "$out/app-$1.log"; exit 1; }
        sleep 1
    done
    echo "the app did not answer on port $port"; exit 1
}

all_phases=${FUZZ_PHASES:-examples,coverage,fuzzing stateful}
status=0
for phases in $all_phases; do
    start_app "$phases"
    # In the stateful phase the tokens come from the app's answers, through the links: real
    # credentials (bench/fuzz_hooks.py).
    hooks=; [ "$phases" = stateful ] && hooks=bench.fuzz_hooks
    SCHEMATHESIS_HOOKS=$hooks PYTHONPATH=. "$venv/bin/schemathesis" run "http://127.0.0.1:$port/openapi.json" --checks all --phases "$phases" \
        --max-examples "$examples" --request-timeout 30 --no-color > "$out/$phases.txt" 2>&1 || status=1
    stop_app
done

echo
echo "| phases | test cases | failures | warnings |"
echo "|---|---|---|---|"
for phases in $all_phases; do
    f="$out/$phases.txt"
    cases=$(grep -Eo '[0-9]+ generated' "$f" | tail -1 | cut -d' ' -f1 || true)
    failures=$(grep -Eo 'found [0-9]+ unique' "$f" | tail -1 | cut -d' ' -f2 || true)
    warnings=$(grep -Eo '[0-9]+ warnings?' "$f" | tail -1 | cut -d' ' -f1 || true)
    echo "| $phases | ${cases:-?} | ${failures:-0} | ${warnings:-0} |"
done
echo
echo "schemathesis output and app logs: $out"
exit $status
