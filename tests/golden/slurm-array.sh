# would submit run <RUN_ID>-0 (slurm)  train.seed=0 -> /work3/s123456/exercise-improved/<RUN_ID>-0
# would submit run <RUN_ID>-1 (slurm)  train.seed=1 -> /work3/s123456/exercise-improved/<RUN_ID>-1
# would submit run <RUN_ID>-2 (slurm)  train.seed=2 -> /work3/s123456/exercise-improved/<RUN_ID>-2
# resources: 1 GPU (job); 8 cores (--cpus); 32 GB (--mem); 12:00 (--time); queue gpuv100 (--queue)
#!/bin/bash

# Parameters
#SBATCH --array=0-2%2
#SBATCH --cpus-per-task=8
#SBATCH --error=/work3/s123456/exercise-improved/.arrays/<RUN_ID>/%A_%a_0_log.err
#SBATCH --gpus-per-node=1
#SBATCH --job-name=exercise-improved
#SBATCH --mem=32GB
#SBATCH --nodes=1
#SBATCH --open-mode=append
#SBATCH --output=/work3/s123456/exercise-improved/.arrays/<RUN_ID>/%A_%a_0_log.out
#SBATCH --partition=gpuv100
#SBATCH --signal=USR2@120
#SBATCH --time=720
#SBATCH --wckey=submitit

# setup
# a line that fails ends the job, named in its log and in <job id>_setup_failed
hpcseg_job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID}; hpcseg_job=${hpcseg_job:-$SLURM_JOB_ID}
hpcseg_failed=/work3/s123456/exercise-improved/.arrays/<RUN_ID>/"$hpcseg_job"_setup_failed
rm -f "$hpcseg_failed"
hpcseg_setup_failed() { printf 'hpcseg: error: %s\n' "$1" >&2; printf '%s\n' "$1" > "$hpcseg_failed"; exit 1; }
<PYTHON> -c 'import hpcseg'
[ $? = 0 ] || hpcseg_setup_failed '<PYTHON> cannot import hpcseg: no set-up line activates an environment, so the job runs the submitting python, which must exist on the node (profile slurm)'

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /work3/s123456/exercise-improved/.arrays/<RUN_ID>/%A_%a_%t_log.out --error /work3/s123456/exercise-improved/.arrays/<RUN_ID>/%A_%a_%t_log.err <PYTHON> -u -m submitit.core._submit /work3/s123456/exercise-improved/.arrays/<RUN_ID>
