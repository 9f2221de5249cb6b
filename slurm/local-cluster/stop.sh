#!/usr/bin/env bash
# Stop the local Slurm cluster started by start.sh (slurmctld and every slurmd).
#   slurm/local-cluster/stop.sh          # keep munged running
#   slurm/local-cluster/stop.sh --munge  # stop munged too
# State (job ids, queue) stays in $MOEX_SLURM_RUN_DIR so job ids keep growing
# across restarts: run directories named after job ids are never reused.
set -uo pipefail
RUN_DIR="${MOEX_SLURM_RUN_DIR:-/var/tmp/moex-slurm}"

stop_pidfile() {  # SIGTERM the daemon named in a pid file, wait up to 10 s, then SIGKILL
  local f="$1" pid
  [[ -f "$f" ]] || return 0
  pid="$(cat "$f" 2>/dev/null)"
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    echo "stop.sh: stopped $(basename "$f" .pid) (pid $pid)"
  fi
  rm -f "$f"
}

for f in "$RUN_DIR"/slurmd-*.pid; do stop_pidfile "$f"; done
stop_pidfile "$RUN_DIR/slurmctld.pid"
if [[ "${1:-}" == "--munge" ]]; then stop_pidfile /run/munge/munged.pid; fi
exit 0
