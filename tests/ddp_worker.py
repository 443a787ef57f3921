"""One rank of the DistributedDataParallel test in test_ecosystem.py (not a test module itself).

    python tests/ddp_worker.py RANK WORLD_SIZE PORT OUT_FILE

trains the small 3D torch_convt model below with DDP (gloo, 127.0.0.1:PORT) on its slice of the global batch
and saves the final state_dict to OUT_FILE. test_ecosystem.py imports the same functions to train the
single-process reference on the whole batch.
"""
import datetime
import os
import sys

import torch
import torch.nn.functional as F

import torch_convt

GLOBAL_BATCH = 4
STEPS = 3
LEARNING_RATE = 0.1


def build_model():
    """ConvTranspose3d up, Conv3d down, in float64 (so that DDP's gradient averaging and the single-process
    gradient agree to rounding), with the same initial weights in every process."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch_convt.ConvTranspose3d(2, 3, 3, stride=2, padding=1, output_padding=1),
        torch.nn.Tanh(),
        torch_convt.Conv3d(3, 2, 3, stride=2, padding=1),
    ).double()


def global_batch():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(GLOBAL_BATCH, 2, 3, 4, 3, generator=generator, dtype=torch.float64)
    targets = torch.randn(GLOBAL_BATCH, 2, 3, 4, 3, generator=generator, dtype=torch.float64)
    return inputs, targets


def train(model, inputs, targets):
    """STEPS of plain SGD on the mean squared error over `inputs` (the mean over the global batch is the
    average of the per-rank means, which is what DDP's gradient averaging computes)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    for _ in range(STEPS):
        optimizer.zero_grad()
        F.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def main(rank, world_size, port, out_file):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=30))
    try:
        model = DistributedDataParallel(build_model())
        inputs, targets = global_batch()
        shard = GLOBAL_BATCH // world_size
        local = slice(rank * shard, (rank + 1) * shard)
        train(model, inputs[local], targets[local])
        torch.save(model.module.state_dict(), out_file)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    # Leave without the interpreter's teardown: about one exit in 30, gloo's threads were still being torn down
    # at interpreter exit and aborted the process ("terminate called without an active exception") after it had
    # saved its result and destroyed its process group.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
