"""Data-parallel training on the CPU (gloo): what two ranks train, who writes, the warning signal, a dead rank."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures_cluster import TINY, write_slices

from hpcseg.checkpoint import load_checkpoint
from hpcseg.dataparallel import rank_batch, steps_per_epoch
from hpcseg.distributed import DistributedError, Ranks, ranks_from_env, timeout_s

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "exercise-improved.toml"
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def data8(tmp_path_factory) -> Path:
    """8 training slices (4 steps of 2 ranks at batch 1) and 3 validation slices (an odd share per rank)."""
    root = tmp_path_factory.mktemp("ddp_data")
    write_slices(root / "training_data", 8, 0)
    write_slices(root / "validation_data", 3, 1)
    return root


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _train_args(data, out, sets, procs=1, resume=False) -> list[str]:
    args = [sys.executable, "-m", "hpcseg", "train", str(JOB), "--data", str(data), "--out", str(out),
            "--procs", str(procs), *(["--resume"] if resume else [])]
    for s in sets:
        args += ["--set", s]
    return args


def train(data, out, *sets, procs=1, resume=False) -> str:
    proc = subprocess.run(_train_args(data, out, sets, procs, resume), capture_output=True, text=True, timeout=300,
                          env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_ranks_at_batch_b_train_the_weights_of_one_process_at_batch_2b(data8, tmp_path):
    """2 ranks x batch 1 and 1 process x batch 2 take the same 4 steps, to float32 rounding (atol 1e-6).

    They are the same computation where nothing couples or randomises the samples of a batch differently: no
    dropout, instance norm (each slice normalised alone; batch norm would see one slice per rank), augmentation
    off and crops the slices' full size (no random origin), so each slice's forward pass is the same. The loss is
    a mean over the batch: MONAI's Dice per slice and class, averaged, plus cross-entropy averaged over pixels
    (equal per slice): rank means of 1 slice averaged by DDP's all-reduce = the mean over 2 slices. SGD with the
    linear rule gets the same rate (lr x global batch / base). Epoch 1's order is drawn from the same seed by
    both runs (one epoch: a single process draws its crops from the order's generator, so epoch 2 differs).
    What remains is the order of float additions of the gradients (DDP sums two half-batch gradients).
    """
    equal = [*TINY, "model.dropout=0", "augment.enabled=false", "optim.name=sgd", "optim.lr=0.1",
             "optim.lr_scaling=linear", "train.epochs=1"]
    train(data8, tmp_path / "one", *equal, "train.batch_size=2")
    out = train(data8, tmp_path / "two", *equal, "train.batch_size=1", procs=2)
    train(data8, tmp_path / "batch1", *equal, "train.batch_size=1")
    one, two, batch1 = (weights(tmp_path / name) for name in ("one", "two", "batch1"))
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-6, msg=key)
    # the steps mattered: one process at batch 1 (8 steps) ends elsewhere
    assert max((batch1[k] - one[k]).abs().max().item() for k in one) > 1e-3
    assert metrics(tmp_path / "two")[0]["train_loss"] == pytest.approx(metrics(tmp_path / "one")[0]["train_loss"],
                                                                       rel=1e-5)
    assert "batch 1 per rank x 2 ranks" in out and out.count("training exercise-improved") == 1


@pytest.mark.slow
def test_rank_0_alone_writes_the_run_folder(data8, tmp_path):
    """Two ranks write what one process writes: one metrics line per epoch, one TensorBoard event file."""
    sets = [*TINY, "train.epochs=2", "train.batch_size=1"]
    train(data8, tmp_path / "one", *sets)
    out = train(data8, tmp_path / "two", *sets, procs=2)

    def files(run):
        return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and p.parent.name != "tb")

    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert [r["epoch"] for r in metrics(tmp_path / "two")] == [1, 2]
    assert len(list((tmp_path / "two" / "tb").iterdir())) == 1
    assert out.count("epoch 2/2") == 1  # rank 1's progress lines are silent
    record = json.loads((tmp_path / "two" / "progress.json").read_text())
    assert record["epoch"] == 2 and record["finished"] is True


@pytest.mark.slow
def test_a_warning_on_one_rank_stops_every_rank_at_the_same_step_and_resume_is_exact(data8, tmp_path):
    """USR2 reaches rank 1 alone in epoch 2's first step: both ranks stop after its second (they agree every
    HPCSEG_STOP_EVERY_STEPS steps of an epoch, here 2, not after each: each agreement is a collective and a host
    synchronisation), rank 0 saves `last` mid-epoch with every rank's random states, and resuming with 2 ranks ends
    with exactly the weights of the uninterrupted 2-rank run (dropout and augmentation on: each rank's streams are
    restored)."""
    sets = [*TINY, "train.epochs=2", "train.batch_size=1", "train.checkpoint_every_s=3600"]
    train(data8, tmp_path / "once", *sets, procs=2)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "tests" / "ddp_warned_rank.py"), str(JOB), str(data8), str(tmp_path / "twice"),
                           "5", *sets], capture_output=True, text=True, timeout=300,
                          env=_env(HPCSEG_STOP_EVERY_STEPS="2"))
    assert "rank 0 stopped after 6 steps" in proc.stdout and "rank 1 stopped after 6 steps" in proc.stdout, \
        proc.stdout + proc.stderr
    saved = load_checkpoint(tmp_path / "twice" / "checkpoints" / "last.pt")
    assert saved["epoch"] == 1 and saved["partial"]["step"] == 2 and saved["world_size"] == 2
    assert saved["rng"]["ranks"]["augment"].shape[0] == 2
    train(data8, tmp_path / "twice", *sets, procs=2, resume=True)
    once, twice = weights(tmp_path / "once"), weights(tmp_path / "twice")
    assert all(torch.equal(once[k], twice[k]) for k in once)
    assert [r["epoch"] for r in metrics(tmp_path / "twice")] == [1, 2]
    assert [r["train_loss"] for r in metrics(tmp_path / "twice")] == pytest.approx(
        [r["train_loss"] for r in metrics(tmp_path / "once")], rel=1e-6)


def _rank_processes(pid: int) -> list[int]:
    """The launcher's rank processes below `pid` (multiprocessing spawn children, not its resource tracker)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").iterdir():
            for child in (task / "children").read_text().split():
                todo.append(int(child))
                if "spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(child))
    return found


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_rank_killed_stops_the_whole_run_with_one_line(data8, tmp_path):
    """`train --procs 2` whose rank is killed -9 mid-training: the launcher stops the other rank and the command
    exits 2 (not hanging) with one line naming the rank, its pid and the signal, and how to resume."""
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_args(data8, run, [*TINY, "train.epochs=100000"], procs=2), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run / "metrics.jsonl", proc)
        victim = _rank_processes(proc.pid)[-1]
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 2, err
    assert re.fullmatch(rf"hpcseg: error: training process of rank [01] \(pid {victim}\) was killed by SIGKILL; "
                        rf"the other ranks were stopped; resume with: {re.escape(sys.executable)} -m hpcseg train "
                        rf"--resume --out {re.escape(str(run))}",
                        err.strip().splitlines()[-1]), err
    assert "Traceback" not in err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_cluster_task_whose_peer_died_stops_with_one_line(data8, tmp_path):
    """Tasks of a cluster job have no launcher watching them (srun, blaunch, submitit's local tasks): when one is
    killed, the other's next collective fails and it exits 2 with one line instead of waiting for the walltime."""
    run, port = tmp_path / "run", _free_port()
    tasks = [subprocess.Popen(_train_args(data8, run, [*TINY, "train.epochs=100000"]), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HPCSEG_DIST_TIMEOUT_S="60"))
             for r in (0, 1)]
    try:
        _wait_for(run / "metrics.jsonl", tasks[0])
        tasks[1].kill()
        _, err = tasks[0].communicate(timeout=90)
    finally:
        for task in tasks:
            task.kill()
            task.communicate()
    assert tasks[0].returncode == 2, err
    assert err.strip().splitlines()[-1].startswith("hpcseg: error: rank 0 of 2: lost the other ranks ("), err
    assert "Traceback" not in err


def test_ranks_come_from_the_launchers_variables():
    assert ranks_from_env({}) == Ranks()
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "n1",
           "MASTER_PORT": "29500"}
    assert ranks_from_env(env) == Ranks(3, 4, 1, 2) and not ranks_from_env(env).leader
    with pytest.raises(DistributedError, match="RANK=4, WORLD_SIZE=4"):
        ranks_from_env({**env, "RANK": "4"})
    with pytest.raises(DistributedError, match="LOCAL_RANK='x': not an integer"):
        ranks_from_env({**env, "LOCAL_RANK": "x"})
    with pytest.raises(DistributedError, match="without MASTER_ADDR"):
        ranks_from_env({"RANK": "0", "WORLD_SIZE": "2"})
    assert timeout_s({}) == 300 and timeout_s({"HPCSEG_DIST_TIMEOUT_S": "20"}) == 20
    with pytest.raises(DistributedError, match="HPCSEG_DIST_TIMEOUT_S='0'"):
        timeout_s({"HPCSEG_DIST_TIMEOUT_S": "0"})


@pytest.mark.parametrize("n, batch, world", [(8, 1, 2), (10, 2, 4), (5, 2, 2), (3, 4, 2), (1, 1, 3)])
def test_the_ranks_share_every_epoch_once(n, batch, world):
    """Over an epoch the ranks' parts cover the order exactly once; a rank left without a slice in the short last
    batch trains on one that does not count, so every rank takes every step."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    counted, steps = [], steps_per_epoch(n, batch, world)
    for step in range(steps):
        for rank in range(world):
            index, count = rank_batch(order, step, batch, Ranks(rank, world, rank, world))
            assert 1 <= index.numel() <= batch
            counted += index[:count].tolist()
    assert sorted(counted) == list(range(n))
    one = [rank_batch(order, s, batch * world, Ranks())[0].tolist() for s in range(steps)]
    assert sum(one, []) == order.tolist()  # one process at the global batch: the same steps


def _cluster_gpus(backend: str) -> int:
    """The (fake) GPUs of the dev cluster's node: a 2-GPU job waits forever where there is one."""
    if backend == "slurm":
        out = subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True, timeout=10).stdout
        return max([int(n) for n in re.findall(r"Gres=gpu(?::\w+)?:(\d+)", out)] or [0])
    out = subprocess.run(["qhost", "-F", "gpu"], capture_output=True, text=True, timeout=10).stdout
    return max([int(float(n)) for n in re.findall(r"gpu=([\d.]+)", out)] or [0])


@pytest.mark.slow
def test_a_two_gpu_job_is_one_run_of_two_ranks_that_requeues_on_the_warning(backend, cli, tiny_data):
    """`submit --gpus 2` (the ranks train on this CPU with gloo): the job trains in two processes, the warning
    signal (sent as each scheduler sends it: here to rank 0 or to the job's one task) stops both at the same
    step, the job requeues and resumes, and it ends with exactly the asked epochs, one metrics line each; only
    rank 0 records attempts, and status lists the run once, with its 2 processes (on the CPU here)."""
    from test_cluster_e2e import TERMINAL, _send_warning

    if backend in ("slurm", "sge") and _cluster_gpus(backend) < 2:
        pytest.skip(f"the dev {backend} node has fewer than 2 (fake) GPUs: restart it with hpc/dev-cluster/")
    epochs = 40
    # 3 GB: two ranks and their launcher, each a torch process (the LSF emulator enforces -M as LSF does)
    [(run_id, job_id)] = cli.submit("--gpus", "2", "--mem", "3", "--time", "00:30", "--name", "ddp", data=tiny_data,
                                    sets=[f"train.epochs={epochs}", "train.val_interval=20"])
    run_dir = cli.scratch / "ddp" / run_id
    cli.wait(run_id, ("RUNNING",), timeout_s=120, until=lambda r: (r["epoch"] or 0) >= 3)
    _send_warning(backend, run_dir, job_id)
    row = cli.wait(run_id, TERMINAL, timeout_s=180)
    starts = [a for a in map(json.loads, (run_dir / "attempts.jsonl").read_text().splitlines())
              if a["event"] == "start"]
    assert row["state"] == "COMPLETED", (row, starts)
    assert len(starts) == 2 and starts[1]["resume"] and not starts[0]["resume"], starts
    assert row["epoch"] == epochs and [r["epoch"] for r in metrics(run_dir)] == list(range(1, epochs + 1))
    logs = "".join(p.read_text(errors="replace") for p in (run_dir / "submitit").glob("*_log.out"))
    assert "batch 2 per rank x 2 ranks" in logs
    # what it used: 2 training processes, on the GPUs where it had them, else on the CPU
    used = 2 if torch.cuda.is_available() else 0
    assert [(r["run_id"], r["gpus"], r["processes"]) for r in cli.status()] == [(run_id, used, 2)]


def test_the_line_for_a_failed_run_names_the_rank_that_caused_it():
    """The launcher reports every rank it stopped (TERM) beside the one that died, and a rank that printed its own
    error exits 2: the line names the killed rank, or nothing where the ranks said it themselves."""
    from types import SimpleNamespace

    from hpcseg.launch import _describe

    def failure(code, pid, at=100):
        return SimpleNamespace(exitcode=code, pid=pid, timestamp=at)

    assert _describe({0: failure(-15, 10), 1: failure(-9, 11)}) == (
        "training process of rank 1 (pid 11) was killed by SIGKILL; the other ranks were stopped")
    assert _describe({0: failure(2, 10), 1: failure(-9, 11, at=99)}).startswith("training process of rank 1 (pid 11)")
    assert _describe({0: failure(2, 10), 1: failure(-15, 11)}) is None  # rank 0 printed why
    assert _describe({0: failure(1, 10)}) == "training process of rank 0 (pid 10) exited with code 1; the other " \
                                           "ranks were stopped"


def test_a_run_saved_mid_epoch_by_two_ranks_resumes_only_with_two(tmp_path):
    """A part-done epoch was split among the ranks that saved it: another number of ranks is refused in one line;
    at an epoch's end it resumes, and says that it is not bit for bit."""
    from hpcseg.dataparallel import restore_rank_states
    from hpcseg.distributed import Group

    one, generator, lines = Group(Ranks(), torch.device("cpu")), torch.Generator(), []
    with pytest.raises(DistributedError, match=r"last.pt: saved in the middle of an epoch by 2 process\(es\): "
                                               r"resume it with 2"):
        restore_rank_states({"world_size": 2, "partial": {"step": 1}}, one, generator, tmp_path / "last.pt", print)
    state = generator.get_state()
    restore_rank_states({"world_size": 2, "partial": None, "rng": {}}, one, generator, tmp_path / "last.pt",
                        lines.append)
    assert len(lines) == 1 and "saved by 2 process(es), resumed by 1" in lines[0]
    assert torch.equal(generator.get_state(), state)  # one process keeps the order's generator as restored


def test_the_launcher_gives_back_the_signal_handlers_it_took(data8, tmp_path, monkeypatch):
    """A job that launched its ranks then requeues: brequeue's INT arrives after the launcher returned, and must
    end the job as it ends a single process (KeyboardInterrupt), not raise the launcher's SignalException (the
    job runner recorded that as FAILED while LSF requeued it)."""
    from hpcseg.jobfile import load_job
    from hpcseg.launch import _LAUNCHER_SIGNALS, train_processes

    for var in _LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # as in a job (the job environment sets it), whatever this test run inherited (INT ignored in a background shell)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = {sig: signal.getsignal(sig) for sig in _LAUNCHER_SIGNALS}
        job = load_job(JOB, [*TINY, "train.epochs=1"])
        summary = train_processes(2, job, data8 / "training_data", data8 / "validation_data", tmp_path / "run", False)
        assert summary is not None and (tmp_path / "run" / "checkpoints" / "last.pt").exists()
        assert {sig: signal.getsignal(sig) for sig in _LAUNCHER_SIGNALS} == before
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGINT, inherited)
