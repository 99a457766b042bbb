"""torch.distributed set-up: who this process is, the process group, and cross-rank sums.

Two ways in, one result: ``torchrun`` sets RANK/WORLD_SIZE/LOCAL_RANK in the environment;
the ModelZoo ``--multiprocessing-distributed --device_list`` way spawns one process per
listed device with :func:`spawn`, which sets the same variables before the worker starts.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

# torch's SyncBatchNorm supports CUDA, XPU and "PrivateUse1" devices (torch_npu's NPU) only.
SYNC_BN_DEVICES = ("cuda", "npu", "xpu")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment(env: dict[str, str] | None = None) -> DistInfo:
    """The rank layout torchrun (or :func:`spawn`) put in the environment."""
    env = os.environ if env is None else env
    world_size = int(env.get("WORLD_SIZE", "1"))
    return DistInfo(rank=int(env.get("RANK", "0")), world_size=world_size,
                    local_rank=int(env.get("LOCAL_RANK", "0")),
                    local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world_size))))


def init_process_group(info: DistInfo, backend: str, device: torch.device, timeout_s: int,
                       init_method: str | None = None) -> None:
    """Join the job's process group (no-op for a single process).

    The timeout bounds every collective: if a peer dies, the others fail within it
    instead of hanging (torchrun usually ends them sooner).
    """
    if not info.enabled:
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    options: dict[str, Any] = dict(backend=backend, rank=info.rank, world_size=info.world_size, timeout=timeout)
    store = None if init_method else _restart_store(info, timeout)
    if store is not None:
        options["store"] = store
    else:
        options["init_method"] = init_method or "env://"
    if backend == "nccl" and device.index is not None:
        options["device_id"] = device  # binds the communicator eagerly to this device
    dist.init_process_group(**options)


def _restart_store(info: DistInfo, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun: the agent's store, with keys of this restart attempt only.

    torchrun keeps one store for the whole job, and its workers reuse it (static and
    c10d rendezvous alike) without separating restart attempts. After ``--max-restarts``
    restarts the workers, the new process group would read the dead workers' addresses
    left there and hang or fail to connect. Older torch prefixed the keys with the
    attempt number itself; this does the same. None outside torchrun (plain env://).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"/worker/attempt_{attempt}", store)


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """All-reduce a tensor of counts or sums (returns it unchanged on one process)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank the buffers (BatchNorm running statistics) of rank ``src``.

    DDP broadcasts rank 0's buffers before each training forward, but that forward then
    updates every rank's copy from its own batch. Validating without this would use
    different statistics on each rank, and not those rank 0 saves in the checkpoint.
    """
    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=src)


def check_sync_bn(device_type: str) -> None:
    """Refuse ``--sync-bn`` where torch's SyncBatchNorm cannot run, naming the reason."""
    if device_type not in SYNC_BN_DEVICES:
        raise ValueError(f"--sync-bn needs GPUs or NPUs: torch's SyncBatchNorm has no {device_type} "
                         f"implementation (it runs on {', '.join(SYNC_BN_DEVICES)}); leave --sync-bn out "
                         f"to normalise each device's batch on its own")


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s value on every rank (e.g. the resume path rank 0 chose)."""
    if dist.is_available() and dist.is_initialized():
        holder = [value]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]
    return value


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def spawn(worker: Callable[..., None], device_ids: list[int], nodes: int, node_rank: int,
          master_addr: str, master_port: int, dist_url: str | None, *args: Any) -> None:
    """ModelZoo mode: one process per id in ``device_ids`` on this node, torchrun-style env."""
    master_addr, master_port = _rendezvous_address(dist_url, master_addr, master_port)
    per_node = len(device_ids)
    torch.multiprocessing.spawn(
        _spawned_entry, nprocs=per_node, join=True,
        args=(worker, device_ids, per_node, nodes, node_rank, master_addr, master_port, args))


def _spawned_entry(local_rank: int, worker: Callable[..., None], device_ids: list[int], per_node: int,
                   nodes: int, node_rank: int, master_addr: str, master_port: int,
                   args: tuple[Any, ...]) -> None:
    os.environ.update({
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
        "WORLD_SIZE": str(per_node * nodes), "RANK": str(node_rank * per_node + local_rank),
        "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(per_node),
    })
    worker(*args, device_index=device_ids[local_rank])


def _rendezvous_address(dist_url: str | None, addr: str, port: int) -> tuple[str, int]:
    if not dist_url:
        return addr, port
    if not dist_url.startswith("tcp://") or ":" not in dist_url[len("tcp://"):]:
        raise ValueError(f"--dist-url must look like tcp://HOST:PORT, got {dist_url!r}")
    host, _, port_text = dist_url[len("tcp://"):].rpartition(":")
    return host, int(port_text)
