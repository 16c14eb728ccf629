"""The few places where several training processes (DDP / FSDP / DeepSpeed through accelerate) must agree.

What has run end to end in tunelab's tests: one process, DDP on one machine (`--num-processes N`, gloo) and DDP
over two node ranks (torchrun `--nnodes 2`). FSDP and DeepSpeed ZeRO have not: `refuse_unverified_sharding`
stops them before anything is loaded or written, and `bench/device_sharding_check.sh` is the check that would
lift the refusal on a machine with GPUs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from tunelab.errors import TunelabError

# Set by bench/device_sharding_check.sh to run the unverified path it checks; users may set it at their own risk.
UNVERIFIED_SHARDING_ENV = "TUNELAB_UNVERIFIED_SHARDING"
SHARDING_CHECK = "bench/device_sharding_check.sh"


def make_accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def requested_sharding() -> str | None:
    """What `accelerate launch` was asked for ("FSDP2", "DeepSpeed ZeRO-3", ...), None for DDP or one process."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return f"FSDP{os.environ.get('FSDP_VERSION', '1')}"  # accelerate's own default is FSDP1
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return f"DeepSpeed ZeRO-{_zero_stage()}"
    return None


def _zero_stage() -> str:
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage:
        return stage
    try:  # with a json file accelerate passes only the file: the stage is in it
        ds = json.loads(Path(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read_text())
        return str(ds["zero_optimization"]["stage"])
    except (KeyError, OSError, ValueError, TypeError):
        return "?"


def refuse_unverified_sharding(cuda: bool | None = None) -> None:
    """Stop FSDP / DeepSpeed before anything is loaded or written: on CPU accelerate cannot run them, on GPUs
    tunelab has not verified them. Called first thing in `train`, on every process, so all stop alike."""
    kind = requested_sharding()
    if kind is None:
        return
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        import accelerate

        raise TunelabError(
            f"{kind} was requested (accelerate launch with an FSDP/DeepSpeed config), but accelerate "
            f"{accelerate.__version__} runs FSDP and DeepSpeed only on GPUs: on this CPU-only machine it would "
            "silently train plain DDP instead (a whole copy of the model and optimiser in every process). Train with "
            "DDP knowingly: tunelab train --num-processes N --config ... output.run_name=NAME")
    if os.environ.get(UNVERIFIED_SHARDING_ENV) == "1":
        return
    raise TunelabError(
        f"{kind} is not verified with tunelab yet: no test has run it end to end (checkpoint-best/-final saved "
        "from gathered weights, eval and generation metrics on every process without a hang, the adapter equal to "
        "a DDP run's). Use DDP meanwhile (examples/accelerate/ddp.yaml): a LoRA/QLoRA run needs only the base model "
        f"to fit one GPU. {SHARDING_CHECK} runs that check on a machine with GPUs; to try {kind} anyway, at your "
        f"own risk, set {UNVERIFIED_SHARDING_ENV}=1")


def params_sharded(accelerator) -> bool:
    """True when each process holds only a shard of the weights, so every forward pass needs every process."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.distributed_type == DistributedType.DEEPSPEED and getattr(plugin, "zero_stage", 0) == 3


def _worst_on_any_process(code: int) -> int:
    """The largest `code` over the processes (a barrier too); no accelerator at hand, so torch.distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return code
    nccl = torch.distributed.get_backend() == "nccl"
    t = torch.tensor(float(code), device=f"cuda:{torch.cuda.current_device()}" if nccl else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


_OK, _INTERRUPTED, _FAILED = 0, 1, 2


@contextmanager
def main_process_work() -> Iterator[None]:
    """Work the main process does while the others wait (the block then ends in a barrier); with sharded weights
    the others take part. When a process fails or is interrupted, every process stops, as interrupted (exit 130)
    or failed, the one it happened to with its own error, instead of the others crashing in the barrier."""
    try:
        yield
    except KeyboardInterrupt:
        _worst_on_any_process(_INTERRUPTED)
        raise
    except BaseException:
        _worst_on_any_process(_FAILED)
        raise
    worst = _worst_on_any_process(_OK)
    if worst == _INTERRUPTED:
        raise KeyboardInterrupt  # the run ends as interrupted, with the resume command
    if worst == _FAILED:
        raise TunelabError("stopped because another process failed: see its error")


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


def require_shared_run_folder(accelerator, path: Path) -> None:
    """Every process reads the data the main process prepared into the run folder: on several machines that
    folder must be on storage they all mount. Checked by all together, so all stop together (no hang)."""
    if accelerator.num_processes == 1:
        return
    if any_process(accelerator, not path.is_dir()):
        raise TunelabError(
            f"the run folder {path} is not visible to every process: with several machines output.dir must be on "
            "storage every machine mounts at the same path (NFS, a shared disk); see docs/distributed.md")


def require_run_name(cfg, resume, processes: int) -> None:
    """Several processes name one run: a time-stamped default name would differ between machines."""
    if processes > 1 and not cfg.output.run_name and not resume:
        raise TunelabError("with several processes set output.run_name so every process writes the same run")


def torchrun(argv: list[str]) -> int:
    """`torchrun ARGV` (torch.distributed.run's own parser and launcher), returning the first failed worker's exit
    code instead of torchrun's ChildFailedError traceback: the worker has already printed its error."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code  # killed by a signal: the shell's 128 + signal number
    return 0
