# shellcheck shell=bash
# Shared by the ModelZoo launch scripts in test/: --key=value parsing, output paths,
# launching main.py (python, or torchrun on one or several nodes) and the ModelZoo summary.
#
# A script sets these, then calls `mz_main "$@"`:
#   MZ_LAUNCH     single (python main.py) | local (torchrun, this node) | multinode (torchrun, --nnodes)
#   MZ_KIND       perf | acc | eval: the CaseName suffix, and what the summary reports
#   MZ_OPTIONS    the --key=value options the script accepts (space separated)
#   MZ_MAIN_ARGS  array of main.py options the script adds; the user's come after them, and
#                 anything after a bare `--` last, so the user can override every one
# Recipe defaults (batch size, epochs, lr...) are not repeated here: main.py takes them
# from training/recipes.py for whatever the user leaves out. As in the ModelZoo scripts,
# --batch_size and --workers are per device for one process and per node otherwise.

MZ_TEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MZ_REPO_DIR=$(dirname "$MZ_TEST_DIR")
MZ_PYTHON=${PYTHON:-python3}

declare -A MZ_OPT=()
MZ_PASSTHROUGH=()

mz_die() {
    echo "$(basename "$0"): error: $1" >&2
    exit "${2:-2}"
}

# Upstream's other names for some keys.
declare -A MZ_ALIASES=([train_epochs]=epochs [resume]=resume_pth)

mz_describe() {
    case $1 in
        data_path) echo "ImageFolder root with train/ and val/, or a sharded data set (folder or s3:// URL; required)" ;;
        arch) echo "the network: inception_v3 (default) or xception" ;;
        batch_size)
            if [[ $MZ_LAUNCH == single ]]; then
                echo "batch size (default: the recipe of --arch, 256 or 128)"
            else
                echo "batch size of the machine, split between its processes (default: the recipe's per device x processes)"
            fi
            ;;
        workers) echo "data loading processes$([[ $MZ_LAUNCH == single ]] || echo " of the machine, split between its processes")" ;;
        epochs) echo "epochs, also --train_epochs= (default: the recipe's; 1 for performance runs)" ;;
        device_id)
            if [[ $MZ_LAUNCH == single ]]; then
                echo "device index, and the output folder test/output/<id> (default: \$ASCEND_DEVICE_ID, else 0)"
            else
                echo "the output folder test/output/<id> (default: \$ASCEND_DEVICE_ID, else 0)"
            fi
            ;;
        nproc) echo "processes on this node (default: \$RANK_SIZE, else the device count up to 8, else 8)" ;;
        resume_pth) echo "checkpoint to evaluate, also --resume= (required)" ;;
        nnodes) echo "number of machines (required)" ;;
        node_rank) echo "this machine's rank, 0 on the master (required)" ;;
        master_addr) echo "IP address of the node_rank 0 machine (required)" ;;
        master_port) echo "free TCP port on the master (default 29500)" ;;
        local_addr) echo "this machine's IP on the master's network (for HCCL and torchrun)" ;;
    esac
}

mz_usage() {
    local key
    echo "usage: bash $0 --data_path=DIR [--key=value ...] [-- main.py options]"
    echo
    for key in $MZ_OPTIONS; do
        printf '  --%-14s %s\n' "$key=" "$(mz_describe "$key")"
    done
    echo
    echo "Options after a bare -- go to main.py unchanged (see: python main.py -h), e.g."
    echo "  bash $0 --data_path=/data/imagenet --arch=xception -- --image-size 224"
    echo "Outputs: \${TEST_OUTPUT_DIR:-test/output}/\$ASCEND_DEVICE_ID/ (see docs/SCRIPTS.md)."
}

mz_parse_args() {
    local arg key value
    while (($#)); do
        arg=$1
        shift
        case $arg in
            --)
                MZ_PASSTHROUGH=("$@")
                return 0
                ;;
            -h | --help)
                mz_usage
                exit 0
                ;;
            --*=*)
                key=${arg%%=*}
                value=${arg#*=}
                ;;
            --*)
                key=$arg
                if (($# == 0)) || [[ $1 == --* ]]; then
                    mz_die "$arg needs a value: $arg=VALUE"
                fi
                value=$1
                shift
                ;;
            *)
                mz_die "unexpected argument '$arg': options are --key=value; main.py's options go after --"
                ;;
        esac
        key=${key#--}
        key=${key//-/_} # --data-path works like --data_path
        key=${MZ_ALIASES[$key]:-$key}
        if [[ " $MZ_OPTIONS " != *" $key "* ]]; then
            # shellcheck disable=SC2086  # one word per option name
            mz_die "unknown option --$key (this script takes: $(printf -- '--%s ' $MZ_OPTIONS)and main.py options after --)"
        fi
        case $key in
            batch_size | epochs | workers | device_id | nproc | nnodes | node_rank | master_port)
                [[ $value =~ ^[0-9]+$ ]] || mz_die "--$key must be a non-negative integer, got '$value'"
                ;;
        esac
        MZ_OPT[$key]=$value
    done
}

mz_opt() {
    # The value of option $1, or $2 when it was not given.
    if [[ -n ${MZ_OPT[$1]:-} ]]; then
        printf '%s\n' "${MZ_OPT[$1]}"
    else
        printf '%s\n' "${2:-}"
    fi
}

mz_require() {
    local key
    for key in "$@"; do
        [[ -n ${MZ_OPT[$key]:-} ]] || mz_die "--$key is required"
    done
}

mz_absolute() {
    # Absolute form of an existing path, so the run does not depend on the current folder.
    if [[ -d $1 ]]; then
        (cd "$1" && pwd)
    else
        printf '%s/%s\n' "$(cd "$(dirname "$1")" && pwd)" "$(basename "$1")"
    fi
}

mz_check_options() {
    mz_require data_path
    if [[ ${MZ_OPT[data_path]} != *://* ]]; then # an object-store URL (sharded data) is main.py's to check
        [[ -d ${MZ_OPT[data_path]} ]] || mz_die "--data_path: no such folder: ${MZ_OPT[data_path]}"
        MZ_OPT[data_path]=$(mz_absolute "${MZ_OPT[data_path]}")
    fi
    if [[ " $MZ_OPTIONS " == *" resume_pth "* ]]; then
        mz_require resume_pth
        [[ -f ${MZ_OPT[resume_pth]} ]] || mz_die "--resume_pth: no such file: ${MZ_OPT[resume_pth]}"
        MZ_OPT[resume_pth]=$(mz_absolute "${MZ_OPT[resume_pth]}")
    fi
    if [[ $MZ_LAUNCH == multinode ]]; then
        mz_require nnodes node_rank master_addr
        ((MZ_OPT[nnodes] >= 1)) || mz_die "--nnodes must be at least 1"
        ((MZ_OPT[node_rank] < MZ_OPT[nnodes])) ||
            mz_die "--node_rank must be below --nnodes (${MZ_OPT[nnodes]}), got ${MZ_OPT[node_rank]}"
    fi
    if [[ -n ${MZ_OPT[nproc]:-} ]] && ((MZ_OPT[nproc] < 1)); then
        mz_die "--nproc must be at least 1"
    fi
}

mz_main_args() {
    # main.py's command line: the script's additions, the user's --key=value, then the passthrough
    # (the per-device batch and workers are added by mz_plan).
    MZ_ARGS=(${MZ_MAIN_ARGS[@]+"${MZ_MAIN_ARGS[@]}"} --data "${MZ_OPT[data_path]}")
    [[ -z ${MZ_OPT[arch]:-} ]] || MZ_ARGS+=(--arch "${MZ_OPT[arch]}")
    [[ -z ${MZ_OPT[epochs]:-} ]] || MZ_ARGS+=(--epochs "${MZ_OPT[epochs]}")
    [[ -z ${MZ_OPT[resume_pth]:-} ]] || MZ_ARGS+=(--resume "${MZ_OPT[resume_pth]}")
    if [[ $MZ_LAUNCH == single ]]; then
        MZ_ARGS+=(--gpu "$MZ_DEVICE_ID") # ignored by main.py on a CPU
    fi
}

mz_plan() {
    # Validate main.py's options with its own parser and learn what names the run.
    local launcher=torchrun output key value
    [[ $MZ_LAUNCH != single ]] || launcher=python
    output=$("$MZ_PYTHON" "$MZ_TEST_DIR/modelzoo_helper.py" plan --launcher "$launcher" \
        --nproc "$(mz_opt nproc "${RANK_SIZE:-0}")" --nnodes "$(mz_opt nnodes 1)" \
        --batch-size "$(mz_opt batch_size 0)" ${MZ_OPT[workers]:+--workers "${MZ_OPT[workers]}"} \
        -- "${MZ_ARGS[@]}" ${MZ_PASSTHROUGH[@]+"${MZ_PASSTHROUGH[@]}"}) || exit $?
    while IFS='=' read -r key value; do
        case $key in
            arch) MZ_ARCH=$value ;;
            network) MZ_NETWORK=$value ;;
            batch_size) MZ_BATCH_SIZE=$value ;;
            device_batch_size) MZ_DEVICE_BATCH_SIZE=$value ;;
            workers) MZ_WORKERS=$value ;;
            nproc) MZ_NPROC=$value ;;
            world_size) MZ_WORLD_SIZE=$value ;;
            device_type) MZ_DEVICE_TYPE=$value ;;
        esac
    done <<<"$output"
    echo "network: $MZ_NETWORK (--arch=$MZ_ARCH; the other is --arch=$([[ $MZ_ARCH == xception ]] && echo inception_v3 || echo xception))"
    MZ_ARGS+=(--batch-size "$MZ_DEVICE_BATCH_SIZE")
    [[ -z $MZ_WORKERS ]] || MZ_ARGS+=(--workers "$MZ_WORKERS")
    MZ_ARGS+=(${MZ_PASSTHROUGH[@]+"${MZ_PASSTHROUGH[@]}"})
}

mz_paths() {
    MZ_CASE_NAME="${MZ_NETWORK}_bs${MZ_BATCH_SIZE}_${MZ_WORLD_SIZE}p_${MZ_KIND}"
    mkdir -p "${TEST_OUTPUT_DIR:-$MZ_TEST_DIR/output}/$MZ_DEVICE_ID"
    MZ_OUTPUT_DIR=$(mz_absolute "${TEST_OUTPUT_DIR:-$MZ_TEST_DIR/output}/$MZ_DEVICE_ID")
    MZ_RUN_DIR="$MZ_OUTPUT_DIR/$MZ_CASE_NAME" # main.py's --output_dir: checkpoints, metrics.jsonl
    MZ_TRAIN_LOG="$MZ_OUTPUT_DIR/train_${MZ_DEVICE_ID}.log"
    # A run that resumes (`-- --resume ...`) continues its folder; a fresh run starts an empty
    # one, and an earlier run of the same case is kept beside it, never overwritten.
    local arg kept
    for arg in ${MZ_PASSTHROUGH[@]+"${MZ_PASSTHROUGH[@]}"}; do
        [[ $arg != --resume && $arg != --resume=* ]] || return 0
    done
    if [[ $MZ_KIND != eval && -d $MZ_RUN_DIR ]] && [[ $MZ_LAUNCH != multinode || ${MZ_OPT[node_rank]} == 0 ]]; then
        kept="$MZ_RUN_DIR.$(date +%Y%m%d-%H%M%S)"
        mv "$MZ_RUN_DIR" "$kept"
        echo "an earlier run of this case is kept in $kept"
    fi
    rm -f "$MZ_RUN_DIR/metrics.jsonl" "$MZ_RUN_DIR/args.json"
}

mz_launch_command() {
    MZ_COMMAND=("$MZ_PYTHON")
    case $MZ_LAUNCH in
        local)
            MZ_COMMAND+=(-m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$MZ_NPROC")
            ;;
        multinode)
            MZ_COMMAND+=(-m torch.distributed.run --nnodes="${MZ_OPT[nnodes]}" --node-rank="${MZ_OPT[node_rank]}"
                --master-addr="${MZ_OPT[master_addr]}" --master-port="$(mz_opt master_port 29500)"
                --nproc-per-node="$MZ_NPROC")
            if [[ -n ${MZ_OPT[local_addr]:-} ]]; then
                export HCCL_IF_IP="${MZ_OPT[local_addr]}" # the NIC HCCL uses between nodes
                if "$MZ_PYTHON" -m torch.distributed.run -h 2>/dev/null | grep -q -- '--local[-_]addr'; then
                    MZ_COMMAND+=(--local-addr="${MZ_OPT[local_addr]}")
                fi
            fi
            ;;
    esac
    MZ_COMMAND+=("$MZ_REPO_DIR/main.py" "${MZ_ARGS[@]}" --output_dir "$MZ_RUN_DIR")
}

mz_now() {
    date +%s.%N
}

mz_run() {
    local status start end
    echo "CaseName $MZ_CASE_NAME: $MZ_WORLD_SIZE process(es) on $MZ_DEVICE_TYPE, $MZ_DEVICE_BATCH_SIZE images each per step; log: $MZ_TRAIN_LOG"
    start=$(mz_now)
    {
        printf '%q ' "${MZ_COMMAND[@]}"
        echo
    } >"$MZ_TRAIN_LOG"
    set +e
    "${MZ_COMMAND[@]}" 2>&1 | tee -a "$MZ_TRAIN_LOG"
    status=${PIPESTATUS[0]}
    set -e
    end=$(mz_now)
    if ((status != 0)); then
        echo "$(basename "$0"): error: training failed (exit status $status); full log: $MZ_TRAIN_LOG" >&2
        exit "$status"
    fi
    MZ_E2E=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')
}

mz_summary() {
    if [[ $MZ_LAUNCH == multinode ]] && ((MZ_OPT[node_rank] != 0)); then
        echo "node ${MZ_OPT[node_rank]} done; rank 0 (node 0) writes metrics.jsonl and the summary"
        return 0
    fi
    "$MZ_PYTHON" "$MZ_TEST_DIR/modelzoo_helper.py" summary --metrics "$MZ_RUN_DIR/metrics.jsonl" \
        --kind "$MZ_KIND" --network "$MZ_NETWORK" --case-name "$MZ_CASE_NAME" \
        --case-log "$MZ_OUTPUT_DIR/$MZ_CASE_NAME.log" --loss-file "$MZ_OUTPUT_DIR/train_${MZ_CASE_NAME}_loss.txt" \
        --batch-size "$MZ_BATCH_SIZE" --rank-size "$MZ_WORLD_SIZE" --device-type "$(uname -m)" \
        --e2e "$MZ_E2E" || mz_die "no summary; full log: $MZ_TRAIN_LOG" 1
}

mz_main() {
    mz_parse_args "$@"
    mz_check_options
    # shellcheck source=SCRIPTDIR/env_npu.sh
    source "$MZ_TEST_DIR/env_npu.sh"
    MZ_DEVICE_ID=$(mz_opt device_id "${ASCEND_DEVICE_ID:-0}")
    mz_main_args
    mz_plan
    mz_paths
    mz_launch_command
    mz_run
    mz_summary
}
