"""The collectives of one training step, over `accelerate` (gloo on CPUs, NCCL on GPUs).

Every rank calls every method in the same order whatever its local work (a rank whose groups were
all skipped contributes zeros), so no collective is ever left waiting. With one process each method
is the identity on the local values.
"""
from __future__ import annotations

import math

import torch


class Collectives:
    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.world = accelerator.num_processes

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (float64 on the CPU)."""
        local = values.detach().to(torch.float64)
        if self.world == 1:
            return local.cpu()
        return self.accelerator.reduce(local.to(self.accelerator.device), reduction="sum").cpu()

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """`[world · S, F]` float64 from every rank's `[S, F]` rows (S equal on all ranks), rank order."""
        local = rows.detach().to(torch.float64)
        if self.world == 1:
            return local.cpu()
        return self.accelerator.gather(local.to(self.accelerator.device)).cpu()

    def mean_std(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(mean, population std, count) of `values` pooled over all ranks."""
        v = values.detach().to(torch.float64).reshape(-1)
        count, total, sq = self.sum(torch.stack([v.new_tensor(float(v.numel())), v.sum(), v.square().sum()])).tolist()
        mean = total / max(count, 1.0)
        var = max(sq / max(count, 1.0) - mean * mean, 0.0)
        return torch.tensor(mean), torch.tensor(math.sqrt(var)), int(round(count))

    def max_int(self, value: int) -> int:
        """The largest of one int per rank (e.g. a pending stop signal, 0 for none)."""
        return int(self.gather(torch.tensor([[float(value)]])).max())




def make_accelerator(config, output_dir):
    """The `accelerate.Accelerator` of a run: CPU when asked (or without CUDA), the config's trackers,
    tracker logs under `output_dir/logs`."""
    from pathlib import Path

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from .tracking import check_trackers

    output_dir = Path(output_dir)
    trackers = config.trackers()
    check_trackers(trackers)
    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs"))
    return Accelerator(cpu=cpu, log_with=trackers or None, project_config=project)


__all__ = ["Collectives", "make_accelerator"]
