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

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /work3/s123456/exercise-improved/<RUN_ID>/submitit/%j_%t_log.out --error /work3/s123456/exercise-improved/<RUN_ID>/submitit/%j_%t_log.err <PYTHON> -u -m submitit.core._submit /work3/s123456/exercise-improved/<RUN_ID>/submitit
