#!/bin/sh
# Log LLM calls to llmlogd from a shell script. A POSIX shell cannot open a Unix socket by
# itself, so this uses curl, which speaks HTTP on the same socket (`llmlogd send` is the
# other way, where llmlogd is installed).
set -eu
SOCKET="${LLMLOGD_SOCKET:-/run/llmlogd/llmlogd.sock}"

# NDJSON, one event per line; the reply comes once every event is on disk.
reply=$(curl -sS --max-time 30 --unix-socket "$SOCKET" \
  -H 'content-type: application/x-ndjson' --data-binary @- \
  http://localhost/v1/events <<'NDJSON'
{"model":"gpt-4o","input":"What is 2+2?","output":"4","client":"shell"}
{"model":"gpt-4o","input":"And 3+3?","output":"6","client":"shell"}
NDJSON
)
case $reply in
  *'"accepted"'*) echo "stored: $reply" ;;
  *) echo "llmlogd refused the events: $reply" >&2; exit 1 ;;
esac
