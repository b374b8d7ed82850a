#!/usr/bin/env bash
# The job on one TPU VM worker: `python launch/tpu.py run|status|logs|stop` call this on every worker over ssh.
#
#   bash vqddm/launch/worker_run.sh stamp    this worker's id and the VERSION stamp of its synced code
#   bash vqddm/launch/worker_run.sh start [--no-preflight] [--env=KEY=VALUE ...] -- COMMAND [ARG ...]
#       start COMMAND detached from the ssh session (a dropped connection does not stop it): first
#       `python -m vqddm_jax.preflight` (its --workdir and --distributed taken from COMMAND's arguments), then
#       COMMAND; output in vqddm_run/job.log, exit code in vqddm_run/exit_code when it ends.
#   bash vqddm/launch/worker_run.sh status   one line: state=running|finished|failed|stopped|died|not-started
#   bash vqddm/launch/worker_run.sh logs [N] the last N lines (default 100) of the log
#   bash vqddm/launch/worker_run.sh stop [GRACE]
#       SIGTERM the job (it saves a checkpoint and exits 0), SIGKILL what is left after GRACE seconds
#       (default 300), then free the TPU.
#
# exit_code holds "RC" or "RC stopped" (the job got SIGTERM: a rerun resumes). Directories live under
# $VQDDM_HOME (default $HOME): vqddm/ (code), vqddm_venv/ (VQDDM_VENV overrides), vqddm_run/ (job state).
set -euo pipefail

BASE=${VQDDM_HOME:-$HOME}
CODE_DIR=$BASE/vqddm
VENV=${VQDDM_VENV:-$BASE/vqddm_venv}
RUN_DIR=$BASE/vqddm_run
LOG=$RUN_DIR/job.log
EXIT_FILE=$RUN_DIR/exit_code
PID_FILE=$RUN_DIR/pid
LIBTPU_LOCKFILE=${VQDDM_LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")

die() {
  echo "worker_run.sh: $*" >&2
  exit 1
}

worker_id() {
  if [[ -n ${VQDDM_WORKER_ID:-} ]]; then
    echo "$VQDDM_WORKER_ID"
    return
  fi
  # A TPU VM publishes its index in the slice as instance metadata; elsewhere the host name has to do.
  curl -sf -m 5 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null ||
    hostname
}

as_root() {
  if ((EUID == 0)); then
    "$@"
  elif sudo -n true 2>/dev/null; then
    sudo -n "$@"
  else
    "$@"
  fi
}

# Prints the pid of this worker's running job; fails when none runs.
job_pid() {
  local pid
  [[ -f $PID_FILE ]] || return 1
  pid=$(<"$PID_FILE")
  # After a reboot the pid may belong to another program: only our own wrapper counts.
  if [[ -r /proc/$pid/cmdline ]] && grep -qa worker_run.sh "/proc/$pid/cmdline"; then
    echo "$pid"
  else
    return 1
  fi
}

# Ends leftover processes holding the TPU (a crashed or killed run keeps it busy: the next one cannot open it)
# and removes libtpu's lock file, which a killed process leaves behind.
free_tpu() {
  local devices pids=()
  shopt -s nullglob
  devices=(/dev/accel* /dev/vfio/[0-9]*)
  shopt -u nullglob
  if ((${#devices[@]})); then
    if command -v lsof >/dev/null; then
      read -ra pids <<<"$(as_root lsof -t "${devices[@]}" 2>/dev/null | tr '\n' ' ' || true)"
    elif command -v fuser >/dev/null; then
      read -ra pids <<<"$(as_root fuser "${devices[@]}" 2>/dev/null || true)"
    fi
  fi
  if ((${#pids[@]})); then
    echo "worker $(worker_id): killing stale processes holding the TPU: ${pids[*]}"
    as_root kill -9 "${pids[@]}" || true
  fi
  as_root rm -f "$LIBTPU_LOCKFILE"
}

cmd_stamp() {
  local version=missing
  if [[ -s $CODE_DIR/VERSION ]]; then
    read -r version <"$CODE_DIR/VERSION"
  fi
  echo "vqddm-stamp worker=$(worker_id) version=$version"
}

cmd_start() {
  local preflight=1 envs=()
  while (($#)); do
    case $1 in
      --no-preflight) preflight=0 ;;
      --env=*) envs+=("$1") ;;
      --) shift && break ;;
      *) die "start: unknown option $1 (the command goes after --)" ;;
    esac
    shift
  done
  (($#)) || die "start: no command after --"
  local pid
  if pid=$(job_pid); then
    die "a job is already running on worker $(worker_id) (pid $pid): stop it first"
  fi
  free_tpu
  mkdir -p "$RUN_DIR"
  rm -f "$EXIT_FILE" "$PID_FILE"
  if [[ -f $LOG ]]; then
    mv "$LOG" "$LOG.previous"
  fi
  # setsid: a session of its own, so the job outlives this ssh connection; nohup: SIGHUP ignored all the same.
  VQDDM_PREFLIGHT=$preflight setsid nohup bash "$SELF" _job "${envs[@]}" -- "$@" >"$LOG" 2>&1 </dev/null &
  for _ in $(seq 50); do
    [[ -s $PID_FILE ]] && break
    sleep 0.1
  done
  echo "worker $(worker_id): started (pid $(cat "$PID_FILE" 2>/dev/null || echo '?')), log $LOG"
}

# Runs "$@" in the background and waits for it, so that a SIGTERM to this shell reaches it through on_term.
CHILD=
STOPPED=
run_child() {
  "$@" &
  CHILD=$!
  local rc
  while :; do
    rc=0
    wait "$CHILD" || rc=$?
    # A trapped signal interrupts wait (status > 128) while the child may still be saving its checkpoint.
    if ((rc > 128)) && kill -0 "$CHILD" 2>/dev/null; then
      continue
    fi
    break
  done
  CHILD=
  return "$rc"
}

on_term() {
  STOPPED=1
  if [[ -n $CHILD ]]; then
    kill -TERM "$CHILD" 2>/dev/null || true
  fi
}

# Preflight arguments from the job's own: the same work directory, and --distributed for multi-host jobs.
PREFLIGHT_ARGS=()
preflight_args() {
  local arg
  PREFLIGHT_ARGS=()
  for arg in "$@"; do
    case $arg in
      --workdir=*) PREFLIGHT_ARGS+=("$arg") ;;
      --config.distributed.enabled=True | --config.distributed.enabled=true) PREFLIGHT_ARGS+=(--distributed) ;;
      --config.distributed.local_device_ids=*) PREFLIGHT_ARGS+=("--local_device_ids=${arg#*=}") ;;
    esac
  done
}

# The detached job (started by cmd_start): environment, preflight, the command, its exit code.
cmd_job() {
  echo $$ >"$PID_FILE"
  while [[ $1 != -- ]]; do
    export "${1#--env=}"
    shift
  done
  shift
  trap on_term TERM INT HUP
  cd "$CODE_DIR"
  if [[ -f $VENV/bin/activate ]]; then
    # shellcheck source=/dev/null
    source "$VENV/bin/activate"
  else
    echo "worker_run.sh: no environment at $VENV (run setup): using $(command -v python || echo 'no python')"
  fi
  export PYTHONUNBUFFERED=1
  echo "== $(date -u '+%F %T') worker $(worker_id), code $(cat VERSION 2>/dev/null || echo '?'): $*"
  local rc=0
  preflight_args "$@"
  if [[ ${VQDDM_PREFLIGHT:-1} == 1 && ${#PREFLIGHT_ARGS[@]} -gt 0 ]]; then
    run_child python -m vqddm_jax.preflight "${PREFLIGHT_ARGS[@]}" || rc=$?
  fi
  if ((rc == 0)) && [[ -z $STOPPED ]]; then
    run_child "$@" || rc=$?
  fi
  echo "== $(date -u '+%F %T') exit code $rc${STOPPED:+ (stopped by a signal)}"
  echo "$rc${STOPPED:+ stopped}" >"$EXIT_FILE"
}

cmd_status() {
  local id pid rc how
  id=$(worker_id)
  if pid=$(job_pid); then
    echo "vqddm-status worker=$id state=running pid=$pid"
  elif [[ -f $EXIT_FILE ]]; then
    read -r rc how <"$EXIT_FILE" || true
    if [[ $how == stopped ]]; then
      echo "vqddm-status worker=$id state=stopped rc=$rc"
    elif [[ $rc == 0 ]]; then
      echo "vqddm-status worker=$id state=finished rc=0"
    else
      echo "vqddm-status worker=$id state=failed rc=$rc"
    fi
  elif [[ -f $PID_FILE ]]; then  # killed before it could write its exit code (SIGKILL, reboot)
    echo "vqddm-status worker=$id state=died"
  else
    echo "vqddm-status worker=$id state=not-started"
  fi
}

cmd_logs() {
  local lines=${1:-100}
  echo "== worker $(worker_id): last $lines lines of $LOG"
  if [[ -f $LOG ]]; then
    tail -n "$lines" "$LOG"
  else
    echo "(no log: the job was never started on this worker)"
  fi
}

cmd_stop() {
  local grace=${1:-300} pid id
  id=$(worker_id)
  if pid=$(job_pid); then
    echo "worker $id: SIGTERM to job $pid; waiting up to ${grace}s for its checkpoint"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace; i++)); do
      job_pid >/dev/null || break
      sleep 1
    done
    if job_pid >/dev/null; then
      echo "worker $id: still running after ${grace}s: SIGKILL"
      # setsid made the wrapper the leader of its process group: end the whole group.
      kill -KILL -- "-$pid" 2>/dev/null || true
      echo "137 stopped" >"$EXIT_FILE"
    fi
  else
    echo "worker $id: no job running"
  fi
  free_tpu
}

main() {
  (($#)) || die "usage: worker_run.sh stamp|start|status|logs|stop|_job [args]"
  local command=$1
  shift
  case $command in
    stamp) cmd_stamp ;;
    start) cmd_start "$@" ;;
    status) cmd_status ;;
    logs) cmd_logs "$@" ;;
    stop) cmd_stop "$@" ;;
    _job) cmd_job "$@" ;;
    *) die "unknown command $command" ;;
  esac
}

main "$@"
