# shellcheck shell=bash
# Ascend NPU environment for the launch scripts: sources the CANN set_env.sh and sets the
# usual runtime variables, only where CANN is installed. Elsewhere (GPU or CPU machines) it
# does nothing and prints nothing. Meant to be sourced (also under `set -euo pipefail`);
# values already in the environment win over the defaults below.

_npu_env_installed_path() {
    # CANN's installer records a custom location in ascend_cann_install.info (Install_Path=...).
    local info=${ASCEND_CANN_INSTALL_INFO:-/etc/Ascend/ascend_cann_install.info}
    [[ -r $info ]] || return 0
    sed -n 's/^[[:space:]]*Install_Path[[:space:]]*=[[:space:]]*//p' "$info" | head -n 1
}

_npu_env_find_cann() {
    # First CANN environment script found: an explicit ASCEND_INSTALL_PATH, the path CANN's
    # installer recorded, the system-wide toolkit (or the inference-only nnae package), then a
    # per-user install.
    local root recorded
    recorded=$(_npu_env_installed_path)
    for root in ${ASCEND_INSTALL_PATH:+"$ASCEND_INSTALL_PATH"} ${recorded:+"$recorded"} /usr/local/Ascend \
        "${HOME:-/nonexistent}/Ascend"; do
        if [[ -f "$root/ascend-toolkit/set_env.sh" ]]; then
            printf '%s\n' "$root/ascend-toolkit/set_env.sh"
            return 0
        fi
        if [[ -f "$root/nnae/set_env.sh" ]]; then
            printf '%s\n' "$root/nnae/set_env.sh"
            return 0
        fi
    done
    return 1
}

_npu_env_setup() {
    local set_env driver restore_nounset=0
    set_env=$(_npu_env_find_cann) || return 0

    # CANN's scripts read variables that may be unset (LD_LIBRARY_PATH, PYTHONPATH...).
    if [[ $- == *u* ]]; then
        restore_nounset=1
        set +u
    fi
    # Sourced in a condition so that one failing line in CANN's script, under the
    # caller's `set -e`, does not end the caller.
    # shellcheck disable=SC1090  # the path is only known at run time
    if ! source "$set_env"; then
        echo "env_npu.sh: warning: $set_env returned an error" >&2
    fi
    driver="$(dirname "$(dirname "$set_env")")/driver/lib64"
    if [[ -d "$driver" ]]; then
        export LD_LIBRARY_PATH="$driver/common:$driver/driver${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    if ((restore_nounset)); then
        set -u
    fi

    # Host-side log noise off (3 = error), no event logs.
    export ASCEND_SLOG_PRINT_TO_STDOUT="${ASCEND_SLOG_PRINT_TO_STDOUT:-0}"
    export ASCEND_GLOBAL_LOG_LEVEL="${ASCEND_GLOBAL_LOG_LEVEL:-3}"
    export ASCEND_GLOBAL_EVENT_ENABLE="${ASCEND_GLOBAL_EVENT_ENABLE:-0}"
    # Queue operators to the device from a separate thread: overlaps host and device work.
    export TASK_QUEUE_ENABLE="${TASK_QUEUE_ENABLE:-1}"
    # No IP whitelist check between the devices of a job.
    export HCCL_WHITELIST_DISABLE="${HCCL_WHITELIST_DISABLE:-1}"
    # A slow first collective (operator compilation on some ranks) is not a hang.
    export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}"
}

_npu_env_setup
unset -f _npu_env_setup _npu_env_find_cann _npu_env_installed_path
