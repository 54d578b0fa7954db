# would submit run <RUN_ID>-0 (lsf)  optim.lr=0.001 -> /work3/s123456/exercise-improved/<RUN_ID>-0
# would submit run <RUN_ID>-1 (lsf)  optim.lr=0.0003 -> /work3/s123456/exercise-improved/<RUN_ID>-1
# resources: 1 GPU, 4 cores, 16 GB (job); 02:00 (--time); queue gpua100 (--queue)
#!/bin/bash

# Parameters
#BSUB -J "exercise-improved[1-2]%1"
#BSUB -q gpua100
#BSUB -n 4
#BSUB -R "span[hosts=1]"
#BSUB -R "rusage[mem=4GB]"
#BSUB -M 4GB
#BSUB -gpu "num=1:mode=exclusive_process"
#BSUB -W 2:00
#BSUB -wa USR2
#BSUB -wt 5
#BSUB -o /work3/s123456/exercise-improved/.arrays/<RUN_ID>/%J_%I_0_log.out
#BSUB -e /work3/s123456/exercise-improved/.arrays/<RUN_ID>/%J_%I_0_log.err

# setup
# a line that fails ends the job, named in its log and in <job id>_setup_failed
hpcseg_job=$LSB_JOBID; [ "${LSB_JOBINDEX:-0}" = 0 ] || hpcseg_job=${LSB_JOBID}_$LSB_JOBINDEX
hpcseg_failed=/work3/s123456/exercise-improved/.arrays/<RUN_ID>/"$hpcseg_job"_setup_failed
rm -f "$hpcseg_failed"
hpcseg_setup_failed() { printf 'hpcseg: error: %s\n' "$1" >&2; printf '%s\n' "$1" > "$hpcseg_failed"; exit 1; }
module load python3/3.11.9
[ $? = 0 ] || hpcseg_setup_failed 'set-up line 1 failed: module load python3/3.11.9 (profile dtu)'
source ${HPCSEG_VENV:-$HOME/hpcseg-venv}/bin/activate
[ $? = 0 ] || hpcseg_setup_failed 'set-up line 2 failed: source ${HPCSEG_VENV:-$HOME/hpcseg-venv}/bin/activate (profile dtu)'
python3 -c 'import hpcseg'
[ $? = 0 ] || hpcseg_setup_failed 'python3 cannot import hpcseg: install hpcseg into the environment that the set-up lines activate (profile dtu)'

# command
export SUBMITIT_EXECUTOR=lsf
if [ "${LSB_JOBINDEX:-0}" != "0" ]; then
    SUBMITIT_LSF_JOB_ID="${LSB_JOBID}_${LSB_JOBINDEX}"
else
    SUBMITIT_LSF_JOB_ID="${LSB_JOBID}"
fi
SUBMITIT_LSF_EXIT_FILE=/work3/s123456/exercise-improved/.arrays/<RUN_ID>/"${SUBMITIT_LSF_JOB_ID}"_exitcode
rm -f "$SUBMITIT_LSF_EXIT_FILE"
# Python runs in the background (SIGINT restored) so that this shell can forward the scheduler's signals to it
( trap - INT; exec python3 -u -m submitit.core._submit /work3/s123456/exercise-improved/.arrays/<RUN_ID> ) &
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
