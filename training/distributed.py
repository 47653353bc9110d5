"""The trainers on torch.distributed: `torchrun --standalone --nproc-per-node N -m training.<name>`
starts N copies of a command line; each reads its rank from the environment torchrun sets, takes
its share of every global batch, and DDP averages the gradients (FSDP shards the weights instead,
with `--fsdp`). Without torchrun the world is one process and nothing here does anything.

What the trainers rely on:
- a batch's share is a contiguous block of it, so gathering the shares in rank order gives back
  the batch in order;
- a share's loss is weighted by `weight`, so that DDP's average over ranks is the mean over the
  whole batch even where the shares are uneven (a rank with no item computes a weight-0 loss on
  one, as DDP needs every rank to run the backward pass);
- only rank 0 writes files and draws the progress bar.
"""

import datetime
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import transformers
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

Item = TypeVar("Item")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def bounds(self, count: int) -> tuple[int, int]:
        return self.rank * count // self.size, (self.rank + 1) * count // self.size

    def share(self, items: Sequence[Item]) -> list[Item]:
        """This rank's contiguous block of `items` (the blocks differ in length by one at most)."""
        first, last = self.bounds(len(items))
        return list(items[first:last])

    def share_or_one(self, items: Sequence[Item]) -> tuple[list[Item], float]:
        """This rank's share and its loss weight; an empty share is the first item, weighted 0."""
        mine = self.share(items)
        return (mine, self.weight(len(mine), len(items))) if mine else (list(items[:1]), 0.0)

    def weight(self, mine: int, total: int) -> float:
        """The factor that makes the mean over ranks of the share means the mean over all items."""
        return mine * self.size / total

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (a new tensor; the argument is left alone)."""
        tensor = tensor.detach().clone()
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def mean(self, row: dict[str, Any], weight: float = 1.0) -> dict[str, Any]:
        """Each figure's mean over the ranks, weighted by `weight` (the items of this rank's figures),
        over those that have it (None where none has): a metrics row for rank 0 to write. Every
        rank's row has the same keys; whole numbers (the step) are the same on all."""
        if self.size == 1:
            return row
        keys = [key for key, value in row.items() if value is None or isinstance(value, float)]
        values = torch.tensor(
            [float("nan") if row[key] is None else float(row[key]) for key in keys], dtype=torch.float64
        )
        weights = torch.where(values.isnan(), 0.0, weight)
        totals, counts = self.sum(torch.where(values.isnan(), 0.0, values) * weights), self.sum(weights)
        means = [float(total / count) if count else None for total, count in zip(totals, counts, strict=True)]
        return {**row, **dict(zip(keys, means, strict=True))}

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor, concatenated on the first dimension in rank order (their first
        dimensions may differ; the others must match)."""
        if self.size == 1:
            return tensor
        sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
        largest = int(max(size.item() for size in sizes))
        padded = torch.zeros((largest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[: int(size.item())] for part, size in zip(parts, sizes, strict=True)])

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order."""
        if self.size == 1:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def check_in_step(self, module: torch.nn.Module) -> None:
        """Raise unless every rank holds the same weights: the end of a run checks that the
        gradients were averaged at every step, as a rank that trained on its share alone drifts."""
        if self.size == 1 or sharded(module):  # FSDP: each rank holds its own shards
            return
        with torch.no_grad():
            total = sum(
                (p.double().sum() + (p.double() ** 2).sum() for p in module.parameters()),
                torch.zeros((), dtype=torch.float64),
            )
        sums = self.gather(total.reshape(1).to(self.device)).tolist()
        if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
            raise RuntimeError(f"the ranks' weights differ at the end of the run (checksums {sums})")

    def wrap(self, module: torch.nn.Module, *, fsdp: bool = False) -> torch.nn.Module:
        """`module` for training. DDP over the ranks: the gradients averaged at each backward pass.
        With `fsdp`, FSDP2 instead: each Hugging Face model inside `module` sharded in place (its
        parameters, gradients and optimizer state split over the ranks, gathered block by block as
        the passes need them), and `module` itself returned. In a world of one: `module`."""
        if self.size == 1:
            return module
        if fsdp:
            for model in [m for m in module.modules() if isinstance(m, PreTrainedModel)]:
                if not sharded(model):
                    shard(model)
            return module
        device_ids = [self.local_rank] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    def state_dict(self, module: torch.nn.Module) -> dict[str, Any]:
        """`module.state_dict()`, whole even when FSDP shards it (then on rank 0 only: {} elsewhere)."""
        if not sharded(module):
            return module.state_dict()
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, module: torch.nn.Module, state: dict[str, Any]) -> None:
        """`module.load_state_dict(state)`; a sharded module takes its shards of rank 0's whole dict."""
        if not sharded(module):
            module.load_state_dict(state)
            return
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(module, state if self.main else {}, options=options)

    def optimizer_state_dict(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """`optimizer.state_dict()`, keyed by parameter index; whole and keyed by parameter name when
        FSDP shards `module` (on rank 0 only)."""
        if not sharded(module):
            return optimizer.state_dict()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(module, optimizer, options=options)

    def load_optimizer_state_dict(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """`optimizer.load_state_dict(state)`, from either kind of checkpoint: a run resumes with
        another count of ranks, sharded or not."""
        names = _parameter_names(module, optimizer)
        by_name = bool(state["state"]) and isinstance(next(iter(state["state"])), str)
        if not sharded(module):
            optimizer.load_state_dict(
                _renamed(state, {name: index for index, name in enumerate(names)}) if by_name else state
            )
            return
        state = state if by_name else _renamed(state, dict(enumerate(names)))
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(module, optimizer, state if self.main else {}, options=options)


def _parameter_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters, in its order (DDP's "module." prefix left out)."""
    names = {id(parameter): name.removeprefix("module.") for name, parameter in module.named_parameters()}
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]


def _renamed(state: dict[str, Any], keys: dict[Any, Any]) -> dict[str, Any]:
    groups = [{**group, "params": [keys[key] for key in group["params"]]} for group in state["param_groups"]]
    return {"state": {keys[key]: value for key, value in state["state"].items()}, "param_groups": groups}


def sharded(module: torch.nn.Module) -> bool:
    return any(isinstance(parameter, DTensor) for parameter in module.parameters())


def shard(model: PreTrainedModel) -> None:
    """FSDP2 on a Hugging Face model: a unit per transformer block, then (a model with a `score`
    head, which the trainers call apart from its body) the body and the head, then the whole."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    head = getattr(model, "score", None)
    if head is not None:
        fully_shard(model.base_model)
        fully_shard(head)
    fully_shard(model)


ALONE = World()  # a world of one: the default of the functions that take a world


def finish(summary: dict[str, Any]) -> None:
    """The end of a command line: rank 0 prints the run's summary (the only line a run prints),
    then every rank leaves the process group at once and exits on the spot. A rank that exits with
    the group still open, while rank 0 saves, can die in its own teardown ("terminate called
    without an active exception": SIGABRT), failing a run that trained to the end; and even after
    the group is gone, the interpreter's teardown of torch's native threads did so in about 1 of
    18 two-process runs on a loaded 2-core machine. Everything is saved by now: nothing is left to
    tear down but memory."""
    if world().main:
        print(json.dumps(summary))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def world() -> World:
    """The world torchrun started this process in (joined on first call), or a world of one.
    GPUs talk over NCCL, CPUs over gloo."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return ALONE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if rank:  # rank 0 speaks for the run
            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        # Loading a model on one rank can take minutes while the others wait at their first collective.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return World(rank=rank, size=size, local_rank=local_rank)
