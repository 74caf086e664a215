#!/usr/bin/env bash
# tpu_init.sh - TPU VM startup script: check out vcell, sync data, run training on every host.
#
# Passed with `--metadata-from-file startup-script=tpu_init.sh`; GCE runs it as root on
# every host of the slice at every boot (first boot, reboot, spot restart). Every host runs
# the same program: the training code calls jax.distributed.initialize(), which finds its
# peers on TPU by itself, so this script does nothing host-specific.
#
# What it does, in order (each step safe to repeat):
#   1. read the vcell-* metadata keys below (a missing required key stops it, naming the key)
#   2. check out exactly <vcell-ref> of <vcell-repo> into $VCELL_HOME/repo
#      (fetch + detached checkout + clean; never `git clone` into an existing directory)
#   3. install uv if missing; `uv sync --frozen --extra tpu --no-dev --managed-python` from the
#      committed lock: uv installs its own CPython, so the image's Python (3.10 on Ubuntu 22.04,
#      or none) never matters and every image runs the same interpreter
#   4. `gcloud storage rsync` <vcell-data-bucket> -> $VCELL_HOME/data (copies changed files only)
#   5. run `uv run python <vcell-script> <vcell-args> --data-root D --checkpoint-dir C --resume-or-start`
#      and wait; on SIGTERM (spot preemption, shutdown) forward it and wait for the checkpoint
#   6. write a status line + status.json saying why it stopped; copy log and status to the bucket
# Before 3 it checks the image against the accelerator (one warning if they do not match; README
# "TPU type -> runtime version"). A host whose jax.distributed.initialize gives up (a peer came
# up late or died; bounded by vcell-distributed-timeout) stops with reason distributed-init-failed.
#
# Run from a workstation instead (not on a VM), `tpu_init.sh --recreate ...` keeps a spot queued
# resource alive: it re-creates the slice after each preemption until the run finishes (see
# recreate_usage below and README "After a preemption").
#
# Metadata keys (instance attributes; README "Train on a TPU slice" has examples):
#   key                      required  default              meaning
#   vcell-repo               yes       -                    git URL to fetch (public, or reachable without a prompt)
#   vcell-ref                yes       -                    commit sha (recommended), tag or branch to run
#   vcell-run-name           yes       -                    [A-Za-z0-9._-], <= 64 chars; names checkpoints, logs, wandb run
#   vcell-data-bucket        yes       -                    gs:// URL whose contents become the data root
#   vcell-checkpoint-bucket  yes       -                    gs:// URL; checkpoints go to <url>/<run-name>
#   vcell-script             no        nb/05_train.py       script to run, relative to the repo root
#   vcell-args               no        (none)               extra arguments, see "Arguments" below
#   vcell-log-bucket         no        <checkpoint-bucket>  gs:// URL; logs go to <url>/<run-name>/logs/<host>.log,
#                                                           status to <url>/<run-name>/status/<host>.json
#   vcell-runtime-version    no        (unset: not checked) the --version / --runtime-version the slice was created
#                                                           with; checked against accelerator-type
#   vcell-distributed-timeout no       300                  seconds jax.distributed.initialize waits for every host
#                                                           (exported as VCELL_DISTRIBUTED_TIMEOUT)
#   wandb-project            no        (unset)              exported as WANDB_PROJECT
#   wandb-entity             no        (unset)              exported as WANDB_ENTITY
#   wandb-api-key            no        (unset: wandb off)   exported as WANDB_API_KEY to the training process only;
#                                                           never printed (the log shows it masked)
#   agent-worker-number      (set by the TPU runtime)       this host's worker index, 0 if absent
#   accelerator-type         (set by the TPU runtime)       e.g. v5litepod-16; absent off TPU (image not checked)
#
# Arguments (vcell-args): split on whitespace (no shell quoting: an argument cannot contain a
# space; put such settings in a config file in the repo). Never evaluated. In each argument
# these variables, and only these, are expanded; `$$` is a literal `$`; any other `$` is an
# error (the old script passed `$DATA_ROOT` through unexpanded, silently):
#   $DATA_ROOT       local data root on this host ($VCELL_HOME/data)
#   $CHECKPOINT_DIR  <vcell-checkpoint-bucket>/<vcell-run-name>
#   $RUN_NAME        vcell-run-name
#   $HOSTNAME        this host's name
#   $WORKER_ID       agent-worker-number
# `${NAME}` works too (`${RUN_NAME}_eval`). --data-root, --checkpoint-dir and --resume-or-start
# are always added by this script (they are what makes a restarted VM continue), so they (and
# --resume) may not appear in vcell-args. --resume-or-start means "continue from the newest
# checkpoint if there is one, else start" (plain --resume refuses a run without a checkpoint).
#
# Environment overrides (for tests and unusual images; normally all unset):
#   VCELL_METADATA_URL   attributes base URL (default: the GCE metadata server)
#   VCELL_HOME           checkout, venv and data live here (default /opt/vcell)
#   VCELL_LOG_DIR        local log and status (default /var/log/vcell)
#   VCELL_UV             uv executable to use; never installs uv when set
#   VCELL_STORAGE_CMD    program called as `CMD rsync SRC DST` / `CMD cp SRC DST` instead of
#                        gcloud storage (tests point it at a local directory)
#   VCELL_LOG_UPLOAD_SECONDS  copy the log to the bucket this often while training (default 300; 0 = only at the end)
#   VCELL_STOP_GRACE_SECONDS  on SIGTERM, wait this long for training to stop by itself before forwarding (default 2)
#   VCELL_SYSTEM_PATH    directories put in front of PATH (default: the standard system ones; tests use
#                        a directory without any Python to show the script needs none)

set -euo pipefail
set -o errtrace  # the ERR trap below also fires inside functions

# ---------------------------------------------------------------------------------------
# Workstation mode: `tpu_init.sh --recreate ...` (never on a VM; it touches no VM paths).
# A spot slice is taken away on preemption, not rebooted: its queued resource goes to SUSPENDED
# (or FAILED when a request cannot be met) and stays there. This loop deletes it and creates it
# again with the same flags, i.e. the same metadata and vcell-run-name, so tpu_init.sh on the new
# slice resumes from the last checkpoint in the bucket. It reads the hosts' status files to know
# when to stop (finished), when a slice must be replaced although it is ACTIVE (a host could not
# join: distributed-init-failed) and when re-creating cannot help (setup-failed, training-failed).
# ---------------------------------------------------------------------------------------
recreate_usage() {
  cat >&2 <<'USAGE'
usage: tpu_init.sh --recreate QUEUED_RESOURCE --zone ZONE --status-url gs://BUCKET/.../RUN_NAME/status
                   [--poll-seconds 60] [--max-creates 20] [--delete-when-finished] -- CREATE_FLAGS...
  CREATE_FLAGS: what follows `gcloud compute tpus queued-resources create QUEUED_RESOURCE --zone ZONE`
  (--node-id, --accelerator-type, --runtime-version, --spot, --metadata..., --metadata-from-file...).
  --status-url: <vcell-log-bucket, else vcell-checkpoint-bucket>/<vcell-run-name>/status
USAGE
  exit 2
}

rlog() { printf '%s tpu_init --recreate: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

# run_verdict STATUS_URL CREATE_TIME: the most decisive reason among the status files written
# after CREATE_TIME (older ones are from a slice that no longer exists); nothing if none.
run_verdict() {
  local statuses line reason time verdict="" rank=0 r
  [[ -n $2 ]] || return 0  # no creation time: nothing can be shown to be fresh
  # No file yet is normal (training still running): gcloud then fails, which means "no verdict".
  statuses="$(gcloud storage cat "$1/*.json" 2>/dev/null)" || return 0
  while IFS= read -r line; do
    [[ $line =~ \"reason\":\ \"([a-z-]+)\" ]] || continue
    reason=${BASH_REMATCH[1]}
    [[ $line =~ \"time\":\ \"([0-9T:-]{19}) ]] || continue
    time=${BASH_REMATCH[1]}
    [[ $time > ${2:0:19} ]] || continue
    case $reason in
      setup-failed | training-failed) r=3 ;;
      distributed-init-failed) r=2 ;;
      finished) r=1 ;;
      *) r=0 ;;
    esac
    if ((r > rank)); then rank=$r verdict=$reason; fi
  done <<<"$statuses"
  printf '%s' "$verdict"
}

recreate_main() {
  local name="" zone="" status_url="" poll=60 max_creates=20 delete_when_finished=""
  shift  # --recreate
  (($#)) && [[ $1 != -* ]] || recreate_usage
  name=$1
  shift
  while (($#)); do
    case $1 in
      --zone | --status-url | --poll-seconds | --max-creates)
        (($# >= 2)) || recreate_usage
        case $1 in
          --zone) zone=$2 ;;
          --status-url) status_url=${2%/} ;;
          --poll-seconds) poll=$2 ;;
          --max-creates) max_creates=$2 ;;
        esac
        shift 2 ;;
      --delete-when-finished) delete_when_finished=1; shift ;;
      --) shift; break ;;
      *) recreate_usage ;;
    esac
  done
  [[ -n $zone && $status_url == gs://* && $poll =~ ^[0-9]+$ && $max_creates =~ ^[0-9]+$ ]] || recreate_usage
  (($#)) || recreate_usage
  local create_flags=("$@") flag
  for flag in "${create_flags[@]}"; do
    [[ $flag != --zone && $flag != --zone=* ]] || { echo "tpu_init.sh --recreate: give --zone before --, not in CREATE_FLAGS" >&2; exit 2; }
  done
  command -v gcloud >/dev/null || { echo "tpu_init.sh --recreate: gcloud not found on PATH" >&2; exit 2; }

  local qr=(gcloud compute tpus queued-resources) creates=0 errors=0 out rc state created last="" verdict
  rlog "watching queued resource $name in $zone (status: $status_url/*.json, every ${poll}s)"
  while true; do
    rc=0
    out="$("${qr[@]}" describe "$name" --zone "$zone" --format 'value(state.state,createTime)' 2>&1)" || rc=$?
    if ((rc != 0)); then
      if [[ $out == *NOT_FOUND* ]]; then
        state=NOT_FOUND created=""
      else
        errors=$((errors + 1))
        rlog "warning: describe failed (exit $rc, $errors in a row): $out"
        ((errors < 10)) || { rlog "ERROR: gcloud keeps failing; stopping (the slice, if any, is left as it is)"; exit 1; }
        sleep "$poll"
        continue
      fi
    else
      state=${out%%$'\t'*} created=""
      if [[ $out == *$'\t'* ]]; then created=${out#*$'\t'}; fi
    fi
    errors=0
    if [[ $state != "$last" ]]; then rlog "state: $state"; last=$state; fi
    case $state in
      NOT_FOUND)
        if ((creates >= max_creates)); then
          rlog "ERROR: created $creates times already (--max-creates $max_creates); stopping"
          exit 1
        fi
        creates=$((creates + 1))
        rlog "creating $name (creation $creates of at most $max_creates)"
        # A refused create is a problem with the flags (or quota): repeating it cannot help.
        "${qr[@]}" create "$name" --zone "$zone" "${create_flags[@]}" || { rlog "ERROR: create failed (see above)"; exit 1; }
        ;;
      SUSPENDED | FAILED)
        rlog "the slice is gone ($state: preempted, or the request could not be met); deleting the request to create it again with the same flags, which resumes the run from its last checkpoint"
        "${qr[@]}" delete "$name" --zone "$zone" --force --quiet --async || rlog "warning: delete failed; retrying at the next poll"
        ;;
      ACTIVE)
        verdict="$(run_verdict "$status_url" "$created")"
        case $verdict in
          finished)
            rlog "a host reports the run finished"
            if [[ -n $delete_when_finished ]]; then
              rlog "deleting $name (--delete-when-finished)"
              "${qr[@]}" delete "$name" --zone "$zone" --force --quiet
            else
              rlog "the slice keeps running (and costing) until: gcloud compute tpus queued-resources delete $name --zone $zone --force --quiet"
            fi
            exit 0 ;;
          distributed-init-failed)
            rlog "a host could not join the others (distributed-init-failed); deleting the slice to create it again"
            "${qr[@]}" delete "$name" --zone "$zone" --force --quiet --async || rlog "warning: delete failed; retrying at the next poll"
            ;;
          setup-failed | training-failed)
            rlog "ERROR: a host reports $verdict: creating the slice again would fail the same way. Read $status_url/*.json and the logs next to it; the slice is left running for inspection"
            exit 1 ;;
        esac
        ;;
      *) ;;  # WAITING_FOR_RESOURCES, PROVISIONING, CREATING, SUSPENDING, DELETING, ...: wait
    esac
    sleep "$poll"
  done
}

if [[ ${1:-} == --recreate ]]; then
  recreate_main "$@"
  exit 1  # not reached: recreate_main exits
fi
umask 022        # the log must be readable by the ssh user for `tail -f`

# Startup scripts run with a minimal environment: no HOME (uv and git need one) and a short PATH.
export HOME="${HOME:-/root}"
export PATH="${VCELL_SYSTEM_PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/snap/bin}:${PATH:-}"
export GIT_TERMINAL_PROMPT=0  # a private repo without credentials must fail, not hang on a prompt

readonly METADATA_URL="${VCELL_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1/instance/attributes}"
readonly VCELL_HOME="${VCELL_HOME:-/opt/vcell}"
readonly LOG_DIR="${VCELL_LOG_DIR:-/var/log/vcell}"
readonly LOG_FILE="$LOG_DIR/tpu_init.log"
readonly STATUS_FILE="$LOG_DIR/status.json"
readonly REPO_DIR="$VCELL_HOME/repo"
readonly DATA_ROOT="$VCELL_HOME/data"
readonly LOG_UPLOAD_SECONDS="${VCELL_LOG_UPLOAD_SECONDS:-300}"
readonly STOP_GRACE_SECONDS="${VCELL_STOP_GRACE_SECONDS:-2}"
for seconds in "VCELL_LOG_UPLOAD_SECONDS=$LOG_UPLOAD_SECONDS" "VCELL_STOP_GRACE_SECONDS=$STOP_GRACE_SECONDS"; do
  [[ ${seconds#*=} =~ ^[0-9]+$ ]] || { echo "tpu_init.sh: ${seconds%%=*} must be a whole number of seconds" >&2; exit 2; }
done
HOST="$(hostname)"
readonly HOST

# ---------------------------------------------------------------------------------------
# Logging. Everything goes to $LOG_FILE (appended across boots); fatal errors also go to the
# original stderr (fd 3), so they show in the startup-script journal and serial console.
# ---------------------------------------------------------------------------------------
mkdir -p "$LOG_DIR" "$VCELL_HOME"
exec 3>&2
echo "tpu_init.sh: logging to $LOG_FILE on $HOST"
exec >>"$LOG_FILE" 2>&1

log() { printf '%s tpu_init: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

die() {
  log "ERROR: $*"
  printf 'tpu_init.sh: ERROR: %s\n' "$*" >&3
  exit 1
}

# ---------------------------------------------------------------------------------------
# Stop reason bookkeeping: set as we go, written by on_exit whatever way the script ends.
# ---------------------------------------------------------------------------------------
stop_reason=""        # finished | training-failed | distributed-init-failed | stopped-by-signal | setup-failed
stop_detail=""        # one sentence for status.json; fixed text and numbers only (no escaping needed)
stop_signal=""        # TERM/INT/HUP when a stop was requested
training_pid=""
launching=""
interrupted=""        # set by on_signal: tells the wait loop its `wait` was cut short
training_rc=""
commit="unknown"
run_name=""
log_url=""            # <log-bucket>/<run-name>, known once metadata is read
worker_id="0"
uploader_pid=""
last_error=""

trap 'last_error="line $LINENO: $BASH_COMMAND"' ERR  # BASH_COMMAND is the unexpanded text: no secrets

# shellcheck disable=SC2329  # called from the traps below
on_signal() {
  stop_signal=$1
  interrupted=1
  if [[ -z $training_pid ]]; then
    # Between `launching=1` and knowing the pid: the check after the launch forwards it.
    [[ -n $launching ]] && return
    log "received SIG$1 before training started; stopping"
    exit 143
  fi
  # At shutdown systemd often signals every process at once, so training may already have
  # its own SIGTERM; a second one while Python is exiting would kill it mid-way (exit 143).
  # So forward only if training is still running after a short grace: prompt enough for a
  # spot VM's ~30 s notice, and harmless to a handler that just sets a stop flag.
  log "received SIG$1: training (pid $training_pid) will get SIGTERM unless it stops within ${STOP_GRACE_SECONDS}s"
  local deadline=$((SECONDS + STOP_GRACE_SECONDS))
  while is_running "$training_pid" && ((SECONDS < deadline)); do sleep 0.1; done
  if is_running "$training_pid"; then
    # Non-interactive bash starts background jobs with SIGINT ignored, so every stop request
    # is forwarded as TERM. uv run passes it on to python, which checkpoints and exits.
    log "forwarding SIGTERM to training (pid $training_pid); waiting for it to checkpoint and exit"
    # Training is the launch subshell's child; before the subshell has started it, the subshell
    # itself still dies of SIGTERM, and training never starts.
    pkill -TERM -P "$training_pid" 2>/dev/null || kill -TERM "$training_pid" 2>/dev/null || true
  fi
}

# is_running PID: true while PID is alive and not a zombie (an exited child we have not yet
# waited for still answers `kill -0`).
is_running() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"  # drop "pid (comm) ": comm may contain spaces
  [[ ${stat:0:1} != Z ]]
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

# ---------------------------------------------------------------------------------------
# Storage: the ONE place that talks to GCS, so tests can swap in a local directory.
#   storage rsync gs://SRC LOCAL_DIR   copy new/changed files (never deletes local files)
#   storage cp LOCAL_FILE gs://DST     upload one file
# ---------------------------------------------------------------------------------------
# (No bare `return` here: called from the EXIT trap, it would return the script's exit status.)
storage() {
  if [[ -n ${VCELL_STORAGE_CMD:-} ]]; then
    "$VCELL_STORAGE_CMD" "$@"
  else
    case $1 in
      # rsync compares size + checksum/mtime, so an unchanged bucket copies nothing on reboot.
      rsync) gcloud storage rsync --recursive "$2" "$3" ;;
      cp) gcloud storage cp "$2" "$3" ;;
      *) die "storage: unknown operation '$1'" ;;
    esac
  fi
}

# upload FILE URL: copy quietly (gcloud's progress lines would clutter the log it copies);
# on failure log its output and carry on: a lost log copy must not stop training.
upload() {
  local out
  out="$(storage cp "$1" "$2" 2>&1)" || log "warning: could not copy $1 to $2: $out"
}

upload_log() {
  if [[ -n $log_url ]]; then upload "$LOG_FILE" "$log_url/logs/$HOST.log"; fi
}

# Runs in the background while training: the bucket copy of the log stays recent even if
# the VM disappears without a clean shutdown.
log_uploader() {
  exec 3>&- 9>&-  # do not hold the caller's stderr or the boot lock open
  local sleep_pid=""
  trap 'kill "$sleep_pid" 2>/dev/null; exit 0' TERM
  while true; do
    sleep "$LOG_UPLOAD_SECONDS" &
    sleep_pid=$!
    wait "$sleep_pid"
    kill -0 "$$" 2>/dev/null || exit 0  # the main script was killed (SIGKILL runs no trap)
    upload_log
  done
}

# shellcheck disable=SC2329  # called from on_exit
write_status() {
  local now
  now="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  # Every value here is a fixed word, a number, a sha or a validated name: no JSON escaping needed.
  printf '{"run": "%s", "host": "%s", "worker": "%s", "commit": "%s", "reason": "%s", "signal": "%s", "training_exit_code": "%s", "script_exit_code": %d, "time": "%s", "detail": "%s"}\n' \
    "$run_name" "$HOST" "$worker_id" "$commit" "$stop_reason" "$stop_signal" "$training_rc" "$1" "$now" "$stop_detail" \
    >"$STATUS_FILE"
}

# shellcheck disable=SC2329  # called from the EXIT trap
on_exit() {
  local rc=$?
  trap - TERM INT HUP ERR
  if [[ -n $uploader_pid ]]; then kill "$uploader_pid" 2>/dev/null || true; fi
  if [[ -z $stop_reason ]]; then
    if [[ -n $stop_signal ]]; then stop_reason="stopped-by-signal"; else stop_reason="setup-failed"; fi
    if [[ $rc -ne 0 && -n $last_error ]]; then log "failed at $last_error"; fi
  fi
  log "STATUS reason=$stop_reason signal=${stop_signal:-none} training_exit_code=${training_rc:-none} exit=$rc run=${run_name:-?} commit=$commit"
  write_status "$rc"
  if [[ -n $log_url ]]; then
    upload "$STATUS_FILE" "$log_url/status/$HOST.json"
    upload_log
  fi
  exit "$rc"
}

# One instance per host: a manual rerun while the boot-time run trains must not start a
# second training process on the same TPU chips. (Before the EXIT trap, so a refused rerun
# leaves the running instance's status alone.)
exec 9>"$VCELL_HOME/.tpu_init.lock"
flock -n 9 || die "another tpu_init.sh is already running on this host (lock $VCELL_HOME/.tpu_init.lock); stop it first"
trap on_exit EXIT

log "==== boot on $HOST (pid $$) ===="

# ---------------------------------------------------------------------------------------
# 1. Metadata
# ---------------------------------------------------------------------------------------

# metadata_fetch KEY: print the value; exit 3 if the key is not set (HTTP 404).
# Not `curl -f`: we need the status code to tell "key not set" (use the default) from
# "server unreachable" (fail). The body is used only on 200, so an HTML error page never
# becomes a value.
metadata_fetch() {
  local out code
  out="$(curl -sS --retry 5 --retry-connrefused --retry-delay 2 --max-time 20 \
    -H 'Metadata-Flavor: Google' -w '\n%{http_code}' "$METADATA_URL/$1")" ||
    die "cannot reach the metadata server at $METADATA_URL (curl failed above); is this a GCE/TPU VM?"
  code="${out##*$'\n'}"
  case $code in
    200) printf '%s' "${out%$'\n'*}" ;;
    404) return 3 ;;
    *) die "metadata server answered HTTP $code for key '$1' at $METADATA_URL/$1" ;;
  esac
}

missing_keys=()

# read_key VAR KEY [DEFAULT]: set VAR to the key's value (surrounding whitespace trimmed: files
# given to --metadata-from-file end in a newline). Without DEFAULT the key is required.
read_key() {
  local var=$1 key=$2 value rc=0
  value="$(metadata_fetch "$key")" || rc=$?
  if ((rc != 0 && rc != 3)); then exit 1; fi  # metadata_fetch already said why
  value="${value#"${value%%[![:space:]]*}"}"
  value="${value%"${value##*[![:space:]]}"}"
  if [[ -z $value ]]; then
    if (($# >= 3)); then value=$3; else missing_keys+=("$key"); fi
  fi
  printf -v "$var" '%s' "$value"
}

repo_url="" ref="" data_url="" checkpoint_url="" script="" raw_args="" log_bucket=""
wandb_project="" wandb_entity="" wandb_key=""
accelerator_type="" runtime_version="" distributed_timeout=""
read_key repo_url vcell-repo
read_key ref vcell-ref
read_key run_name vcell-run-name
read_key data_url vcell-data-bucket
read_key checkpoint_url vcell-checkpoint-bucket
read_key script vcell-script nb/05_train.py
read_key raw_args vcell-args ""
read_key log_bucket vcell-log-bucket ""
read_key wandb_project wandb-project ""
read_key wandb_entity wandb-entity ""
read_key wandb_key wandb-api-key ""
read_key worker_id agent-worker-number 0
read_key accelerator_type accelerator-type ""
read_key runtime_version vcell-runtime-version ""
read_key distributed_timeout vcell-distributed-timeout 300

if ((${#missing_keys[@]})); then
  die "required metadata key(s) not set: ${missing_keys[*]}. Fix: create the VM with --metadata ${missing_keys[*]/%/=...} (README: 'Train on a TPU slice')"
fi

if [[ ! $run_name =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]]; then
  bad_name=$run_name
  run_name=""  # status.json holds only validated names
  die "vcell-run-name '$bad_name' is not a plain name: use letters, digits, '.', '_', '-' (max 64), e.g. st-v5e-lr1e-4"
fi
for pair in "vcell-data-bucket=$data_url" "vcell-checkpoint-bucket=$checkpoint_url" "vcell-log-bucket=${log_bucket:-gs://}"; do
  [[ ${pair#*=} == gs://* ]] || die "${pair%%=*} must be a gs:// URL (got '${pair#*=}'), e.g. gs://my-bucket/vcell"
done
[[ $repo_url != -* ]] || die "vcell-repo '$repo_url' starts with '-'; give a git URL"
[[ $ref != -* ]] || die "vcell-ref '$ref' starts with '-'; give a commit sha, tag or branch"
[[ $script != /* && $script != *..* ]] ||
  die "vcell-script '$script' must be a path inside the repo, relative to its root (e.g. nb/05_train.py)"
[[ $worker_id =~ ^[0-9]+$ ]] || die "agent-worker-number '$worker_id' is not a number"
[[ $distributed_timeout =~ ^[1-9][0-9]*$ ]] ||
  die "vcell-distributed-timeout '$distributed_timeout' is not a whole number of seconds >= 1 (default 300)"

checkpoint_dir="${checkpoint_url%/}/$run_name"
log_url="${log_bucket:-$checkpoint_url}"
log_url="${log_url%/}/$run_name"

log "config (from instance metadata):"
log "  vcell-repo              = $repo_url"
log "  vcell-ref               = $ref"
log "  vcell-run-name          = $run_name"
log "  vcell-data-bucket       = $data_url"
log "  vcell-checkpoint-bucket = $checkpoint_url  (this run: $checkpoint_dir)"
log "  vcell-log-bucket        = $log_url"
log "  vcell-script            = $script"
log "  vcell-args              = $raw_args"
log "  wandb-project           = ${wandb_project:-(unset)}"
log "  wandb-entity            = ${wandb_entity:-(unset)}"
# The key itself is never printed, not even a part of it.
if [[ -n $wandb_key ]]; then
  log "  wandb-api-key           = ******** (set, ${#wandb_key} characters)"
else
  log "  wandb-api-key           = (unset: wandb disabled)"
fi
log "  vcell-runtime-version   = ${runtime_version:-(unset)}"
log "  vcell-distributed-timeout = ${distributed_timeout}s"
log "  worker                  = $worker_id"
log "  accelerator-type        = ${accelerator_type:-(unset: not a TPU VM?)}"

# ---------------------------------------------------------------------------------------
# Image check. Google's TPU software-versions page (README table, checked 2026-11-30) lists one
# runtime per TPU generation; a v5e slice created with the v4 image boots, but JAX may then not
# see its TPU, which shows up much later and less clearly. The VM cannot ask which runtime it was
# created with (the metadata server has no documented key for it; tpu-env's RUNTIME_VERSION is
# an internal image URL on some slices), so the README's create commands pass the same
# $VERSION to --version and to the vcell-runtime-version key, and this compares that.
# ---------------------------------------------------------------------------------------
expected_runtime=""
case $accelerator_type in
  v2-* | v3-* | v4-*) expected_runtime=tpu-ubuntu2204-base ;;
  v5litepod-* | v5e-*) expected_runtime=v2-alpha-tpuv5-lite ;;
  v5p-*) expected_runtime=v2-alpha-tpuv5 ;;
  v6e-*) expected_runtime=v2-alpha-tpuv6e ;;
esac
os_name="$(sed -n 's/^PRETTY_NAME=//p' /etc/os-release 2>/dev/null | tr -d '"')" || os_name=""
log "image: ${os_name:-unknown OS}; Python comes from uv (--managed-python), not from the image"
if [[ -z $accelerator_type ]]; then
  log "image check skipped: no accelerator-type in the metadata"
elif [[ -z $expected_runtime ]]; then
  log "image check skipped: no runtime version on record for accelerator type '$accelerator_type' (README table)"
elif [[ -z $runtime_version ]]; then
  log "image check skipped: vcell-runtime-version not set (README create commands set it to the --version used)"
elif [[ $runtime_version != "$expected_runtime" ]]; then
  log "warning: runtime version '$runtime_version' does not suit accelerator '$accelerator_type': Google lists '$expected_runtime' for it (README 'TPU type -> runtime version'). Continuing; if JAX finds no TPU, delete the slice and create it with --version $expected_runtime"
else
  log "image check: runtime '$runtime_version' is the one listed for '$accelerator_type'"
fi

# ---------------------------------------------------------------------------------------
# 2. Arguments: split on whitespace, expand the allow-listed variables, nothing else.
# ---------------------------------------------------------------------------------------
declare -A arg_vars=(
  [DATA_ROOT]="$DATA_ROOT"
  [CHECKPOINT_DIR]="$checkpoint_dir"
  [RUN_NAME]="$run_name"
  [HOSTNAME]="$HOST"
  [WORKER_ID]="$worker_id"
)

# expand_arg WORD: set `expanded` to WORD with allow-listed $NAME / ${NAME} replaced.
expand_arg() {
  local rest=$1 name
  expanded=""
  while [[ $rest == *'$'* ]]; do
    expanded+="${rest%%\$*}"
    rest="${rest#*\$}"
    if [[ $rest == '$'* ]]; then  # $$ -> literal $
      expanded+='$'
      rest="${rest:1}"
      continue
    fi
    if [[ $rest =~ ^\{([A-Za-z_][A-Za-z0-9_]*)\}(.*)$ || $rest =~ ^([A-Za-z_][A-Za-z0-9_]*)(.*)$ ]]; then
      name="${BASH_REMATCH[1]}"
      rest="${BASH_REMATCH[2]}"
    else
      die "vcell-args: '$1' has a '\$' that is not a variable; write \$\$ for a literal \$"
    fi
    [[ -v "arg_vars[$name]" ]] ||
      die "vcell-args: '$1' uses \$$name, which is not expanded; allowed: ${!arg_vars[*]} (write \$\$ for a literal \$, \${NAME}x to glue text on)"
    expanded+="${arg_vars[$name]}"
  done
  expanded+="$rest"
}

# -d '': read every line (vcell-args given with --metadata-from-file may span lines).
read -r -d '' -a arg_words <<<"$raw_args" || true
train_args=()
for word in "${arg_words[@]}"; do
  case $word in
    --data-root | --data-root=* | --checkpoint-dir | --checkpoint-dir=* | --resume | --resume=* | --resume-or-start | --resume-or-start=*)
      die "vcell-args must not contain ${word%%=*}: tpu_init.sh always passes --data-root $DATA_ROOT --checkpoint-dir $checkpoint_dir --resume-or-start" ;;
  esac
  expand_arg "$word"
  train_args+=("$expanded")
done
train_args+=(--data-root "$DATA_ROOT" --checkpoint-dir "$checkpoint_dir" --resume-or-start)

# ---------------------------------------------------------------------------------------
# 3. Code: exactly <ref>, clean, whatever state a previous boot left behind.
# ---------------------------------------------------------------------------------------
if [[ ! -d $REPO_DIR/.git ]]; then
  # A directory without .git is a clone that a previous boot did not finish: start over.
  rm -rf "$REPO_DIR"
  git init -q "$REPO_DIR"
fi
git -C "$REPO_DIR" remote remove origin 2>/dev/null || true
git -C "$REPO_DIR" remote add origin "$repo_url"
log "fetching $repo_url"
git -C "$REPO_DIR" fetch -q --prune --force origin '+refs/heads/*:refs/remotes/origin/*' '+refs/tags/*:refs/tags/*' ||
  die "git fetch of $repo_url failed (see above): check vcell-repo and that the VM can reach it without a password"

resolve_ref() {
  local candidate
  for candidate in "refs/remotes/origin/$ref" "refs/tags/$ref" "$ref"; do
    if git -C "$REPO_DIR" rev-parse -q --verify "$candidate^{commit}"; then return 0; fi
  done
  return 1
}
if ! commit="$(resolve_ref)"; then
  # A sha that is on no branch or tag: ask for it directly (GitHub allows this).
  commit=""
  if [[ $ref =~ ^[0-9a-f]{7,40}$ ]] && git -C "$REPO_DIR" fetch -q origin "$ref" 2>/dev/null; then
    commit="$(resolve_ref)" || commit=""
  fi
  if [[ -z $commit ]]; then
    commit="unknown"
    die "vcell-ref '$ref' is not a branch, tag or commit of $repo_url; fix vcell-ref"
  fi
fi
if [[ $commit != "$ref" ]]; then
  log "warning: vcell-ref '$ref' is not a full commit sha; hosts booting at different times could run different commits. Pin a sha."
fi
# --force + clean: a reboot may find edited or stray files; training must run the commit as
# committed. .venv is kept (ignored by git) so a reboot does not reinstall everything.
git -C "$REPO_DIR" checkout -q --force --detach "$commit"
git -C "$REPO_DIR" clean -q -ffdx -e .venv
log "code: $repo_url at $commit"
[[ -f $REPO_DIR/$script ]] || die "vcell-script '$script' does not exist at commit $commit; fix vcell-script or vcell-ref"

# ---------------------------------------------------------------------------------------
# 4. Environment: uv from the committed lock, TPU extra, no dev tools.
# ---------------------------------------------------------------------------------------
if [[ -n ${VCELL_UV:-} ]]; then
  uv_bin="$VCELL_UV"
  [[ -x $uv_bin ]] || die "VCELL_UV='$uv_bin' is not an executable"
elif ! uv_bin="$(command -v uv)"; then
  log "uv not found: installing it to /usr/local/bin"
  curl -LsSf --retry 5 https://astral.sh/uv/install.sh | env UV_UNMANAGED_INSTALL=/usr/local/bin sh ||
    die "installing uv failed (see above); check the VM's internet access"
  uv_bin=/usr/local/bin/uv
fi
# --managed-python: uv downloads its own CPython (once per VM) instead of using the image's, so
# every runtime image, whatever Python it ships (Ubuntu 22.04: 3.10; requires-python wants 3.11+),
# runs the same interpreter.
log "uv sync (--frozen --extra tpu --no-dev --managed-python) with $uv_bin"
(cd "$REPO_DIR" && "$uv_bin" sync --frozen --extra tpu --no-dev --managed-python) ||
  die "uv sync failed (see above); is uv.lock committed and in sync with pyproject.toml at $commit?"

# ---------------------------------------------------------------------------------------
# 5. Data: every host needs its own copy (each loads its shard of the batch locally).
# ---------------------------------------------------------------------------------------
if [[ -z ${VCELL_STORAGE_CMD:-} ]] && ! command -v gcloud >/dev/null; then
  die "gcloud not found on PATH ($PATH): use a TPU runtime image from the README table (they come with the Google Cloud CLI) or install it"
fi
mkdir -p "$DATA_ROOT"
log "syncing data $data_url -> $DATA_ROOT (changed files only)"
storage rsync "$data_url" "$DATA_ROOT" ||
  die "copying data from $data_url failed (see above); check vcell-data-bucket and the VM's service account scopes"

# ---------------------------------------------------------------------------------------
# 6. Train. In the background so this shell can receive SIGTERM and forward it.
# ---------------------------------------------------------------------------------------
if ((LOG_UPLOAD_SECONDS > 0)); then
  log_uploader &
  uploader_pid=$!
fi
upload_log

# Where this launch's output starts in the (appended) log: read back below to tell a failed
# jax.distributed join from a failed training run.
launch_log_offset="$(stat -c %s "$LOG_FILE")"
launch_time=$SECONDS
launching=1
training_status_file="$LOG_DIR/training_exit_status"
rm -f "$training_status_file"
log "launching on $HOST: uv run python $script$(printf ' %q' "${train_args[@]}")"
(
  exec 3>&- 9>&-
  cd "$REPO_DIR"
  export VCELL_DATA_ROOT="$DATA_ROOT" VCELL_RUN_NAME="$run_name" PYTHONUNBUFFERED=1
  export VCELL_DISTRIBUTED_TIMEOUT="$distributed_timeout"  # read by lib.init_distributed
  # The wandb key is exported in this subshell only: git, curl and gcloud never see it.
  if [[ -n $wandb_key ]]; then
    export WANDB_API_KEY="$wandb_key"
    # One wandb run per run name, continued after a restart (the code may still override).
    export WANDB_RUN_ID="$run_name" WANDB_RESUME=allow
  else
    export WANDB_MODE=disabled
  fi
  if [[ -n $wandb_project ]]; then export WANDB_PROJECT="$wandb_project"; fi
  if [[ -n $wandb_entity ]]; then export WANDB_ENTITY="$wandb_entity"; fi
  # This subshell stays as training's parent only to record its exit status in a file: when a
  # trapped signal interrupts this script's `wait` just as training exits, bash 5.2's second
  # `wait` can report -1 instead of the status. Its own `wait` is never interrupted, because it
  # ignores stop signals (set after the launch, so training does not inherit that); stops reach
  # training directly (on_signal signals this subshell's children; a process-group SIGTERM
  # reaches it anyway).
  "$uv_bin" run --no-sync python "$script" "${train_args[@]}" &
  trap '' TERM INT HUP
  rc=0
  wait "$!" || rc=$?
  echo "$rc" >"$training_status_file"
  exit "$rc"
) &
training_pid=$!
if [[ -n $stop_signal ]]; then on_signal "$stop_signal"; fi  # a stop that came during the launch

# `wait` returns 128+n as soon as a trapped signal arrives, even if training has exited
# meanwhile; wait again, then prefer the status the subshell recorded (see above).
while true; do
  interrupted=""
  rc=0
  wait "$training_pid" || rc=$?
  if [[ -n $interrupted ]] && ((rc > 128)); then continue; fi
  training_rc=$rc
  break
done
if [[ -s $training_status_file ]]; then training_rc="$(<"$training_status_file")"; fi

if [[ -n $stop_signal ]]; then
  stop_reason="stopped-by-signal"
  if ((training_rc == 0)); then
    log "training stopped cleanly after SIG$stop_signal (it checkpointed); the next boot resumes"
  else
    log "training exited with $training_rc after SIG$stop_signal: the last checkpoint may be older"
  fi
  exit "$training_rc"
elif ((training_rc == 0)); then
  stop_reason="finished"
  log "training finished"
  exit 0
fi

# lib.init_distributed prints "jax.distributed: joining" before jax.distributed.initialize and
# "jax.distributed: joined" after it. Joining without joined: this host gave up waiting for the
# others (JAX aborts the process, exit 134, on timeout) or failed to reach them. Recorded as its
# own reason so the slice is re-created (README, tpu_init.sh --recreate) rather than debugged.
# (grep reads a process substitution: `tail | grep -q` would fail under pipefail when grep stops early.)
launch_marker() { grep -qF "jax.distributed: $1" < <(tail -c +"$((launch_log_offset + 1))" "$LOG_FILE"); }
if launch_marker joining && ! launch_marker joined; then
  stop_reason="distributed-init-failed"
  waited=$((SECONDS - launch_time))
  if ((waited >= distributed_timeout)); then what="timed out"; else what="failed"; fi
  stop_detail="jax.distributed.initialize $what on this host (training exit $training_rc after ${waited}s, timeout ${distributed_timeout}s): a host came up late or died; re-create the slice with the same vcell-run-name to resume"
  log "ERROR: $stop_detail"
  exit "$training_rc"
fi
stop_reason="training-failed"
log "training failed with exit code $training_rc (see above)"
exit "$training_rc"
