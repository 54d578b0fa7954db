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

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /work3/s123456/exercise-improved/.arrays/<RUN_ID>/%A_%a_%t_log.out --error /work3/s123456/exercise-improved/.arrays/<RUN_ID>/%A_%a_%t_log.err <PYTHON> -u -m submitit.core._submit /work3/s123456/exercise-improved/.arrays/<RUN_ID>
