"""Two ranks whose rank 0 stalls 4 s in its writes, for tests/test_ddp_timeouts.py; run as `torchrun --standalone
--nproc-per-node 2 ddp_slow_leader.py` with HPCSEG_DIST_TIMEOUT_S=2. The other rank waits for it in
Group.wait_for_leader (the write timeout), then the same stall in a training collective (Group.barrier) fails."""

import time

import torch

from hpcseg.distributed import DistributedError, process_group, ranks_from_env


def main() -> None:
    ranks = ranks_from_env()
    with process_group(ranks, torch.device("cpu")) as group:
        if ranks.leader:
            time.sleep(4)  # a checkpoint written to a stalled network scratch
        group.wait_for_leader()
        print(f"rank {ranks.rank} waited for the leader's writes", flush=True)
        if ranks.leader:
            time.sleep(4)
        try:
            group.barrier()
            print(f"rank {ranks.rank} passed the barrier", flush=True)
        except DistributedError as err:
            print(f"rank {ranks.rank} failed: {err}", flush=True)


if __name__ == "__main__":
    main()
