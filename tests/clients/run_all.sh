#!/usr/bin/env bash
# Run the four official-client scripts end to end.
#
#   tests/clients/run_all.sh [--fixtures]
#
# Environment:
#   LLMLOGD_URL       base URL of llmlogd, e.g. http://127.0.0.1:8080 (no trailing slash).
#                     Unset: record_server.py plays the Pezzo/PromptLayer server too (self-test).
#   PEZZO_URL         override for the Pezzo clients        (default: $LLMLOGD_URL)
#   PROMPTLAYER_URL   override for the PromptLayer clients  (default: $LLMLOGD_URL)
#   PYTHON            interpreter with requirements.txt installed (default: python3)
#   NODE              node binary (default: node); `npm ci` must have run in tests/clients
#   RECORD_DIR        where the per-client request logs go (default: a new temp dir)
#   EXTRAS=1          passed to the scripts (cache, wrapper /track-request, buggy async track.prompt)
#   ONLY="pezzo_node promptlayer_py"   run a subset
#
# A record_server.py is always started per client as the OpenAI mock (OPENAI_BASE_URL);
# in self-test mode it also receives the logging traffic, and --fixtures then regenerates
# tests/fixtures/clients/ from what was recorded.
# Prints "N passed, N failed" last; exits non-zero if any client failed.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
NODE="${NODE:-node}"
RECORD_DIR="${RECORD_DIR:-$(mktemp -d)}"
FIXTURES=0
[ "${1:-}" = "--fixtures" ] && FIXTURES=1
if [ "$FIXTURES" = 1 ] && [ -n "${LLMLOGD_URL:-}${PEZZO_URL:-}${PROMPTLAYER_URL:-}" ]; then
  echo "--fixtures only makes sense in self-test mode (no LLMLOGD_URL)" >&2
  exit 2
fi
mkdir -p "$RECORD_DIR"

passed=0
failed=0
server_pid=""

start_server() { # $1 = log file
  rm -f "$RECORD_DIR/port" "$1"
  python3 "$HERE/record_server.py" 0 "$1" --port-file "$RECORD_DIR/port" \
    >"$RECORD_DIR/server.out" 2>>"$RECORD_DIR/server.err" &
  server_pid=$!
  for _ in $(seq 1 100); do
    [ -s "$RECORD_DIR/port" ] && break
    sleep 0.1
  done
  port="$(cat "$RECORD_DIR/port")"
}

stop_server() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
    server_pid=""
  fi
}
trap stop_server EXIT

run_client() { # $1 = client name, rest = command
  local client="$1"
  shift
  local log="$RECORD_DIR/$client.jsonl"
  start_server "$log"
  local self="http://127.0.0.1:$port"
  local pezzo="${PEZZO_URL:-${LLMLOGD_URL:-$self}}"
  local pl="${PROMPTLAYER_URL:-${LLMLOGD_URL:-$self}}"
  echo "=== $client (logging server: $([ -n "${LLMLOGD_URL:-}${PEZZO_URL:-}${PROMPTLAYER_URL:-}" ] && echo llmlogd || echo record_server), OpenAI mock: $self/v1)"
  if (cd "$HERE" && PEZZO_SERVER_URL="$pezzo" PROMPTLAYER_BASE_URL="$pl" OPENAI_BASE_URL="$self/v1" \
      timeout 300 "$@"); then
    passed=$((passed + 1))
    echo "--- $client: PASS"
    if [ "$FIXTURES" = 1 ]; then
      find "$HERE/../fixtures/clients" -name "$client-*.json" -delete 2>/dev/null
      python3 "$HERE/extract_fixtures.py" "$client" "$log"
    fi
  else
    failed=$((failed + 1))
    echo "--- $client: FAIL (request log: $log)"
  fi
  stop_server
}

for client in ${ONLY:-pezzo_node pezzo_py promptlayer_node promptlayer_py}; do
  case "$client" in
    pezzo_node) run_client pezzo_node "$NODE" pezzo_node.mjs ;;
    pezzo_py) run_client pezzo_py "$PYTHON" pezzo_py.py ;;
    promptlayer_node) run_client promptlayer_node "$NODE" promptlayer_node.mjs ;;
    promptlayer_py) run_client promptlayer_py "$PYTHON" promptlayer_py.py ;;
    *) echo "unknown client $client" >&2; failed=$((failed + 1)) ;;
  esac
done

echo "request logs: $RECORD_DIR"
echo "clients: $passed passed, $failed failed"
[ "$failed" = 0 ]
