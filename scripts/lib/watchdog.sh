#!/usr/bin/env bash
# Usage: watchdog.sh PARENT_PID CMD [ARGS...]
# Runs CMD and stops it (SIGTERM, then SIGKILL after 5 s) once PARENT_PID is gone,
# checking every second. Exits with CMD's status when CMD ends by itself.
#
# Polling a pid works whatever started us (a Rust test thread included; prctl's
# PDEATHSIG would fire when the spawning *thread* exits). The parent's start time is
# recorded too, so a recycled pid does not keep CMD alive.
# SIGTERM/SIGINT/SIGHUP to the watchdog are passed on to CMD.
set -euo pipefail
parent=${1:?usage: watchdog.sh PARENT_PID CMD [ARGS...]}
shift
(($# > 0)) || { echo "usage: watchdog.sh PARENT_PID CMD [ARGS...]" >&2; exit 64; }

start_time() { # field 22 of /proc/PID/stat, empty when unknown
  local stat
  local -a fields
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) }
  read -r -a fields <<<"$stat"
  printf '%s' "${fields[19]:-}"
}
parent_started=$(start_time "$parent")
parent_alive() {
  kill -0 "$parent" 2>/dev/null || return 1
  [[ -z $parent_started ]] || [[ $(start_time "$parent") == "$parent_started" ]]
}
parent_alive || { echo "watchdog.sh: parent $parent is not running" >&2; exit 1; }

"$@" &
child=$!

stop_child() {
  local i
  kill -TERM "$child" 2>/dev/null || return 0
  for ((i = 0; i < 50; i++)); do
    kill -0 "$child" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$child" 2>/dev/null || true
}
trap 'stop_child; wait "$child" 2>/dev/null; exit 143' TERM INT HUP

while kill -0 "$child" 2>/dev/null; do
  if ! parent_alive; then
    echo "watchdog.sh: parent $parent is gone, stopping $1 (pid $child)" >&2
    stop_child
    break
  fi
  sleep 1 &
  wait $! || true
done
set +e
wait "$child"
exit $?
