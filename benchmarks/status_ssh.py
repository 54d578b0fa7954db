"""Time `hpcseg status --host` on 1,000 runs against `hpcseg status` run on the cluster side itself; prints JSON.

    sudo python benchmarks/status_ssh.py [--runs 1000] [--repeats 5]

Needs root, like the SSH tests: it starts the tests' own sshd on a loopback port in front of the cluster account
`hpcseg-cluster` (tests/fixtures_ssh.py: its own host key and config, a hpcseg of its own), makes the run folders
of benchmarks/status_1000.py in that account's scratch with the stand-in `sacct` (one query, answered at once),
then measures, each `--repeats` times (medians):

- `cluster_s`: `hpcseg status --json` started on the cluster side itself (as the cluster user, no SSH);
- `round_trip_s`: `ssh cluster true` over the warm shared connection;
- `host_s`: `hpcseg status --host cluster --json` from here, a fresh process each time, the connection warm;
- `new_connections_second_call`: SSH connections the server accepted during the second of two `--host` calls.

The claim: host_s <= 1.5 * cluster_s + round_trip_s, and the second call opens no connection.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import fixtures_ssh as ssh  # noqa: E402 - the tests' sshd and cluster account
from status_1000 import make_runs, stand_in  # noqa: E402


def timed(argv: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{argv[:6]} failed: {done.stderr[-500:]}")
    return took, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    home = ssh._ensure_user()
    ssh.install_cluster_hpcseg(home)
    folder = Path(tempfile.mkdtemp(prefix="hs-", dir="/tmp"))
    os.chmod(folder, 0o711)
    work = home / "bench-status-ssh"
    proc, runtime = None, folder
    try:
        proc, port = ssh.start_sshd(folder)
        ssh.write_client_config(folder, port)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        scratch = work / "scratch"
        make_runs(scratch, args.runs, "slurm")
        stand_in(work / "bin", work / "calls.log")
        subprocess.run(["chown", "-R", ssh.USER, str(work)], check=True)
        setup = [f". {home}/venv/bin/activate", f"export PATH={work}/bin:$PATH"]
        runtime = Path(tempfile.mkdtemp(prefix="r", dir=folder))
        state = Path(tempfile.mkdtemp(prefix="state-"))
        env = dict(os.environ, HPCSEG_SSH=f"ssh -F {folder}/ssh_config", XDG_RUNTIME_DIR=str(runtime),
                   XDG_STATE_HOME=str(state))
        profile = state / "bench.toml"
        profile.write_text(f'name = "bench"\nexecutor = "slurm"\nhost = "cluster"\nsetup = {json.dumps(setup)}\n')
        job = HERE.parent / "jobs" / "exercise-improved.toml"
        hpcseg = [sys.executable, "-m", "hpcseg"]
        timed([*hpcseg, "submit", str(job), "--profile", str(profile), "--dry-run"], env)  # remembers the host
        on_cluster = ["runuser", "-u", ssh.USER, "--", "bash", "-lc",
                      "; ".join(setup + [f"hpcseg status --json --scratch {scratch}"])]
        over_ssh = [*hpcseg, "status", "--host", "cluster", "--json", "--scratch", str(scratch)]
        ping = ["ssh", "-F", f"{folder}/ssh_config", "-o", f"ControlPath={runtime}/hpcseg-ssh/%C", "cluster", "true"]
        cluster_s, host_s, trip_s = [], [], []
        first_s, out = timed(over_ssh, env)  # opens the shared connection
        assert len(json.loads(out)) == args.runs
        before = folder.joinpath("sshd.log").read_text().count("Accepted publickey")
        second_s, out = timed(over_ssh, env)
        new_connections = folder.joinpath("sshd.log").read_text().count("Accepted publickey") - before
        for _ in range(args.repeats):  # interleaved, so that a change in the machine's load hits all three
            took, out = timed(on_cluster, env)
            cluster_s.append(took)
            took, out = timed(over_ssh, env)
            host_s.append(took)
            trip_s.append(timed(ping, env)[0])
        c, h, r = (statistics.median(x) for x in (cluster_s, host_s, trip_s))
        print(json.dumps({
            "runs": args.runs, "repeats": args.repeats, "cluster_s": round(c, 3), "host_s": round(h, 3),
            "round_trip_s": round(r, 4), "first_host_call_s": round(first_s, 3),
            "second_host_call_s": round(second_s, 3),
            "new_connections_second_call": new_connections, "bound_s": round(1.5 * c + r, 3),
            "within_bound": h <= 1.5 * c + r, "ratio_host_to_cluster": round(h / c, 3),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
                       f"{[round(x, 2) for x in os.getloadavg()]}",
            "date": time.strftime("%Y-%m-%d"),
        }, indent=1))
    finally:
        if proc is not None:
            subprocess.run(["ssh", "-F", f"{folder}/ssh_config", "-o", f"ControlPath={runtime}/hpcseg-ssh/%C", "-O",
                            "exit", "cluster"], capture_output=True)  # the shared connection this run opened
            proc.terminate()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
