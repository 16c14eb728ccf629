"""The few places where several training processes (DDP / FSDP / DeepSpeed through accelerate) must agree."""

from __future__ import annotations

import torch


def make_accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def gathered_state_dict(accelerator, wrapped) -> dict | None:
    """Full weights gathered from every process under FSDP / DeepSpeed (None when each process holds them all)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return None
    sd = accelerator.get_state_dict(wrapped)
    return {k.removeprefix("model."): v for k, v in sd.items()} if sd is not None else None


def any_process(accelerator, flag: bool) -> bool:
    """True when `flag` is set on any process (a signal reaches processes at different times: stop together)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)
