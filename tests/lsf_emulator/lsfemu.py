"""Local emulator of IBM Spectrum LSF's job commands (bsub, bjobs, bkill, brequeue, bpeek), for tests.

Jobs run for real, as local processes started by a detached supervisor (one per job, array elements
included). The commands print LSF's formats (see docs/lsf.md). Python 3 standard library only.

State lives in the directory named by ``LSF_EMU_DIR``: ``jobs/<id>.json`` per job (written atomically,
read and changed under an exclusive ``flock`` on ``.lock``), the job script copy ``jobs/<id>.sh``,
``calls.log`` (one JSON line per command invocation, so tests can count bjobs calls), supervisor logs.

Environment knobs:
    LSF_EMU_DIR                   state directory (required)
    LSF_EMU_QUEUES                known queues, space separated (default "gpuv100 gpua100 hpc"; the
                                  last is the default queue)
    LSF_EMU_SECONDS_PER_MINUTE    scales -W and -wt (default 60)
    LSF_EMU_CLEAN_PERIOD_S        finished jobs vanish from bjobs after this (default 3600)
    LSF_EMU_TERMINATE_INTERVAL_S  SIGINT/SIGTERM -> SIGKILL delay for bkill/brequeue/run limit (default 10)
    LSF_EMU_START_DELAY_S         a job stays PEND at least this long (default 0)
    LSF_EMU_FIRST_JOBID           first job id handed out (default 1000)
    LSF_EMU_STDOUT_DIRECT         "y" (default): -o/-e files are written as the job runs; "n": output is spooled
                                  and copied to them when the job ends, as without LSB_STDOUT_DIRECT (bpeek shows it)
    LSF_EMU_BJOBS_UNFINISHED_ONLY "y": bjobs without -a leaves finished jobs out even when named by id, and says
                                  "No unfinished job found" when nothing is left (default "n": they are listed)
    LSF_EMU_MEMLIMIT_PER_SLOT     "y" (default): the job is killed above -M times its slots; "n": above -M
    LSF_EMU_JOB_TMPDIR            where each job gets its own TMPDIR, <dir>/<jobid>.tmpdir (default: the state dir)
    LSF_EMU_MEM_POLL_S            how often the job's memory is measured (default 0.5)

LSF behaviours emulated beyond the formats, with IBM's documentation of each (LSF 10.1):

- bjobs -a lists finished jobs (within CLEAN_PERIOD); without it a finished job named by id may be left out and
  answered "No unfinished job found" (the LSB_BJOBS_CONSISTENT_EXIT_CODE examples show this answer):
  https://ibm.com/support/knowledgecenter/SSWRJV_10.1.0/lsf_command_ref/bjobs.a.1.html
 https://www.ibm.com/support/knowledgecenter/SSWRJV_10.1.0/lsf_config_ref/lsf.conf.lsb_bjobs_consistent_exit_code.5.html
- the memory limit (-M) enforced by LSF per job (LSB_JOB_MEMLIMIT=y): when the job's processes together pass it,
  LSF sends SIGINT, SIGTERM, then SIGKILL, JOB_TERMINATE_INTERVAL (10 s) apart, and the exit reason is
  TERM_MEMLIMIT (bjobs -o exit_reason):
  https://www.ibm.com/support/knowledgecenter/SSWRJV_10.1.0/lsf_config_ref/lsf.conf.lsb_job_memlimit.5.html
  https://www.ibm.com/docs/pt/SSWRJV_10.1.0/lsf_resource_sharing/memory_limit_enforce.html
  https://www.ibm.com/docs/SSWRJV_10.1.0/lsf_admin/termination_reasons_lsf.html
  https://www.ibm.com/docs/en/SSWRJV_10.1.0/lsf_command_ref/bjobs.o.1.html
- output spooled until the job ends unless LSB_STDOUT_DIRECT=y, and bpeek [-f] to see it meanwhile:
  https://www.ibm.com/docs/en/SSWRJV_10.1.0/lsf_config_ref/lsf.conf.lsb_stdout_direct.5.html
  https://www.ibm.com/docs/en/SSWRJV_10.1.0/lsf_command_ref/bpeek.1.html
  https://www.ibm.com/docs/SSWRJV_10.1.0/lsf_users_guide/job_output_view.html
- the job's slots in LSB_DJOB_NUMPROC and LSB_MAX_NUM_PROCESSORS (with LSB_HOSTS, LSB_MCPU_HOSTS):
  https://www.ibm.com/support/knowledgecenter/en/SSWRJV_10.1.0/lsf_config_ref/lsf_envars_job_exec.html
- a job-specific temporary directory <LSB_JOB_TMPDIR>/<jobID>.tmpdir (<arrayID>_<index>.tmpdir for array elements),
  mode 0700, set as TMPDIR (LSB_SET_TMPDIR=y) and removed when the job ends:
  https://www.ibm.com/docs/en/SSWRJV_10.1.0/lsf_config_ref/lsf.conf.lsb_job_tmpdir.5.html
  https://www.ibm.com/support/knowledgecenter/SSWRJV_10.1.0/lsf_config_ref/lsf.conf.lsb_set_tmpdir.5.html
"""

import contextlib
import fcntl
import glob
import getpass
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

FINISHED = ("DONE", "EXIT")
ACTIVE = ("PEND", "RUN", "PSUSP", "USUSP", "SSUSP")
CLUSTER = "emulator"
MAX_ARRAY_SIZE = 1000


class EmuError(Exception):
    """A user-facing error: message printed to stderr, exit code 255."""


# --------------------------------------------------------------------------------------------- state


def emu_dir():
    d = os.environ.get("LSF_EMU_DIR")
    if not d:
        raise EmuError("LSF_EMU_DIR is not set: the LSF emulator needs a state directory.")
    os.makedirs(os.path.join(d, "jobs"), exist_ok=True)
    return d


def _f(name, default):
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return float(default)


def seconds_per_minute():
    return _f("LSF_EMU_SECONDS_PER_MINUTE", 60)


def clean_period():
    return _f("LSF_EMU_CLEAN_PERIOD_S", 3600)


def terminate_interval():
    return _f("LSF_EMU_TERMINATE_INTERVAL_S", 10)


def _yes(name, default):
    return os.environ.get(name, default).strip().lower() in ("y", "yes", "1")


def parse_memory(text, option="-M"):
    """LSF's limit syntax: a number in KB (LSF_UNIT_FOR_LIMITS' default) or with a unit KB/MB/GB/TB; -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*!?\s*", text.upper())
    if not m:
        raise EmuError(f"Bad argument for option {option} <{text}>. Job not submitted.")
    return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2) or "K") * 1024)


@contextlib.contextmanager
def locked():
    with open(os.path.join(emu_dir(), ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def job_file(jid):
    return os.path.join(emu_dir(), "jobs", f"{int(jid)}.json")


def load_job(jid):
    try:
        with open(job_file(jid)) as fh:
            return json.load(fh)
    except (FileNotFoundError, ValueError):
        return None


def save_job(rec):
    path = job_file(rec["id"])
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(rec, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def all_job_ids():
    names = os.listdir(os.path.join(emu_dir(), "jobs"))
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def next_job_id():
    path = os.path.join(emu_dir(), "next_id")
    try:
        with open(path) as fh:
            jid = int(fh.read().strip())
    except (FileNotFoundError, ValueError):
        jid = int(_f("LSF_EMU_FIRST_JOBID", 1000))
    with open(path + ".tmp", "w") as fh:
        fh.write(str(jid + 1))
    os.replace(path + ".tmp", path)
    return jid


def log_call(cmd, argv):
    line = json.dumps({"cmd": cmd, "argv": argv, "time": time.time(), "pid": os.getpid()}) + "\n"
    fd = os.open(os.path.join(emu_dir(), "calls.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def visible(el, now=None):
    """Whether bjobs still knows an element (finished ones vanish after the clean period)."""
    if el["stat"] not in FINISHED:
        return True
    if el.get("forgotten"):
        return False
    now = time.time() if now is None else now
    return now - (el.get("end_time") or now) <= clean_period()


def pid_alive(pid, must_contain=None):
    """True for a live (non-zombie) process, optionally with a command line containing a marker."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        if must_contain is not None:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if must_contain.encode() not in fh.read():
                    return False
    except (OSError, IndexError):
        return False
    return True


# ------------------------------------------------------------------------------------------ parsing


def parse_time_minutes(text, option):
    """LSF's [hh:]mm for -W and -wt, in minutes."""
    m = re.fullmatch(r"(?:(\d+):)?(\d+)", text.strip())
    if not m:
        raise EmuError(f"Bad time specification <{text}> for option {option}. Job not submitted.")
    return int(m.group(1) or 0) * 60 + int(m.group(2))


def parse_signal(text):
    name = text.strip().upper()
    if name.isdigit():
        return int(name)
    if not name.startswith("SIG"):
        name = "SIG" + name
    sig = getattr(signal, name, None)
    if not isinstance(sig, signal.Signals):
        raise EmuError(f"{text}: Illegal signal value.")
    return int(sig)


def parse_index_list(spec):
    """'1-10', '1,3,5-9:2' -> sorted list of indices."""
    indices = set()
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part.strip())
        if not m:
            raise ValueError(part)
        lo = int(m.group(1))
        hi = int(m.group(2) or lo)
        step = int(m.group(3) or 1)
        if lo < 1 or hi < lo or step < 1:
            raise ValueError(part)
        indices.update(range(lo, hi + 1, step))
    return sorted(indices)


def parse_job_name(text):
    """'name[1-10]%4' -> (name, indices or None, parallelism or None)."""
    m = re.fullmatch(r"(?P<name>[^\[\]]*)\[(?P<spec>[^\]]+)\](?:%(?P<par>\d+))?", text)
    if not m:
        if "[" in text or "]" in text:
            raise EmuError("Bad job name. Job not submitted.")
        return text, None, None
    try:
        indices = parse_index_list(m.group("spec"))
    except ValueError:
        raise EmuError("Bad job array index list. Job not submitted.") from None
    if len(indices) > MAX_ARRAY_SIZE or indices[-1] > MAX_ARRAY_SIZE * 1000:
        raise EmuError("The job array size exceeds the maximum allowed (MAX_JOB_ARRAY_SIZE). Job not submitted.")
    par = int(m.group("par")) if m.group("par") else None
    if par is not None and par < 1:
        raise EmuError("Bad job array limit. Job not submitted.")
    return m.group("name"), indices, par


def parse_job_ref(text):
    """'123' -> (123, None); '123[4]' or '123[1-3]' -> (123, [indices]). Raises ValueError."""
    m = re.fullmatch(r"\s*(\d+)(?:\[([^\]]+)\])?\s*", text)
    if not m:
        raise ValueError(text)
    return int(m.group(1)), (parse_index_list(m.group(2)) if m.group(2) else None)


BSUB_VALUE_OPTS = {
    "-J", "-q", "-n", "-R", "-gpu", "-W", "-wa", "-wt", "-o", "-e", "-oo", "-eo", "-cwd",
    "-M", "-P", "-G", "-u", "-app", "-m", "-env", "-w", "-We", "-c", "-sp", "-Q", "-L", "-i",
    "-g", "-sla", "-v", "-p", "-S", "-F", "-D", "-C", "-b", "-t", "-E", "-Ep", "-U", "-k",
}
BSUB_FLAG_OPTS = {"-B", "-N", "-x", "-r", "-rn", "-H", "-hl"}


def parse_bsub_options(tokens, opts, where):
    """Parse bsub options from tokens into opts; returns the remaining (command) tokens."""
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--":
            return tokens[i + 1:]
        if not tok.startswith("-") or tok == "-":
            return tokens[i:]
        if tok in BSUB_FLAG_OPTS:
            opts[tok] = True
            i += 1
            continue
        if tok not in BSUB_VALUE_OPTS:
            raise EmuError(f"bsub: illegal option -- {tok.lstrip('-')}{where}. Job not submitted.")
        if i + 1 >= len(tokens):
            raise EmuError(f"bsub: option requires an argument -- {tok.lstrip('-')}{where}. Job not submitted.")
        value = tokens[i + 1]
        if tok == "-R":
            opts.setdefault("-R", []).append(value)
        else:
            opts[tok] = value
        i += 2
    return []


def parse_directives(script):
    """#BSUB lines up to the first command line, as LSF reads them."""
    opts = {}
    for lineno, line in enumerate(script.splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#BSUB"):
            try:
                tokens = shlex.split(stripped[len("#BSUB"):])
            except ValueError as e:
                raise EmuError(f"bsub: cannot parse line {lineno} of the job script ({e}). Job not submitted.")
            rest = parse_bsub_options(tokens, opts, f" (job script line {lineno})")
            if rest:
                raise EmuError(f"bsub: unexpected argument <{rest[0]}> in job script line {lineno}. Job not submitted.")
            continue
        if stripped.startswith("#"):
            continue
        break
    return opts


# --------------------------------------------------------------------------------------------- bsub


def known_queues():
    return os.environ.get("LSF_EMU_QUEUES", "gpuv100 gpua100 hpc").split()


def cmd_bsub(argv):
    cli = {}
    rest = parse_bsub_options(list(argv), cli, "")
    if rest:
        if len(rest) == 1 and os.path.isfile(rest[0]):
            with open(rest[0]) as fh:
                script = fh.read()
        else:
            script = "#!/bin/bash\n" + " ".join(shlex.quote(t) for t in rest) + "\n"
    else:
        script = sys.stdin.read()
    if not script.strip():
        raise EmuError("No command is specified. Job not submitted.")
    opts = parse_directives(script)
    resources = opts.get("-R", []) + cli.get("-R", [])
    opts.update(cli)  # the command line wins over #BSUB lines
    opts["-R"] = resources

    queues = known_queues()
    queue = opts.get("-q")
    default_queue = queue is None
    if default_queue:
        queue = queues[-1] if queues else "normal"
    elif queue not in queues:
        raise EmuError(f"{queue}: No such queue. Job not submitted.")
    try:
        slots = int(opts.get("-n", "1"))
        if slots < 1:
            raise ValueError
    except ValueError:
        raise EmuError(f"Bad argument for option -n <{opts.get('-n')}>. Job not submitted.") from None
    runlimit = parse_time_minutes(opts["-W"], "-W") if "-W" in opts else None
    warn_sig = parse_signal(opts["-wa"]) if "-wa" in opts else None
    warn_time = parse_time_minutes(opts["-wt"], "-wt") if "-wt" in opts else None
    if warn_time is not None and warn_sig is None:
        warn_sig = int(signal.SIGUSR2)
    name, indices, parallelism = parse_job_name(opts.get("-J", "NONAME"))
    if name == "NONAME" and "-J" not in opts:
        first = next((ln for ln in script.splitlines() if ln.strip() and not ln.startswith("#")), "job")
        name = first.strip()[:60]

    memlimit = parse_memory(opts["-M"]) if "-M" in opts else None
    if memlimit is not None and _yes("LSF_EMU_MEMLIMIT_PER_SLOT", "y"):
        memlimit *= slots
    out, err = opts.get("-oo", opts.get("-o")), opts.get("-eo", opts.get("-e"))
    now = time.time()
    with locked():
        jid = next_job_id()
        script_path = os.path.join(emu_dir(), "jobs", f"{jid}.sh")
        with open(script_path, "w") as fh:
            fh.write(script)
        elements = {}
        for idx in indices or [0]:
            elements[str(idx)] = {"stat": "PEND", "exit_code": None, "pid": None, "start_time": None,
                                  "end_time": None, "runs": 0, "action": None, "forgotten": False,
                                  "eligible_time": now + _f("LSF_EMU_START_DELAY_S", 0), "reason": None}
        rec = {
            "id": jid, "name": name, "array": indices is not None, "parallelism": parallelism,
            "queue": queue, "user": getpass.getuser(), "from_host": socket.gethostname(),
            "cwd": opts.get("-cwd", os.getcwd()), "script": script_path, "slots": slots,
            "resources": resources, "gpu": opts.get("-gpu"), "runlimit_min": runlimit,
            "warning_signal": warn_sig, "warning_time_min": warn_time,
            "out": out, "err": err, "out_overwrite": "-oo" in opts, "err_overwrite": "-eo" in opts,
            "env": dict(os.environ), "submit_time": now, "supervisor_pid": None, "elements": elements,
            "memlimit_bytes": memlimit, "stdout_direct": _yes("LSF_EMU_STDOUT_DIRECT", "y"),
            "tmpdir_base": os.environ.get("LSF_EMU_JOB_TMPDIR") or emu_dir(),
        }
        save_job(rec)
        rec["supervisor_pid"] = spawn_supervisor(jid)
        save_job(rec)
    where = "default queue" if default_queue else "queue"
    print(f"Job <{jid}> is submitted to {where} <{queue}>.")
    return 0


def _default_signals():
    """As LSF's sbatchd starts a job: INT and QUIT at their defaults, whatever the submitting shell ignored (a shell
    started in the background ignores them, and bash cannot trap a signal ignored at its start)."""
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def spawn_supervisor(jid):
    log = open(os.path.join(emu_dir(), f"supervisor.{jid}.log"), "a")
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "supervise", str(jid)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, close_fds=True, cwd="/",
    )
    log.close()
    return proc.pid


def ensure_supervisor(rec):
    """Caller holds the lock."""
    if not pid_alive(rec.get("supervisor_pid"), must_contain=f"supervise\0{rec['id']}"):
        rec["supervisor_pid"] = spawn_supervisor(rec["id"])


# ------------------------------------------------------------------------------------------ running


def _resolve_path(pattern, rec, idx):
    path = pattern.replace("%J", str(rec["id"])).replace("%I", str(idx))
    return path if os.path.isabs(path) else os.path.join(rec["cwd"], path)


def start_element(rec, idx, el):
    jid, index = rec["id"], int(idx)
    host = socket.gethostname()
    n = rec["slots"]
    env = dict(rec["env"])
    env.update({
        "LSB_JOBID": str(jid),
        "LSB_JOBINDEX": str(index),
        "LSB_JOBINDEX_END": str(max(int(i) for i in rec["elements"])) if rec["array"] else "0",
        "LSB_JOBNAME": f"{rec['name']}[{index}]" if rec["array"] else rec["name"],
        "LSB_QUEUE": rec["queue"],
        "LSB_HOSTS": " ".join([host] * n),
        "LSB_MCPU_HOSTS": f"{host} {n}",
        "LSB_DJOB_NUMPROC": str(n),
        "LSB_MAX_NUM_PROCESSORS": str(n),
        "LSB_JOBFILENAME": rec["script"],
        "LSB_EXEC_CLUSTER": CLUSTER,
    })
    # the job's own temporary directory, as TMPDIR (LSB_JOB_TMPDIR, LSB_SET_TMPDIR=y)
    tmpdir = os.path.join(rec.get("tmpdir_base") or emu_dir(),
                          f"{jid}_{index}.tmpdir" if rec["array"] else f"{jid}.tmpdir")
    os.makedirs(tmpdir, mode=0o700, exist_ok=True)
    env["TMPDIR"] = tmpdir
    default_out = os.path.join(emu_dir(), f"{jid}.{index}.out")
    out_path = _resolve_path(rec["out"], rec, index) if rec["out"] else default_out
    err_path = _resolve_path(rec["err"], rec, index) if rec["err"] else None
    for p in (out_path, err_path):
        if p:
            os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
    direct = rec.get("stdout_direct", True)
    # without LSB_STDOUT_DIRECT the job writes to a spool file, copied to -o/-e when it ends (bpeek reads it)
    spool = {"out": os.path.join(emu_dir(), "jobs", f"{jid}.{index}.spool.out"),
             "err": os.path.join(emu_dir(), "jobs", f"{jid}.{index}.spool.err")} if not direct else {}
    out_fh = open(spool["out"], "w") if spool else \
        open(out_path, "w" if rec["out_overwrite"] and el["runs"] == 0 else "a")
    err_fh = out_fh if err_path in (None, out_path) else open(spool["err"], "w") if spool else open(
        err_path, "w" if rec["err_overwrite"] and el["runs"] == 0 else "a")
    try:
        proc = subprocess.Popen(["bash", rec["script"]], cwd=rec["cwd"], env=env, stdin=subprocess.DEVNULL,
                                stdout=out_fh, stderr=err_fh, start_new_session=True, close_fds=True,
                                preexec_fn=_default_signals)
    finally:
        out_fh.close()
        if err_fh is not out_fh:
            err_fh.close()
    el.update({"stat": "RUN", "pid": proc.pid, "start_time": time.time(), "end_time": None,
               "exit_code": None, "runs": el["runs"] + 1, "out_path": out_path, "reason": None,
               "err_path": err_path, "spool": spool, "tmpdir": tmpdir})
    return proc


def _job_rss(sid):
    """Resident bytes of every process of the job (its session: the job shell started a new one)."""
    total = 0
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[3]) != sid:  # the 6th field of stat: the session id
                continue
            total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # the 24th: resident pages
        except (OSError, IndexError, ValueError):
            continue
    return total


def _finish_files(rec, idx, el):
    """When an element ends: spooled output goes to its -o/-e files (appended, or overwriting on the first run),
    and its TMPDIR is removed."""
    spool = el.get("spool") or {}
    for kind, target, overwrite in (("out", el.get("out_path"), rec["out_overwrite"]),
                                    ("err", el.get("err_path"), rec["err_overwrite"])):
        source = spool.get(kind)
        if not source or not os.path.exists(source):
            continue
        if target:
            with open(source, "rb") as src, open(target, "wb" if overwrite and el["runs"] <= 1 else "ab") as dst:
                shutil.copyfileobj(src, dst)
        os.unlink(source)
    el["spool"] = {}
    if el.get("tmpdir"):
        shutil.rmtree(el["tmpdir"], ignore_errors=True)


def _killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _append_report(rec, idx, el):
    """LSF appends a job report to the job's standard output file."""
    path = el.get("out_path")
    if not path:
        return
    label = f"{rec['id']}[{idx}]" if rec["array"] else str(rec["id"])
    done = el["stat"] == "DONE"
    lines = [
        "", "-" * 60,
        f"Sender: LSF System <lsfadmin@{socket.gethostname()}>",
        f"Subject: Job {label}: <{rec['name']}> in cluster <{CLUSTER}> {'Done' if done else 'Exited'}",
        "",
        "Successfully completed." if done else f"Exited with exit code {el['exit_code']}.",
    ]
    if el.get("reason"):
        lines.append(el["reason"])
    try:
        with open(path, "a") as fh:
            fh.write("\n".join(lines) + "\n")
    except OSError:
        pass


def supervise(jid):
    """Runs all elements of one job; exits once every element has finished."""
    procs = {}  # idx -> dict(proc, warned, kill_at, stage)
    while True:
        with locked():
            rec = load_job(jid)
            if rec is None:
                return 0
            now = time.time()
            spm = seconds_per_minute()
            for idx, el in rec["elements"].items():
                info = procs.get(idx)
                if info is None:
                    continue
                rc = info["proc"].poll()
                if rc is not None:
                    code = rc if rc >= 0 else 128 - rc
                    del procs[idx]
                    _finish_files(rec, idx, el)
                    if el.get("action") == "requeue":
                        el["reason"] = "TERM_REQUEUE_OWNER: job killed and requeued by owner."
                        el.update({"stat": "EXIT", "exit_code": code})
                        _append_report(rec, idx, el)
                        el.update({"stat": "PEND", "pid": None, "exit_code": None, "action": None,
                                   "start_time": None, "end_time": None, "eligible_time": now, "reason": None})
                    else:
                        el.update({"stat": "DONE" if code == 0 else "EXIT", "exit_code": code,
                                   "end_time": now, "pid": None, "action": None})
                        _append_report(rec, idx, el)
                    continue
                pid = info["proc"].pid
                if el.get("action") in ("kill", "requeue") and info["stage"] == 0:
                    if el["action"] == "kill":
                        el["reason"] = "TERM_OWNER: job killed by owner."
                    _killpg(pid, signal.SIGINT)
                    time.sleep(0.05)
                    _killpg(pid, signal.SIGTERM)
                    info.update(stage=1, kill_at=now + terminate_interval())
                limit = rec.get("runlimit_min")
                if limit is not None and info["stage"] == 0:
                    elapsed = now - el["start_time"]
                    wsig, wt = rec.get("warning_signal"), rec.get("warning_time_min") or 0
                    if wsig and not info["warned"] and elapsed >= (limit - wt) * spm:
                        info["warned"] = True
                        try:
                            os.kill(pid, wsig)  # the warning action goes to the job shell only
                        except ProcessLookupError:
                            pass
                    if elapsed >= limit * spm:
                        el["reason"] = "TERM_RUNLIMIT: job killed after reaching LSF run time limit."
                        _killpg(pid, signal.SIGUSR2)
                        info.update(stage=1, kill_at=now + terminate_interval())
                memlimit = rec.get("memlimit_bytes")
                if memlimit and info["stage"] == 0 and now >= info.get("mem_at", 0):
                    info["mem_at"] = now + _f("LSF_EMU_MEM_POLL_S", 0.5)
                    if _job_rss(pid) > memlimit:  # LSF's per-job limit: SIGINT, SIGTERM, then SIGKILL
                        el["reason"] = "TERM_MEMLIMIT: job killed after reaching LSF memory usage limit."
                        _killpg(pid, signal.SIGINT)
                        info.update(stage=1, term_at=now + terminate_interval(), kill_at=now + 2 * terminate_interval())
                if info["stage"] == 1 and info.get("term_at") and now >= info["term_at"]:
                    _killpg(pid, signal.SIGTERM)
                    info["term_at"] = None
                if info["stage"] == 1 and now >= info["kill_at"]:
                    _killpg(pid, signal.SIGKILL)
                    info["stage"] = 2
            # dispatch pending elements, at most `parallelism` running at once
            running = sum(1 for el in rec["elements"].values() if el["stat"] == "RUN")
            cap = rec.get("parallelism") or len(rec["elements"])
            for idx in sorted(rec["elements"], key=int):
                el = rec["elements"][idx]
                if running >= cap:
                    break
                if el["stat"] == "PEND" and now >= el.get("eligible_time", 0):
                    try:
                        procs[idx] = {"proc": start_element(rec, idx, el), "warned": False, "kill_at": None,
                                      "stage": 0}
                    except OSError as e:
                        el.update({"stat": "EXIT", "exit_code": 127, "end_time": now,
                                   "reason": f"cannot start job: {e}"})
                        continue
                    running += 1
            if not procs and all(el["stat"] in FINISHED for el in rec["elements"].values()):
                rec["supervisor_pid"] = None
                save_job(rec)
                return 0
            save_job(rec)
        time.sleep(0.1)


# -------------------------------------------------------------------------------------------- bjobs

FIELDS = {
    # name: (header, width)
    "jobid": ("JOBID", 7), "jobindex": ("JOBINDEX", 8), "stat": ("STAT", 5), "exit_code": ("EXIT_CODE", 9),
    "job_name": ("JOB_NAME", 10), "name": ("JOB_NAME", 10), "queue": ("QUEUE", 10), "user": ("USER", 7),
    "from_host": ("FROM_HOST", 11), "exec_host": ("EXEC_HOST", 11), "submit_time": ("SUBMIT_TIME", 15),
    "start_time": ("START_TIME", 15), "finish_time": ("FINISH_TIME", 15), "nreq_slot": ("NREQ_SLOT", 9),
    "slots": ("SLOTS", 5), "pids": ("PIDS", 10), "exit_reason": ("EXIT_REASON", 20),
}
DEFAULT_COLUMNS = ["jobid", "user", "stat", "queue", "from_host", "exec_host", "job_name", "submit_time"]


def _fmt_time(t):
    return time.strftime("%b %e %H:%M", time.localtime(t)) if t else "-"


def field_value(name, rec, idx, el):
    host = socket.gethostname()
    if name == "jobid":
        return str(rec["id"])
    if name == "jobindex":
        return str(idx)
    if name == "stat":
        return el["stat"]
    if name == "exit_code":
        return str(el["exit_code"]) if el["stat"] == "EXIT" and el["exit_code"] is not None else "-"
    if name in ("job_name", "name"):
        return f"{rec['name']}[{idx}]" if rec["array"] else rec["name"]
    if name == "queue":
        return rec["queue"]
    if name == "user":
        return rec["user"]
    if name == "from_host":
        return rec["from_host"]
    if name == "exec_host":
        if el["stat"] == "PEND" or not el.get("start_time"):
            return "-"
        return host if rec["slots"] == 1 else f"{rec['slots']}*{host}"
    if name == "submit_time":
        return _fmt_time(rec["submit_time"])
    if name == "start_time":
        return _fmt_time(el.get("start_time"))
    if name == "finish_time":
        return _fmt_time(el.get("end_time")) if el["stat"] in FINISHED else "-"
    if name in ("nreq_slot", "slots"):
        return str(rec["slots"])
    if name == "pids":
        return str(el["pid"]) if el.get("pid") else "-"
    if name == "exit_reason":
        return el.get("reason") or "-"
    raise KeyError(name)


def parse_output_format(fmt):
    fields, delimiter = [], None
    for tok in fmt.split():
        m = re.fullmatch(r"delimiter=(['\"]?)(.*)\1", tok)
        if m:
            delimiter = m.group(2)
            continue
        name = tok.split(":", 1)[0].lower()
        if name not in FIELDS:
            raise EmuError(f"{name}: Illegal field name.")
        fields.append(name)
    if not fields:
        raise EmuError("bjobs: no output field specified with -o.")
    return fields, delimiter


def cmd_bjobs(argv):
    noheader = as_json = False
    fmt = None
    which = "unfinished"
    refs = []
    it = iter(argv)
    for tok in it:
        if tok == "-noheader":
            noheader = True
        elif tok == "-json":
            as_json = True
        elif tok == "-o":
            fmt = next(it, None)
            if fmt is None:
                raise EmuError("bjobs: option requires an argument -- o")
        elif tok in ("-a", "-d", "-r", "-p", "-s"):
            which = {"-a": "all", "-d": "done", "-r": "run", "-p": "pend", "-s": "susp"}[tok]
        elif tok in ("-w", "-W", "-X", "-A"):
            pass
        elif tok in ("-u", "-q", "-J", "-m", "-G", "-P"):
            next(it, None)  # accepted, not filtered on
        elif tok.startswith("-"):
            raise EmuError(f"bjobs: illegal option -- {tok.lstrip('-')}")
        else:
            refs.append(tok)
    if fmt is not None:
        fields, delimiter = parse_output_format(fmt)
    else:
        fields, delimiter = DEFAULT_COLUMNS, None

    rows, missing = [], []
    now = time.time()
    hide_finished = which == "unfinished" and _yes("LSF_EMU_BJOBS_UNFINISHED_ONLY", "n")
    with locked():
        if refs:
            for ref in refs:
                try:
                    jid, indices = parse_job_ref(ref)
                except ValueError:
                    missing.append(ref)
                    continue
                rec = load_job(jid)
                els = []
                if rec is not None:
                    wanted = [str(i) for i in indices] if indices else list(rec["elements"])
                    els = [(i, rec["elements"][i]) for i in wanted if i in rec["elements"]]
                    els = [(i, el) for i, el in els if visible(el, now)]
                if not els:
                    missing.append(ref)
                    continue
                if hide_finished:  # such a site lists a finished job only with -a (or -d)
                    els = [(i, el) for i, el in els if el["stat"] not in FINISHED]
                rows.extend((rec, i, el) for i, el in els)
        else:
            states = {"unfinished": ACTIVE, "all": ACTIVE + FINISHED, "done": FINISHED, "run": ("RUN",),
                      "pend": ("PEND",), "susp": ("PSUSP", "USUSP", "SSUSP")}[which]
            for jid in all_job_ids():
                rec = load_job(jid)
                if rec is None:
                    continue
                for i in sorted(rec["elements"], key=int):
                    el = rec["elements"][i]
                    if el["stat"] in states and visible(el, now):
                        rows.append((rec, i, el))

    values = [[field_value(f, rec, i, el) for f in fields] for rec, i, el in rows]
    if as_json:
        records = [{FIELDS[f][0]: ("" if v == "-" else v) for f, v in zip(fields, row)} for row in values]
        print(json.dumps({"COMMAND": "bjobs", "JOBS": len(records), "RECORDS": records}, indent=2))
    elif values:
        headers = [FIELDS[f][0] for f in fields]
        if delimiter is not None:
            lines = [delimiter.join(row) for row in values]
            header = delimiter.join(headers)
        else:
            widths = [max(FIELDS[f][1], len(FIELDS[f][0])) for f in fields]
            def line(cells):
                return " ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
            lines = [line(row) for row in values]
            header = line(headers)
        if not noheader:
            print(header)
        for ln in lines:
            print(ln)
    for ref in missing:
        print(f"Job <{ref}> is not found", file=sys.stderr)
    if hide_finished and refs and not rows and len(missing) < len(refs):
        print("No unfinished job found", file=sys.stderr)
        return 255
    if not refs and not rows:
        print("No unfinished job found" if which == "unfinished" else "No job found", file=sys.stderr)
        return 255
    return 255 if missing else 0


# ---------------------------------------------------------------------------------- bkill, brequeue


def _select(ref, now):
    """-> (rec, [(idx, el)]) or (None, []) when the job is unknown to LSF."""
    jid, indices = parse_job_ref(ref)
    rec = load_job(jid)
    if rec is None:
        return None, []
    wanted = [str(i) for i in indices] if indices else list(rec["elements"])
    els = [(i, rec["elements"][i]) for i in wanted if i in rec["elements"] and visible(rec["elements"][i], now)]
    return (rec, els) if els else (None, [])


def _select_or_report(ref, now):
    """`_select`, printing LSF's message for an illegal or unknown job ID (then the record is None)."""
    try:
        rec, els = _select(ref, now)
    except ValueError:
        print(f"{ref}: Illegal job ID.", file=sys.stderr)
        return None, []
    if rec is None:
        print(f"Job <{ref}>: No matching job found", file=sys.stderr)
    return rec, els


def cmd_bkill(argv):
    sig = None
    refs = []
    it = iter(argv)
    for tok in it:
        if tok == "-s":
            value = next(it, None)
            if value is None:
                raise EmuError("bkill: option requires an argument -- s")
            sig = parse_signal(value)
        elif tok.startswith("-"):
            raise EmuError(f"bkill: illegal option -- {tok.lstrip('-')}")
        else:
            refs.append(tok)
    if not refs:
        raise EmuError("bkill: a job ID is required.")
    rc = 0
    now = time.time()
    with locked():
        if refs == ["0"]:
            refs = [str(j) for j in all_job_ids()
                    if any(el["stat"] in ACTIVE for el in (load_job(j) or {"elements": {}})["elements"].values())]
        for ref in refs:
            rec, els = _select_or_report(ref, now)
            if rec is None:
                rc = 255
                continue
            active = [(i, el) for i, el in els if el["stat"] in ACTIVE]
            if not active:
                print(f"Job <{ref}>: Job has already finished", file=sys.stderr)
                rc = 255
                continue
            for i, el in active:
                if sig is not None:
                    if el["stat"] == "RUN" and el.get("pid"):
                        try:
                            os.kill(el["pid"], sig)  # the job shell only, as bkill -s may do
                        except ProcessLookupError:
                            pass
                elif el["stat"] == "RUN":
                    if el.get("action") != "requeue":
                        el["action"] = "kill"
                else:  # pending or suspended before running: ends at once
                    el.update({"stat": "EXIT", "exit_code": 130, "end_time": now, "action": None,
                               "reason": "TERM_OWNER: job killed by owner."})
            save_job(rec)
            print(f"Job <{ref}> is being {'signaled' if sig is not None else 'terminated'}")
    return rc


def cmd_brequeue(argv):
    states = set()
    refs = []
    for tok in argv:
        if tok in ("-d", "-e", "-r", "-a", "-p"):
            states.update({"-d": ["DONE"], "-e": ["EXIT"], "-r": ["RUN"], "-p": ["PEND"],
                           "-a": ["DONE", "EXIT", "RUN"]}[tok])
        elif tok.startswith("-"):
            raise EmuError(f"brequeue: illegal option -- {tok.lstrip('-')}")
        else:
            refs.append(tok)
    if not refs:
        raise EmuError("brequeue: a job ID is required.")
    states = states or {"DONE", "EXIT", "RUN"}
    rc = 0
    now = time.time()
    with locked():
        for ref in refs:
            rec, els = _select_or_report(ref, now)
            if rec is None:
                rc = 255
                continue
            todo = [(i, el) for i, el in els if el["stat"] in states]
            if not todo:
                print(f"Job <{ref}>: Job is not in a state that can be requeued", file=sys.stderr)
                rc = 255
                continue
            restart = False
            for i, el in todo:
                if el["stat"] == "RUN":
                    el["action"] = "requeue"
                else:
                    el.update({"stat": "PEND", "exit_code": None, "pid": None, "start_time": None,
                               "end_time": None, "action": None, "eligible_time": now, "reason": None})
                    restart = True
            if restart:
                ensure_supervisor(rec)
            save_job(rec)
            print(f"Job <{ref}> is being requeued")
    return rc


# -------------------------------------------------------------------------------------------- bpeek


def _peek_source(ref):
    """(path of the output written so far, None) of a running element, or (None, LSF's message)."""
    try:
        jid, indices = parse_job_ref(ref)
    except ValueError:
        return None, f"{ref}: Illegal job ID."
    rec = load_job(jid)
    if rec is None or (rec["array"] and not indices) or (indices and str(indices[0]) not in rec["elements"]):
        return None, f"Job <{ref}> is not found"
    el = rec["elements"][str(indices[0]) if indices else "0"]
    if el["stat"] != "RUN":
        return None, f"Job <{ref}> : Not a running job" if el["stat"] in FINISHED else f"Job <{ref}> : Not yet started."
    spool = el.get("spool") or {}
    return spool.get("out") or el.get("out_path"), None


def cmd_bpeek(argv):
    """bpeek [-f] JOBID: the output of a running job so far (with -f, as tail -f, until it ends)."""
    follow = "-f" in argv
    refs = [a for a in argv if a != "-f"]
    if len(refs) != 1 or refs[0].startswith("-"):
        raise EmuError("bpeek: a job ID is required (bpeek [-f] job_ID).")
    with locked():
        path, problem = _peek_source(refs[0])
    if problem:
        print(problem, file=sys.stderr)
        return 255
    print("<< output from stdout >>", flush=True)
    position = 0
    while True:
        try:
            with open(path, "rb") as fh:
                fh.seek(position)
                chunk = fh.read()
        except OSError:
            chunk = b""
        position += len(chunk)
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
        if not follow:
            return 0
        with locked():
            now_path, problem = _peek_source(refs[0])
        if problem or now_path != path:  # ended (or requeued: bpeek -f then has to be run again)
            return 0
        time.sleep(0.2)


# --------------------------------------------------------------------------------------------- main

COMMANDS = {"bsub": cmd_bsub, "bjobs": cmd_bjobs, "bkill": cmd_bkill, "brequeue": cmd_brequeue, "bpeek": cmd_bpeek}


def main(cmd, argv):
    try:
        log_call(cmd, argv)
        return COMMANDS[cmd](argv)
    except EmuError as e:
        print(str(e), file=sys.stderr)
        return 255


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "supervise":
        sys.exit(supervise(int(sys.argv[2])))
    if len(sys.argv) >= 2 and sys.argv[1] in COMMANDS:
        sys.exit(main(sys.argv[1], sys.argv[2:]))
    print("usage: lsfemu.py {bsub,bjobs,bkill,brequeue,bpeek} ARGS... | supervise JOBID", file=sys.stderr)
    sys.exit(2)
