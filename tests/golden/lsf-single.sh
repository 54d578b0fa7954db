# would submit run <RUN_ID> (lsf) -> /work3/s123456/exercise-improved/<RUN_ID>
# resources: 1 GPU, 4 cores, 16 GB, 24:00 (job); queue gpuv100 (--queue)
#!/bin/bash

# Parameters
#BSUB -J exercise-improved
#BSUB -q gpuv100
#BSUB -n 4
#BSUB -R "span[hosts=1]"
#BSUB -R "rusage[mem=4GB]"
#BSUB -M 4GB
#BSUB -gpu "num=1:mode=exclusive_process"
#BSUB -W 24:00
#BSUB -wa USR2
#BSUB -wt 5
#BSUB -o /work3/s123456/exercise-improved/<RUN_ID>/submitit/%J_0_log.out
#BSUB -e /work3/s123456/exercise-improved/<RUN_ID>/submitit/%J_0_log.err

# setup
module load python3/3.11.9
module load cuda/12.4
source ${HPCSEG_VENV:-$HOME/hpcseg-venv}/bin/activate

# command
export SUBMITIT_EXECUTOR=lsf
if [ "${LSB_JOBINDEX:-0}" != "0" ]; then
    SUBMITIT_LSF_JOB_ID="${LSB_JOBID}_${LSB_JOBINDEX}"
else
    SUBMITIT_LSF_JOB_ID="${LSB_JOBID}"
fi
SUBMITIT_LSF_EXIT_FILE=/work3/s123456/exercise-improved/<RUN_ID>/submitit/"${SUBMITIT_LSF_JOB_ID}"_exitcode
rm -f "$SUBMITIT_LSF_EXIT_FILE"
# Python runs in the background (SIGINT restored) so that this shell can forward the scheduler's signals to it
( trap - INT; exec python3 -u -m submitit.core._submit /work3/s123456/exercise-improved/<RUN_ID>/submitit ) &
SUBMITIT_LSF_CHILD=$!
submitit_forward() { submitit_trapped=1; kill -s "$1" "$SUBMITIT_LSF_CHILD" 2>/dev/null; }
trap 'submitit_forward USR2' USR2
trap 'submitit_forward TERM' TERM
trap 'submitit_forward INT' INT
while :; do
    submitit_trapped=0
    wait "$SUBMITIT_LSF_CHILD"
    submitit_rc=$?
    [ "$submitit_trapped" = 1 ] || break  # the child ended
    kill -0 "$SUBMITIT_LSF_CHILD" 2>/dev/null && continue  # a forwarded signal interrupted wait
    wait "$SUBMITIT_LSF_CHILD" 2>/dev/null
    submitit_status=$?
    [ "$submitit_status" = 127 ] || submitit_rc=$submitit_status
    break
done
echo "$submitit_rc" > "$SUBMITIT_LSF_EXIT_FILE"
exit "$submitit_rc"
