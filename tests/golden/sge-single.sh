# would submit run <RUN_ID> (sge) -> /work3/s123456/exercise-improved/<RUN_ID>
# resources: 1 GPU, 4 cores, 16 GB, 24:00 (job); queue all.q (--queue)
#!/bin/bash

# Parameters
#$ -N exercise-improved
#$ -S /bin/bash
#$ -V
#$ -r y
#$ -q all.q
#$ -pe smp 4
#$ -l h_rt=24:00:00,s_rt=23:58:00
#$ -l mem_free=4G
#$ -l gpu=1
#$ -o /work3/s123456/exercise-improved/<RUN_ID>/submitit/$JOB_ID_0_log.out
#$ -e /work3/s123456/exercise-improved/<RUN_ID>/submitit/$JOB_ID_0_log.err

# setup
# a line that fails ends the job, named in its log and in <job id>_setup_failed
hpcseg_job=$JOB_ID; [ "${SGE_TASK_ID:-undefined}" = undefined ] || hpcseg_job=${JOB_ID}_$SGE_TASK_ID
hpcseg_failed=/work3/s123456/exercise-improved/<RUN_ID>/submitit/"$hpcseg_job"_setup_failed
rm -f "$hpcseg_failed"
hpcseg_setup_failed() { printf 'hpcseg: error: %s\n' "$1" >&2; printf '%s\n' "$1" > "$hpcseg_failed"; exit 1; }
<PYTHON> -c 'import hpcseg'
[ $? = 0 ] || hpcseg_setup_failed '<PYTHON> cannot import hpcseg: no set-up line activates an environment, so the job runs the submitting python, which must exist on the node (profile sge)'

# command
export SUBMITIT_EXECUTOR=sge
if [ "${SGE_TASK_ID:-undefined}" != "undefined" ]; then
    SUBMITIT_SGE_JOB_ID="${JOB_ID}_${SGE_TASK_ID}"
else
    SUBMITIT_SGE_JOB_ID="${JOB_ID}"
fi
SUBMITIT_SGE_EXIT_FILE=/work3/s123456/exercise-improved/<RUN_ID>/submitit/"${SUBMITIT_SGE_JOB_ID}"_exitcode
rm -f "$SUBMITIT_SGE_EXIT_FILE"
# Python runs in the background (SIGINT restored) so that this shell can forward the scheduler's signals to it
# (the soft-limit warning USR1, sent to the whole process group, reaches Python as USR2 through this shell only)
( trap - INT; trap '' USR1; exec <PYTHON> -u -m submitit.core._submit /work3/s123456/exercise-improved/<RUN_ID>/submitit ) &
SUBMITIT_SGE_CHILD=$!
submitit_forward() { submitit_trapped=1; kill -s "$1" "$SUBMITIT_SGE_CHILD" 2>/dev/null; }
trap 'submitit_forward USR2' USR1
trap 'submitit_forward USR2' USR2
trap 'submitit_forward TERM' TERM
trap 'submitit_forward INT' INT
while :; do
    submitit_trapped=0
    wait "$SUBMITIT_SGE_CHILD"
    submitit_rc=$?
    [ "$submitit_trapped" = 1 ] || break  # the child ended
    kill -0 "$SUBMITIT_SGE_CHILD" 2>/dev/null && continue  # a forwarded signal interrupted wait
    wait "$SUBMITIT_SGE_CHILD" 2>/dev/null
    submitit_status=$?
    [ "$submitit_status" = 127 ] || submitit_rc=$submitit_status
    break
done
echo "$submitit_rc" > "$SUBMITIT_SGE_EXIT_FILE"
exit "$submitit_rc"
