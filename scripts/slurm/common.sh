# Shared body of scripts/slurm/*.sbatch: sourced inside the job after the template has set CONFIG, EXPERIMENT,
# VENV, RUNS, TRAINER_CONFIG (and optionally TRAINER_ARGS, an array of extra --trainer.* overrides). Not submitted
# on its own.
#
# One experiment = one directory, $RUNS/$EXPERIMENT, named by the user and never by the job id: a requeued job keeps
# its id and environment, starts this script again, and `--ckpt_path last` resumes from
# $RUNS/$EXPERIMENT/checkpoints/last.ckpt. The directory must be on a filesystem every node sees.
set -euo pipefail

# sbatch runs a copy of the template from Slurm's spool directory: work from where the job was submitted.
cd "${REPO:-${SLURM_SUBMIT_DIR:-.}}"

if [ -z "${EXPERIMENT:-}" ]; then
    echo "error: set EXPERIMENT (e.g. EXPERIMENT=joint_swav_r50 sbatch $0): \$RUNS/\$EXPERIMENT holds this" \
         "experiment's checkpoints and logs, and a requeued or resubmitted job resumes from there" >&2
    exit 2
fi
case "$EXPERIMENT" in
    */* | .* | *[[:space:]]*) echo "error: EXPERIMENT must be a plain name, got '$EXPERIMENT'" >&2; exit 2 ;;
esac
for file in "$CONFIG" "$TRAINER_CONFIG"; do
    [ -f "$file" ] || { echo "error: no config $file (submit from the repository root or set REPO)" >&2; exit 2; }
done
JOINTSSL=$VENV/bin/jointssl
[ -x "$JOINTSSL" ] || { echo "error: $JOINTSSL not found: set VENV to the environment jointssl is installed in" >&2; exit 2; }
EXPERIMENT_DIR=$RUNS/$EXPERIMENT
mkdir -p "$EXPERIMENT_DIR"

# Lightning checks that the Trainer matches the allocation: one task per device.
NUM_NODES=${SLURM_JOB_NUM_NODES:?not inside a Slurm job}
DEVICES_PER_NODE=${SLURM_NTASKS_PER_NODE:?set #SBATCH --ntasks-per-node (= devices per node)}

echo "jointssl: job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}:" \
     "${NUM_NODES} node(s) x ${DEVICES_PER_NODE} task(s), experiment ${EXPERIMENT_DIR}, config ${CONFIG}," \
     "started $(date '+%Y-%m-%d %H:%M:%S')"

# launch_fit [extra jointssl arguments...]
launch_fit() {
    # Which task runs where (lines are prefixed with the task number, like everything below).
    srun --label bash -c 'echo "task ${SLURM_PROCID} of ${SLURM_NTASKS} on ${SLURMD_NODENAME}" \
        "(local ${SLURM_LOCALID}, GPUs ${CUDA_VISIBLE_DEVICES:-none})"'
    # Never wrap this in `timeout` (the tasks would escape it): --time bounds the job.
    srun --label "$JOINTSSL" fit \
        --config "$CONFIG" \
        --trainer "$TRAINER_CONFIG" \
        --trainer.num_nodes "$NUM_NODES" \
        --trainer.devices "$DEVICES_PER_NODE" \
        ${TRAINER_ARGS[@]+"${TRAINER_ARGS[@]}"} \
        --trainer.default_root_dir "$EXPERIMENT_DIR" \
        --ckpt_path last \
        "$@"
}
