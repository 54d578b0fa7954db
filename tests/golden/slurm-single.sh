# would submit run <RUN_ID> (slurm) -> /work3/s123456/exercise-improved/<RUN_ID>
# resources: 1 GPU, 4 cores, 16 GB, 24:00 (job); queue gpuv100 (--queue)
#!/bin/bash

# Parameters
#SBATCH --cpus-per-task=4
#SBATCH --error=/work3/s123456/exercise-improved/<RUN_ID>/submitit/%j_0_log.err
#SBATCH --gpus-per-node=1
#SBATCH --job-name=exercise-improved
#SBATCH --mem=16GB
#SBATCH --nodes=1
#SBATCH --open-mode=append
#SBATCH --output=/work3/s123456/exercise-improved/<RUN_ID>/submitit/%j_0_log.out
#SBATCH --partition=gpuv100
#SBATCH --signal=USR2@120
#SBATCH --time=1440
#SBATCH --wckey=submitit

# setup
# a line that fails ends the job, named in its log and in <job id>_setup_failed
hpcseg_job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID}; hpcseg_job=${hpcseg_job:-$SLURM_JOB_ID}
hpcseg_failed=/work3/s123456/exercise-improved/<RUN_ID>/submitit/"$hpcseg_job"_setup_failed
rm -f "$hpcseg_failed"
hpcseg_setup_failed() { printf 'hpcseg: error: %s\n' "$1" >&2; printf '%s\n' "$1" > "$hpcseg_failed"; exit 1; }
<PYTHON> -c 'import hpcseg'
[ $? = 0 ] || hpcseg_setup_failed '<PYTHON> cannot import hpcseg: no set-up line activates an environment, so the job runs the submitting python, which must exist on the node (profile slurm)'

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /work3/s123456/exercise-improved/<RUN_ID>/submitit/%j_%t_log.out --error /work3/s123456/exercise-improved/<RUN_ID>/submitit/%j_%t_log.err <PYTHON> -u -m submitit.core._submit /work3/s123456/exercise-improved/<RUN_ID>/submitit
