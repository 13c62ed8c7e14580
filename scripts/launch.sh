#!/usr/bin/env bash
# Launch a distributed lmforge job with torchrun, taking MindFormers' msrun_launcher.sh arguments
# in every form that script accepts, read the way it reads them:
#
#   1 argument   "COMMAND"                                   one node, 8 workers
#   2 arguments  "COMMAND" WORKER_NUM                        one node, WORKER_NUM workers
#   6 arguments  "COMMAND" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT
#                                                            one node, WORKER_NUM workers
#   9 arguments  "COMMAND" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN
#                CLUSTER_TIME_OUT                            WORKER_NUM / LOCAL_WORKER nodes; when
#                                                            they are equal, one node (msrun then
#                                                            ignores MASTER_ADDR and NODE_RANK)
#   Defaults: MASTER_ADDR 127.0.0.1, MASTER_PORT 8118, NODE_RANK 0, LOG_DIR output/msrun_log,
#   JOIN False, CLUSTER_TIME_OUT 7200. MF_LOG_SUFFIX=x appends _x to LOG_DIR, as msrun_launcher.sh.
#   Any other argument count is refused.
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
#   LAUNCH_DRY_RUN=1 (env)    -> print msrun's reading and the torchrun command, start nothing
#
# Interpreter: $PYTHON if set, else the interpreter of an `lmforge` COMMAND gives by path
# (/opt/env/bin/lmforge train ...: its shebang), else the active virtual environment's, else this
# checkout's .venv, else the interpreter of the `lmforge` command on PATH, else python3/python on
# PATH; whichever is chosen must import lmforge (a `python` without it is never used silently).
#
# COMMAND: `lmforge ...` (or `/path/to/lmforge ...`) runs `python -m lmforge ...` (same interpreter, no PATH lookup); `python [-u] x.py args`
# and `python -m mod args` drop the interpreter (torchrun starts Python itself); `x.py args` runs
# the script. MindFormers' `run_mindformer.py` / `run_llama3.py ...` (when no such file exists)
# become `lmforge train ...`, whose CLI accepts --config, --run_mode, --train_dataset_dir,
# --load_checkpoint, --resume_training and --use_parallel. Anything else is run as an executable.
set -euo pipefail

die() { echo "error: launch.sh: $*" >&2; exit 2; }

case $# in
  1|2|6|9) ;;
  *) die "got $# arguments; msrun_launcher.sh forms: \"COMMAND\" | \"COMMAND\" WORKER_NUM | \"COMMAND\" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT | \"COMMAND\" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN CLUSTER_TIME_OUT" ;;
esac
COMMAND=$1
WORKER_NUM=8 LOCAL_WORKER=8 MASTER_ADDR=127.0.0.1 MASTER_PORT=8118 NODE_RANK=0
LOG_DIR=output/msrun_log JOIN=False CLUSTER_TIME_OUT=7200 SINGLE_NODE=1
if [[ $# -ge 2 ]]; then WORKER_NUM=$2; fi
[[ $WORKER_NUM =~ ^[0-9]+$ ]] || die "worker_num '$WORKER_NUM' is not a non-negative integer"
case $# in
  2) LOCAL_WORKER=$WORKER_NUM ;;
  6) LOCAL_WORKER=$WORKER_NUM MASTER_PORT=$3 LOG_DIR=$4 JOIN=$5 CLUSTER_TIME_OUT=$6 ;;
  9) LOCAL_WORKER=$3 MASTER_ADDR=$4 MASTER_PORT=$5 NODE_RANK=$6 LOG_DIR=$7 JOIN=$8 CLUSTER_TIME_OUT=$9
     [[ $WORKER_NUM == "$LOCAL_WORKER" ]] || SINGLE_NODE=0 ;;
esac
if [[ -n ${MF_LOG_SUFFIX:-} ]]; then LOG_DIR=${LOG_DIR}_${MF_LOG_SUFFIX}; fi
MAX_RESTARTS=${MAX_RESTARTS:-0}

for pair in "local_worker:$LOCAL_WORKER" "master_port:$MASTER_PORT" "node_rank:$NODE_RANK" \
            "cluster_time_out:$CLUSTER_TIME_OUT" "MAX_RESTARTS:$MAX_RESTARTS"; do
  [[ ${pair#*:} =~ ^[0-9]+$ ]] || die "${pair%%:*} '${pair#*:}' is not a non-negative integer"
done
(( LOCAL_WORKER > 0 )) || die "local_worker must be at least 1"
(( WORKER_NUM % LOCAL_WORKER == 0 )) || die "worker_num $WORKER_NUM is not a multiple of local_worker $LOCAL_WORKER"
case ${JOIN,,} in true|1|yes) JOIN=1 ;; false|0|no) JOIN=0 ;; *) die "join '$JOIN' must be True or False" ;; esac
if (( SINGLE_NODE )); then
  MSRUN="msrun --worker_num=$WORKER_NUM --local_worker_num=$LOCAL_WORKER --master_port=$MASTER_PORT --log_dir=$LOG_DIR"
  MASTER_ADDR=127.0.0.1 NODE_RANK=0  # msrun's single-node command passes neither
else
  MSRUN="msrun --worker_num=$WORKER_NUM --local_worker_num=$LOCAL_WORKER --master_addr=$MASTER_ADDR --master_port=$MASTER_PORT --node_rank=$NODE_RANK --log_dir=$LOG_DIR"
fi
MSRUN+=" --join=$( ((JOIN)) && echo True || echo False) --cluster_time_out=$CLUSTER_TIME_OUT"
NNODES=$(( WORKER_NUM / LOCAL_WORKER ))
(( NODE_RANK < NNODES )) || die "node_rank $NODE_RANK must be below the number of nodes $NNODES (worker_num/local_worker)"

# Split COMMAND as the shell would (quotes respected); its first word may name the interpreter.
eval "set -- $COMMAND"
[[ $# -ge 1 ]] || die "COMMAND is empty"

# The interpreter that has lmforge installed (see the header).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
interpreter_of() {  # the interpreter in an entry point's #!/... line (without its arguments)
  local shebang
  shebang=$(head -n1 "$1" 2>/dev/null || true)
  [[ $shebang == '#!'/* ]] && { shebang=${shebang#\#!}; echo "${shebang%% *}"; }
  return 0
}
candidates=()
if [[ -n ${PYTHON:-} ]]; then
  candidates=("$PYTHON")
else
  if [[ $1 == */lmforge && -f $1 ]]; then
    interp=$(interpreter_of "$1")
    [[ -n $interp ]] && candidates+=("$interp")
  fi
  [[ -n ${VIRTUAL_ENV:-} ]] && candidates+=("$VIRTUAL_ENV/bin/python")
  candidates+=("$ROOT/.venv/bin/python")
  if entry=$(command -v lmforge 2>/dev/null); then
    interp=$(interpreter_of "$entry")
    [[ -n $interp ]] && candidates+=("$interp")
  fi
  candidates+=(python3 python)
fi
PY=
for candidate in "${candidates[@]}"; do
  if "$candidate" -c "import lmforge, torch.distributed.run" >/dev/null 2>&1; then PY=$candidate; break; fi
done
[[ -n $PY ]] || die "no Python with lmforge and torch found (tried: ${candidates[*]}); set PYTHON=/path/to/python"

# Map COMMAND (split above) onto torchrun's program form.
PROGRAM=()
case $1 in
  python|python3|python3.*|*/python|*/python3|*/python3.*)
    shift
    while [[ $# -gt 0 && $1 == -[uBO] ]]; do shift; done  # interpreter flags torchrun cannot take
    [[ $# -ge 1 ]] || die "COMMAND runs python without a script or module" ;;
esac
case $1 in
  -m) PROGRAM=("$@") ;;
  lmforge|*/lmforge) PROGRAM=(-m lmforge "${@:2}") ;;  # same interpreter as torchrun, no PATH lookup
  run_mindformer.py|run_llama3.py|*/run_mindformer.py|*/run_llama3.py)
    if [[ -f $1 ]]; then PROGRAM=("$@"); else PROGRAM=(-m lmforge train "${@:2}"); fi ;;
  *.py) PROGRAM=("$@") ;;
  *) PROGRAM=(--no-python "$@") ;;
esac

ARGS=(
  --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$LOCAL_WORKER"
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"
  --rdzv-id="lmforge-$MASTER_PORT" --rdzv-conf="join_timeout=$CLUSTER_TIME_OUT"
  --max-restarts="$MAX_RESTARTS" --log-dir="$LOG_DIR" --tee=3
)
echo "launch.sh: msrun_launcher.sh would run: $MSRUN" >&2
echo "launch.sh: $PY -m torch.distributed.run ${ARGS[*]} ${PROGRAM[*]}" >&2
if [[ ${LAUNCH_DRY_RUN:-0} == 1 ]]; then exit 0; fi
mkdir -p "$LOG_DIR"
if (( JOIN )); then
  exec "$PY" -m torch.distributed.run "${ARGS[@]}" "${PROGRAM[@]}"
fi
nohup "$PY" -m torch.distributed.run "${ARGS[@]}" "${PROGRAM[@]}" >"$LOG_DIR/launcher_node$NODE_RANK.log" 2>&1 &
echo "launch.sh: started node $NODE_RANK (pid $!); logs in $LOG_DIR" >&2
