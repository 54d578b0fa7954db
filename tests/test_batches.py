"""Where the splits live during training: resident on the device, or in host memory / memory-mapped files with
each batch copied over. On the CPU both "device" and "host" are the CPU, but the code paths differ: they must
train the same weights bit for bit."""

import json

import numpy as np
import pytest
import torch
from fixtures_cluster import TINY
from test_ddp import data8  # noqa: F401 - a fixture
from test_ddp import train as train_procs
from test_ddp import weights as ddp_weights
from test_pipeline import JOB

import hpcseg.train as T
from hpcseg.augment import crop_batch
from hpcseg.batches import MAPPED, HostBatches, Placement, place, training_tensors, validation_groups
from hpcseg.checkpoint import load_checkpoint
from hpcseg.data import load_split, save_slice
from hpcseg.dataparallel import rank_batch
from hpcseg.distributed import Ranks
from hpcseg.jobfile import load_job

#: Slices of several sizes (one smaller than the 32 x 32 crop), five of them: batches of 2 leave a short last one.
TRAIN_SHAPES = [(40, 36), (32, 48), (30, 30), (44, 40), (36, 36)]
VAL_SHAPES = [(40, 36), (40, 36), (40, 36), (36, 44)]
FORCE_HOST = "data.device_memory_gb=1e-9"
FORCE_MAPPED = "data.host_memory_gb=1e-9"


def _write(folder, shapes, seed):
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(shapes):
        label = np.zeros((h, w), np.uint8)
        label[4:-4, 4:-4] = 1 + (np.arange(w - 8) * 3 // (w - 8))[None, :]
        image = label * 0.3 + rng.normal(0, 0.05, (h, w))
        save_slice(folder, f"s{i:02d}", image, label)


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    _write(root / "training_data", TRAIN_SHAPES, 0)
    _write(root / "validation_data", VAL_SHAPES, 1)
    return root


def _train(data, out, *sets):
    job = load_job(JOB, [*TINY, "train.epochs=2", "train.batch_size=2", "infer.batch_size=1", "infer.sw_batch_size=1",
                         *sets])
    lines = []
    T.train(job, data / "training_data", data / "validation_data", out, progress=False, log=lines.append)
    weights = load_checkpoint(out / "checkpoints" / "last.pt")["model"]
    metrics = [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "samples_per_s")}
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    return lines, weights, metrics


def _same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_host_and_mapped_splits_train_the_same_weights_as_resident_ones(mixed_data, tmp_path):
    resident_log, resident, resident_metrics = _train(mixed_data, tmp_path / "resident")
    host_log, host, host_metrics = _train(mixed_data, tmp_path / "host", FORCE_HOST)
    mapped_log, mapped, mapped_metrics = _train(mixed_data, tmp_path / "mapped", FORCE_HOST, FORCE_MAPPED)

    # the choice, once each, in the training log
    assert [line for line in resident_log if line.startswith("data: ")] == [
        f"data: resident on cpu ({resident_log_size(resident_log)}; host memory)"]
    assert [line for line in host_log if line.startswith("data: ")] == [
        f"data: host memory, {resident_log_size(resident_log)} (more than the device's 1e-09 GB for data; batches "
        f"copied to the device)"]
    [line] = [line for line in mapped_log if line.startswith("data: ")]
    assert line.startswith(f"data: memory-mapped .npy files in {tmp_path / 'mapped' / MAPPED / 'rank0'}, ")

    _same_weights(resident, host)
    _same_weights(resident, mapped)
    assert host_metrics == resident_metrics == mapped_metrics  # losses and validation Dice too
    assert not (tmp_path / "mapped" / MAPPED).exists()  # the mapped copy goes when training ends


def test_what_a_killed_attempt_mapped_goes_whatever_the_next_attempt_places(mixed_data, tmp_path):
    stale = tmp_path / "run" / MAPPED / "rank0" / "training"
    stale.mkdir(parents=True)
    (stale / "images.npy").write_bytes(b"left by kill -9")
    _train(mixed_data, tmp_path / "run")  # resident
    assert not (tmp_path / "run" / MAPPED).exists()


def resident_log_size(log):
    [line] = [line for line in log if line.startswith("data: resident")]
    return line[len("data: resident on cpu (") :].split(";")[0]


def test_a_host_run_stopped_mid_epoch_and_resumed_resident_trains_the_resident_runs_weights(mixed_data, tmp_path,
                                                                                             monkeypatch):
    _, resident, _ = _train(mixed_data, tmp_path / "resident")
    real, calls = T.train_one_epoch, []

    def stopped_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            kwargs["stop"] = lambda: True  # the scheduler's warning, after epoch 2's first step
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "train_one_epoch", stopped_in_epoch_2)
    with pytest.raises(T.Preempted):
        _train(mixed_data, tmp_path / "host", FORCE_HOST)
    assert load_checkpoint(tmp_path / "host" / "checkpoints" / "last.pt")["partial"]["step"] == 1
    monkeypatch.setattr(T, "train_one_epoch", real)
    # resumed with its data on the device: where the data lives may change between attempts, the weights do not
    job = load_job(JOB, [*TINY, "train.epochs=2", "train.batch_size=2", "infer.batch_size=1", "infer.sw_batch_size=1"])
    T.train(job, mixed_data / "training_data", mixed_data / "validation_data", tmp_path / "host", resume=True,
            progress=False, log=lambda *a: None)
    _same_weights(resident, load_checkpoint(tmp_path / "host" / "checkpoints" / "last.pt")["model"])


@pytest.mark.parametrize("world", [1, 2])
def test_host_batches_crop_what_the_resident_split_crops(mixed_data, world):
    images, labels, sizes = load_split(mixed_data / "training_data", 4).stacked(min_size=(32, 32))
    order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(3))
    batch, steps = 2, -(-len(sizes) // (2 * world))
    for rank in range(world):
        ranks = Ranks(rank=rank, world=world, local_rank=rank, local_world=world)
        host = HostBatches((images, labels, sizes), order, lambda o, s: rank_batch(o, s, batch, ranks)[0], steps)
        resident_rng, host_rng = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        for step in range(steps):
            index, _ = rank_batch(order, step, batch, ranks)
            want = crop_batch(images, labels, sizes, index, (32, 32), resident_rng)
            got = crop_batch(*host(step), (32, 32), host_rng)
            assert all(torch.equal(a, b) for a, b in zip(want, got)), (rank, step)


def test_splits_stay_on_the_device_while_they_fit_its_cap(tmp_path):
    cpu = torch.device("cpu")
    assert place(10**9, cpu, 0.0, 0.0, tmp_path).where == "device"  # no cap: the CPU trains from host memory
    assert place(10**9, cpu, 1.0, 0.0, tmp_path).where == "device"
    assert place(10**9 + 1, cpu, 1.0, 0.0, tmp_path).where == "host"
    assert place(10**9 + 1, cpu, 1.0, 1.0, tmp_path).where == "mapped"
    assert place(10**9 + 1, cpu, 1.0, 1.0, tmp_path, rank=1).folder == tmp_path / MAPPED / "rank1"


@pytest.mark.parametrize("where", ["host", "mapped"])
def test_off_the_device_the_slices_are_held_once(mixed_data, tmp_path, where):
    train_split = load_split(mixed_data / "training_data", 4)
    val_split = load_split(mixed_data / "validation_data", 4)
    read = [a.copy() for a in train_split.images + train_split.labels + val_split.images + val_split.labels]
    placement = Placement(where, "", tmp_path / where)
    images, labels, _ = training_tensors(train_split, placement, torch.device("cpu"), (32, 32))
    groups = validation_groups(val_split, placement, torch.device("cpu"), 2)
    assert all(np.shares_memory(a, images.numpy()) for a in train_split.images)
    assert all(np.shares_memory(a, labels.numpy()) for a in train_split.labels)
    assert sum(np.shares_memory(a, g[0].numpy()) for a in val_split.images for g in groups) == len(VAL_SHAPES)
    now = train_split.images + train_split.labels + val_split.images + val_split.labels
    assert all(np.array_equal(a, b) for a, b in zip(now, read))
    assert [len(g[0]) for g in groups] == [2, 1, 1]  # 3 slices of one shape in chunks of 2, 1 of another
    assert (tmp_path / where / "training" / "images.npy").is_file() == (where == "mapped")


@pytest.mark.slow
@pytest.mark.parametrize("where", [[FORCE_HOST], [FORCE_HOST, FORCE_MAPPED]], ids=["host", "mapped"])
def test_two_ranks_with_their_data_off_the_device_train_the_resident_ranks_weights(data8, tmp_path, where):
    sets = [*TINY, "train.epochs=2", "train.batch_size=1"]
    train_procs(data8, tmp_path / "resident", *sets, procs=2)
    out = train_procs(data8, tmp_path / "off", *sets, *where, procs=2)
    _same_weights(ddp_weights(tmp_path / "resident"), ddp_weights(tmp_path / "off"))
    assert out.count("data: ") == 1  # rank 0 alone says where
    assert not (tmp_path / "off" / MAPPED).exists()  # each rank's mapped copy is gone


def test_loading_puts_slices_beyond_the_host_room_in_files_as_it_reads_them(tmp_path):
    """Data larger than the host's memory for data: `load_splits` keeps slices in memory while a Spill has room and
    writes the rest of that split to files as it reads them, so memory stays bounded; the slices are the same."""
    import tracemalloc

    from hpcseg.data import DataError, Spill, load_splits

    rng = np.random.default_rng(0)
    for k in range(40):  # 256 KB of float32 image each: 10 MB of images in all
        save_slice(tmp_path / "data" / "training_data", f"s{k:02d}", rng.random((256, 256)), np.ones((256, 256)))
    for k in range(2):
        save_slice(tmp_path / "data" / "validation_data", f"v{k}", rng.random((64, 64)), np.zeros((64, 64)))
    folders = [tmp_path / "data" / "training_data", tmp_path / "data" / "validation_data"]

    def load(spill):
        tracemalloc.start()
        try:
            splits = load_splits(folders, 4, spill)
            return splits, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    held, peak_held = load(Spill(tmp_path / "roomy", 1e9))
    assert not (tmp_path / "roomy").exists()
    spill = Spill(tmp_path / "spill", 1e6)  # room for 3 slices of the first split
    spilled, peak_spilled = load(spill)
    assert spill.spilled and peak_held > 10e6 > 3e6 > peak_spilled, (peak_held, peak_spilled)
    assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == ["split0-images.raw", "split0-labels.raw"]
    for a, b in zip(held, spilled):
        assert a.ids == b.ids
        for x, y in [*zip(a.images, b.images), *zip(a.labels, b.labels)]:
            assert x.dtype == y.dtype and np.array_equal(x, y)
    assert all(isinstance(image.base, np.memmap) for image in spilled[0].images)
    assert not any(isinstance(image.base, np.memmap) for image in spilled[1].images)  # it fitted what was left
    # a bad file anywhere: one DataError, and nothing spilled stays behind
    (folders[1] / "v1_T1w.npy").write_bytes(b"junk")
    with pytest.raises(DataError, match="v1_T1w.npy: cannot read image"):
        load_splits(folders, 4, Spill(tmp_path / "bad", 1e6))
    assert not (tmp_path / "bad").exists()
