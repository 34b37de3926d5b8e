"""Row-sharded training on torch.distributed (issue 17).

``env``: who am I (rank, world size, device, process group), read from torchrun's or Slurm's
environment. ``shard``: which rows of a ``(T, N, d)`` tensor this rank holds, and the collectives
that move rows between ranks. Models, GoldstoneGD and the trainer build on these two only.
"""

from goldstone_cli.distributed.env import Dist, LaunchEnv, init_distributed, launch_env
from goldstone_cli.distributed.shard import RowShard

__all__ = ["Dist", "LaunchEnv", "RowShard", "init_distributed", "launch_env"]
