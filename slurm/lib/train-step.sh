#!/usr/bin/env bash
# Shared body of the moex sbatch scripts; runs inside the batch shell (exec'd, so
# it keeps the batch shell's pid and receives the B:USR1 warning signal).
#
#   train-step.sh RECIPE [dotted.override=value ...]
#
# One `srun` launches every rank of the allocation; each rank's Python reads its
# rank/world/master from SLURM_* (moex.parallel.launch.detect_launch).
#
# Preemption contract with the trainer:
#   Slurm sends SIGUSR1 to this shell 120 s before the time limit
#   (--signal=B:USR1@120); we forward it to srun, which forwards it to every
#   task. The trainer saves a checkpoint at the next step boundary, waits for all
#   ranks, and exits 124. On 124 this script runs `scontrol requeue`; the job
#   keeps its id, so the requeued run finds train.run_name=<stem>-<jobid> and
#   resumes (train.resume=auto). Exit 124 after a SIGTERM (scancel, scheduler
#   preemption) is not requeued.
# Environment knobs: MOEX_RUN_NAME (default: recipe stem), MOEX_CMD (default
# "python -m moex.cli"), MOEX_SRUN_ARGS (extra srun flags), MASTER_ADDR/PORT.
set -uo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: sbatch slurm/<script>.sbatch RECIPE [dotted.override=value ...]" >&2; exit 2
fi
RECIPE="$1"; shift
: "${SLURM_JOB_ID:?not inside a Slurm job: submit with sbatch}"

RUN_NAME="${MOEX_RUN_NAME:-$(basename "${RECIPE%.*}")}-${SLURM_JOB_ID}"

# Rendezvous from the allocation, computed once here rather than by every rank:
# the first node's NodeAddr (its name may not resolve, e.g. n1 on a local cluster).
first_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
first_addr="$(scontrol show node "$first_node" -o 2>/dev/null | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')"
export MASTER_ADDR="${MASTER_ADDR:-${first_addr:-$first_node}}"
# MASTER_PORT: left to moex.parallel.launch (one home for the formula), which derives
# the same port on every rank from SLURM_JOB_ID unless it is set here.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

echo "[moex] job ${SLURM_JOB_ID} restart=${SLURM_RESTART_COUNT:-0} nodes=${SLURM_JOB_NODELIST}" \
     "tasks=${SLURM_NTASKS} master=${MASTER_ADDR}:${MASTER_PORT:-<from job id>} run=${RUN_NAME} $(date -Is)"

srun_pid=""
got_term=0
on_usr1() {
  echo "[moex] SIGUSR1 (time limit near): asking every rank to checkpoint and exit"
  [[ -n "$srun_pid" ]] && kill -USR1 "$srun_pid" 2>/dev/null
}
# SIGTERM (scancel, time limit, preemption) reaches every task from Slurm itself;
# note it, so the shell survives to report srun's status and does not requeue a
# job that Slurm is ending (the trainer checkpoints and exits 124 on SIGTERM too).
on_term() { got_term=1; echo "[moex] SIGTERM: Slurm is ending the job"; }
trap on_usr1 USR1
trap on_term TERM

# shellcheck disable=SC2086  # MOEX_CMD / MOEX_SRUN_ARGS are word lists by design
# --kill-on-bad-exit=0: ranks leave a few ms apart after the checkpoint barrier;
# killing the slower ones on the first exit 124 would turn the step's status
# into 143 (SIGTERM) and lose the "preempted" signal.
srun --kill-on-bad-exit=0 ${MOEX_SRUN_ARGS:-} ${MOEX_CMD:-python -m moex.cli} \
  train "$RECIPE" "train.run_name=${RUN_NAME}" "$@" &
srun_pid=$!
# `wait` returns early (status > 128) whenever a trapped signal arrives: keep
# waiting until srun itself has exited.
while :; do
  wait "$srun_pid"; rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done

if [[ $rc -eq 124 && $got_term -eq 1 ]]; then
  # scancel, or preemption by the scheduler (which requeues by itself under
  # PreemptMode=REQUEUE): requeueing here would undo a user's scancel.
  echo "[moex] trainer checkpointed after SIGTERM (exit 124): not requeueing;" \
       "resubmit with train.run_name=${RUN_NAME} to resume"
  exit 124
fi
if [[ $rc -eq 124 ]]; then
  echo "[moex] trainer checkpointed and stopped (exit 124): requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID" || { echo "[moex] requeue failed" >&2; exit 124; }
  exit 0
fi
echo "[moex] srun exited with $rc $(date -Is)"
exit "$rc"
