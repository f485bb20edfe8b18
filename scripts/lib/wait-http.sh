#!/usr/bin/env bash
# Usage: wait-http.sh URL [TIMEOUT_SECONDS] [PID]
# Polls URL every 0.1 s until it answers with a 2xx/3xx status. Exits 1 on timeout
# (default 30 s), or as soon as PID (the process that should serve URL) has exited.
set -euo pipefail
url=${1:?usage: wait-http.sh URL [TIMEOUT_SECONDS] [PID]}
timeout=${2:-30}
pid=${3:-}
deadline=$((SECONDS + timeout))
while ((SECONDS < deadline)); do
  if curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; then
    exit 0
  fi
  if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
    echo "wait-http.sh: process $pid exited before $url was ready" >&2
    exit 1
  fi
  sleep 0.1
done
echo "wait-http.sh: $url not ready after ${timeout}s" >&2
exit 1
