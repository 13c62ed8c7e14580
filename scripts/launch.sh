#!/usr/bin/env bash
# Launch a distributed lmforge job with torchrun, taking MindFormers' msrun_launcher.sh arguments.
#
#   scripts/launch.sh "COMMAND" [WORKER_NUM] [LOCAL_WORKER] [MASTER_ADDR] [MASTER_PORT] [NODE_RANK]
#                     [LOG_DIR] [JOIN] [CLUSTER_TIME_OUT]
#
#   one node, 8 GPUs:  scripts/launch.sh "lmforge train --config configs/pretrain_llama2_7b.yaml" 8
#   node i of 8:       scripts/launch.sh "lmforge train --config configs/pretrain_llama3_70b.yaml" \
#                          64 8 MASTER_IP 8118 i output/msrun_log False 300
#
# Mapping onto torchrun:
#   WORKER_NUM / LOCAL_WORKER -> --nnodes (must divide), LOCAL_WORKER -> --nproc-per-node
#   MASTER_ADDR:MASTER_PORT   -> --rdzv-backend=c10d --rdzv-endpoint (node 0 hosts the store)
#   NODE_RANK                 -> --node-rank
#   LOG_DIR                   -> --log-dir with --tee 3: per-rank stdout/stderr files under
#                                LOG_DIR/<run id>/attempt_<k>/<local rank>/ and on the console
#   JOIN                      -> True: wait for the job and return its exit status. False (msrun's
#                                default): start it in the background, console output to
#                                LOG_DIR/launcher_node<NODE_RANK>.log, print the pid and return.
#   CLUSTER_TIME_OUT (s)      -> rendezvous join timeout (how long nodes wait for each other)
#   MAX_RESTARTS (env, 0)     -> --max-restarts: a failed worker restarts every worker of the job,
#                                which resumes from its latest checkpoint (train.resume=auto)
#   With two arguments ("COMMAND" N) it is one node with N workers, like msrun_launcher.sh.
#
# COMMAND: `lmforge ...` runs `python -m lmforge ...` (same interpreter, no PATH lookup); `python [-u] x.py args`
# and `python -m mod args` drop the interpreter (torchrun starts Python itself); `x.py args` runs
# the script. MindFormers' `run_mindformer.py` / `run_llama3.py ...` (when no such file exists)
# become `lmforge train ...`, whose CLI accepts --config, --run_mode, --train_dataset_dir,
# --load_checkpoint, --resume_training and --use_parallel. Anything else is run as an executable.
set -euo pipefail

die() { echo "error: launch.sh: $*" >&2; exit 2; }

[[ $# -ge 1 && $# -le 9 ]] || die "usage: launch.sh \"COMMAND\" [worker_num local_worker master_addr master_port node_rank log_dir join cluster_time_out]"
COMMAND=$1
WORKER_NUM=${2:-8}
if [[ $# -eq 2 ]]; then LOCAL_WORKER=$WORKER_NUM; else LOCAL_WORKER=${3:-8}; fi
MASTER_ADDR=${4:-127.0.0.1}
MASTER_PORT=${5:-8118}
NODE_RANK=${6:-0}
LOG_DIR=${7:-output/msrun_log}
JOIN=${8:-False}
CLUSTER_TIME_OUT=${9:-7200}
MAX_RESTARTS=${MAX_RESTARTS:-0}

for pair in "worker_num:$WORKER_NUM" "local_worker:$LOCAL_WORKER" "master_port:$MASTER_PORT" \
            "node_rank:$NODE_RANK" "cluster_time_out:$CLUSTER_TIME_OUT" "MAX_RESTARTS:$MAX_RESTARTS"; do
  [[ ${pair#*:} =~ ^[0-9]+$ ]] || die "${pair%%:*} '${pair#*:}' is not a non-negative integer"
done
(( LOCAL_WORKER > 0 )) || die "local_worker must be at least 1"
(( WORKER_NUM % LOCAL_WORKER == 0 )) || die "worker_num $WORKER_NUM is not a multiple of local_worker $LOCAL_WORKER"
NNODES=$(( WORKER_NUM / LOCAL_WORKER ))
(( NODE_RANK < NNODES )) || die "node_rank $NODE_RANK must be below the number of nodes $NNODES (worker_num/local_worker)"
case ${JOIN,,} in true|1|yes) JOIN=1 ;; false|0|no) JOIN=0 ;; *) die "join '$JOIN' must be True or False" ;; esac

# Split COMMAND as the shell would (quotes respected), then map it onto torchrun's program form.
eval "set -- $COMMAND"
[[ $# -ge 1 ]] || die "COMMAND is empty"
PROGRAM=()
case $1 in
  python|python3|python3.*)
    shift
    while [[ $# -gt 0 && $1 == -[uBO] ]]; do shift; done  # interpreter flags torchrun cannot take
    if [[ ${1:-} == -m ]]; then PROGRAM=(-m "${@:2}"); else PROGRAM=("$@"); fi ;;
  lmforge) PROGRAM=(-m lmforge "${@:2}") ;;  # same interpreter as torchrun, no PATH lookup
  run_mindformer.py|run_llama3.py|*/run_mindformer.py)
    if [[ -f $1 ]]; then PROGRAM=("$@"); else PROGRAM=(-m lmforge train "${@:2}"); fi ;;
  *.py) PROGRAM=("$@") ;;
  *) PROGRAM=(--no-python "$@") ;;
esac

mkdir -p "$LOG_DIR"
ARGS=(
  --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$LOCAL_WORKER"
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"
  --rdzv-id="lmforge-$MASTER_PORT" --rdzv-conf="join_timeout=$CLUSTER_TIME_OUT"
  --max-restarts="$MAX_RESTARTS" --log-dir="$LOG_DIR" --tee=3
)
PY=${PYTHON:-python}
echo "launch.sh: torchrun ${ARGS[*]} ${PROGRAM[*]}" >&2
if (( JOIN )); then
  exec "$PY" -m torch.distributed.run "${ARGS[@]}" "${PROGRAM[@]}"
fi
nohup "$PY" -m torch.distributed.run "${ARGS[@]}" "${PROGRAM[@]}" >"$LOG_DIR/launcher_node$NODE_RANK.log" 2>&1 &
echo "launch.sh: started node $NODE_RANK (pid $!); logs in $LOG_DIR" >&2
