#!/usr/bin/env bash
# Start (or confirm) a local Slurm cluster on this machine: munged, slurmctld and
# one slurmd per node, every node being this machine on 127.0.0.1.
#
#   slurm/local-cluster/start.sh            # one node, NodeName=localhost
#   slurm/local-cluster/start.sh --nodes 2  # two nodes n1,n2 (two slurmd)
#
# Idempotent: a running cluster with the same node count is left alone.
# Needs root (installs Debian packages if missing, runs the daemons as root).
# Environment: MOEX_SLURM_RUN_DIR (state, spool, logs; default /var/tmp/moex-slurm),
# MOEX_SLURM_NODES (default node count), MOEX_SLURM_TIMEOUT (seconds, default 60).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN_DIR="${MOEX_SLURM_RUN_DIR:-/var/tmp/moex-slurm}"
NODES="${MOEX_SLURM_NODES:-1}"
TIMEOUT="${MOEX_SLURM_TIMEOUT:-60}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --nodes=*) NODES="${1#*=}"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "start.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
CONF="$RUN_DIR/slurm.conf"
MARKER="# moex local Slurm cluster"

die() { echo "start.sh: ERROR: $*" >&2; exit 1; }
log() { echo "start.sh: $*"; }

if [[ "$NODES" == 1 ]]; then NAMES=(localhost); NODE_LIST=localhost
else NAMES=(); for i in $(seq 1 "$NODES"); do NAMES+=("n$i"); done; NODE_LIST="n[1-$NODES]"; fi

cluster_ready() {  # all configured nodes idle, and the node list is ours
  local out
  out="$(SLURM_CONF="$CONF" timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null)" || return 1
  [[ "$(echo "$out" | wc -l)" == "$NODES" ]] || return 1
  for n in "${NAMES[@]}"; do echo "$out" | grep -qx "$n idle" || return 1; done
}

render_conf() {  # render the template into $1
  local lines="" i
  for i in "${!NAMES[@]}"; do
    lines+="NodeName=${NAMES[$i]} NodeAddr=127.0.0.1 NodeHostname=$(hostname -s) Port=$((16818 + i)) CPUs=$(nproc) State=UNKNOWN"$'\n'
  done
  python3 - "$HERE/slurm.conf.in" "$1" "$RUN_DIR" "$(hostname -s)" "$lines" "$NODE_LIST" <<'PY'
import sys
src, dst, run_dir, host, nodes, node_list = sys.argv[1:]
text = open(src).read()
for key, val in {"@RUN_DIR@": run_dir, "@CTLD_HOST@": host,
                 "@NODES@": nodes.rstrip("\n"), "@NODE_LIST@": node_list}.items():
    text = text.replace(key, val)
open(dst, "w").write(text)
PY
}

# Already up with exactly this configuration: nothing to do.
if [[ -f "$CONF" ]] && command -v sinfo >/dev/null && command -v python3 >/dev/null; then
  fresh="$(mktemp)"; render_conf "$fresh"
  if cmp -s "$fresh" "$CONF" && cluster_ready; then
    rm -f "$fresh"; log "already running ($NODES node(s): $NODE_LIST); SLURM_CONF=$CONF"; exit 0
  fi
  rm -f "$fresh"
fi
[[ "$(id -u)" == 0 ]] || die "not running (or configured differently) and not root: the local cluster needs root to start"

# 1. Packages.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sinfo >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || die "Slurm not installed and apt-get not available"
  log "installing slurmctld slurmd slurm-client munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || die "apt-get update failed"
  apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null \
    || die "apt-get install slurmctld slurmd slurm-client munge failed"
fi

# 2. Munge: key, directories, daemon (as the munge user, as it insists).
getent passwd munge >/dev/null || die "no munge user (package install incomplete?)"
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  log "creating /etc/munge/munge.key"
  if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
fi
chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key; chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged || die "munged failed to start (see /var/log/munge/munged.log)"
  for _ in $(seq 1 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null 2>&1 || die "munge does not work (see /var/log/munge/munged.log)"
fi

# 3. Config: render the template; stop an older cluster of ours first.
if [[ -f "$CONF" ]]; then "$HERE/stop.sh" >/dev/null 2>&1 || true; fi
mkdir -p "$RUN_DIR"/{state,spool,log}
render_conf "$CONF"
# Client commands (srun, sbatch, sinfo, and slurmstepd) read /etc/slurm/slurm.conf
# unless SLURM_CONF is set: link ours there unless someone else's config is in place.
mkdir -p /etc/slurm
if [[ ! -e /etc/slurm/slurm.conf ]] || [[ -L /etc/slurm/slurm.conf ]] \
   || head -1 /etc/slurm/slurm.conf | grep -q "^$MARKER"; then
  ln -sfn "$CONF" /etc/slurm/slurm.conf
else
  log "WARNING: /etc/slurm/slurm.conf is not ours; export SLURM_CONF=$CONF to use this cluster"
fi
export SLURM_CONF="$CONF"

# 4. Daemons.
log "starting slurmctld"
slurmctld -f "$CONF" || die "slurmctld failed (see $RUN_DIR/log/slurmctld.log)"
for n in "${NAMES[@]}"; do
  log "starting slurmd -N $n"
  slurmd -f "$CONF" -N "$n" || die "slurmd -N $n failed (see $RUN_DIR/log/slurmd-$n.log)"
done

# 5. Wait for every node to be idle.
deadline=$((SECONDS + TIMEOUT))
until cluster_ready; do
  if (( SECONDS > deadline )); then
    sinfo -N -l >&2 || true
    tail -n 20 "$RUN_DIR"/log/*.log >&2 || true
    die "nodes not idle after ${TIMEOUT}s (logs in $RUN_DIR/log)"
  fi
  sleep 0.5
done
log "up: $NODES node(s) $NODE_LIST idle in ${SECONDS}s; SLURM_CONF=$CONF; $(sinfo -V)"
