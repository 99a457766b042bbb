"""torch.distributed set-up: where this process sits, the process group, and collectives.

Two ways in, one result: ``torchrun`` sets RANK/WORLD_SIZE/LOCAL_RANK in the environment;
the ModelZoo ``--multiprocessing-distributed`` way spawns one process per device of this
node with :func:`spawn`, which sets the same variables before the worker starts.

Names: ``Topology`` counts *processes* (torch's rank and world size). The command line's
``--world-size``/``--rank`` count *nodes*, as in the ModelZoo scripts; they only reach
:func:`spawn`, as ``nodes`` and ``node_rank``.

Every collective of the project goes through this module, which checks the tensor's dtype
against what the backend accepts (the device's capability row). HCCL rejects float64, bool
and uint8; ``STRICT_COLLECTIVES=hccl`` applies HCCL's rule on any backend, so the gloo tests
catch such a reduction as an NPU run would.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from models.errors import UserError
from training.device import HCCL_DTYPES

STRICT_ENV = "STRICT_COLLECTIVES"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 29500


class DistributedError(UserError):
    """Options that cannot form a process group (bad URL, backend for another device...)."""


class CollectiveDtypeError(TypeError):
    """A collective on a dtype the backend does not accept: a bug in the caller."""


@dataclass(frozen=True)
class Topology:
    """Where this process sits in the job. Ranks and counts are of processes, not nodes."""

    process_rank: int = 0
    process_count: int = 1
    local_rank: int = 0
    local_process_count: int = 1

    @property
    def distributed(self) -> bool:
        return self.process_count > 1

    @property
    def is_main(self) -> bool:
        return self.process_rank == 0


def _variable(env: dict[str, str], name: str, low: int, high: int | None = None) -> int | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        limits = f"{low}..{high}" if high is not None else f">= {low}"
        raise DistributedError(f"{name}={text!r} in the environment is not a whole number {limits}")
    return value


_LAUNCH_HINT = "start the processes with torchrun (torchrun --nproc_per_node N main.py ...), which sets them all"


def from_environment(env: dict[str, str] | None = None) -> Topology:
    """The layout torchrun (or :func:`spawn`) put in the environment.

    A partial or inconsistent one (a cluster's variables without a launcher: WORLD_SIZE
    without RANK, a RANK outside the world, no MASTER_ADDR) is a ``DistributedError`` at
    once, instead of a process that waits for peers that never come.
    """
    env = os.environ if env is None else env
    count = _variable(env, "WORLD_SIZE", 1)
    rank = _variable(env, "RANK", 0)
    if count is not None and count > 1 and rank is None:
        raise DistributedError(f"WORLD_SIZE={count} is set but RANK is not: {_LAUNCH_HINT}, or unset WORLD_SIZE "
                               f"to train in one process")
    if rank and count is None:
        raise DistributedError(f"RANK={rank} is set but WORLD_SIZE is not: {_LAUNCH_HINT}")
    count, rank = count or 1, rank or 0
    if rank >= count:
        raise DistributedError(f"RANK={rank} is outside 0..{count - 1} (WORLD_SIZE={count}): {_LAUNCH_HINT}")
    if count > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name, "").strip()]
        if missing:
            raise DistributedError(f"RANK={rank} and WORLD_SIZE={count} are set but {' and '.join(missing)} "
                                   f"{'is' if len(missing) == 1 else 'are'} not, so the processes cannot find each "
                                   f"other: {_LAUNCH_HINT}, or set MASTER_ADDR and MASTER_PORT to rank 0's machine")
        _variable(env, "MASTER_PORT", 1, 65535)
    local_count = _variable(env, "LOCAL_WORLD_SIZE", 1) or count
    local_rank = _variable(env, "LOCAL_RANK", 0) or 0
    if local_rank >= local_count:
        raise DistributedError(f"LOCAL_RANK={local_rank} is outside 0..{local_count - 1} "
                               f"(LOCAL_WORLD_SIZE={local_count}): {_LAUNCH_HINT}")
    return Topology(process_rank=rank, process_count=count, local_rank=local_rank, local_process_count=local_count)


# -- the process group ------------------------------------------------------------------------

@dataclass
class _Group:
    allowed_dtypes: frozenset | None = None
    control: Any = None  # a gloo group for host-side agreement (stop, save), or None


_group = _Group()


def _allowed_dtypes(device_allows: frozenset | None) -> frozenset | None:
    if os.environ.get(STRICT_ENV, "").lower() == "hccl":
        return HCCL_DTYPES if device_allows is None else device_allows & HCCL_DTYPES
    return device_allows


def init_process_group(topology: Topology, backend: str, device: torch.device, timeout_s: int,
                       allowed_dtypes: frozenset | None = None) -> None:
    """Join the job's process group (a no-op for a single process).

    The timeout bounds every collective: if a peer dies, the others fail within it
    instead of hanging (torchrun usually ends them sooner).
    """
    _group.allowed_dtypes = _allowed_dtypes(allowed_dtypes)
    if not topology.distributed:
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    options: dict[str, Any] = dict(backend=backend, rank=topology.process_rank,
                                   world_size=topology.process_count, timeout=timeout)
    store = _restart_store(topology, timeout)
    if store is not None:
        options["store"] = store
    else:
        options["init_method"] = "env://"
    if backend == "nccl" and device.index is not None:
        options["device_id"] = device  # binds the communicator eagerly to this device
    try:
        dist.init_process_group(**options)
        # Host-side flags (stop, save now) are agreed on a CPU group: no device sync per step.
        _group.control = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    except (RuntimeError, ValueError) as error:  # torch's DistError family, and the store's connection errors
        raise DistributedError(_no_group(topology, timeout_s, error)) from None


def _no_group(topology: Topology, timeout_s: int, error: Exception) -> str:
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return (f"rank {topology.process_rank}: the {topology.process_count} processes of the job did not form a "
            f"process group (--dist-timeout {timeout_s}s): {text}; check that every rank 0..{topology.process_count - 1} "
            f"was started and can reach {address}")


def _restart_store(topology: Topology, timeout: datetime.timedelta) -> dist.Store | None:
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
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), topology.process_count,
                              is_master=False, timeout=timeout)
    except (RuntimeError, ValueError) as error:
        raise DistributedError(_no_group(topology, int(timeout.total_seconds()), error)) from None
    return dist.PrefixStore(f"/worker/attempt_{attempt}", store)


def destroy_process_group() -> None:
    if _initialized():
        if dist.get_backend() == "gloo":
            # Seen with torch 2.3: gloo's destructor joins its worker thread while holding the
            # GIL, and that thread may still be releasing the last collective's tensors, which
            # needs the GIL: a deadlock at exit. A moment without the GIL lets it finish first
            # (a mitigation, not a guarantee).
            time.sleep(0.1)
        dist.destroy_process_group()
    _group.control = None


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


# -- collectives --------------------------------------------------------------------------

# What the backends say when a peer died or stopped answering (gloo, NCCL, HCCL, the store).
_LOST_PEER = re.compile(r"closed by peer|reset by peer|broken pipe|timed out|timeout|aborted|connection refused",
                        re.IGNORECASE)


@contextlib.contextmanager
def _peers(operation: str) -> Iterator[None]:
    """A collective that fails because another process is gone or stuck becomes one line (the
    cause is in that process's log, or it was killed); any other failure keeps its traceback."""
    try:
        yield
    except RuntimeError as error:
        text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        if not _LOST_PEER.search(text):
            raise
        text = re.sub(r"^\[[^\]]*\]\s*", "", text).split(" This is typically")[0]  # gloo's source location, advice
        raise DistributedError(f"{operation}: another process of the job is gone or stuck ({text}); its own log "
                               f"says why") from None


def check_collective_dtype(tensor: torch.Tensor, operation: str) -> None:
    """Raise CollectiveDtypeError when the backend would reject ``tensor``'s dtype."""
    allowed = _group.allowed_dtypes
    if allowed is not None and tensor.dtype not in allowed:
        names = ", ".join(sorted(str(dtype).replace("torch.", "") for dtype in allowed))
        raise CollectiveDtypeError(f"{operation} of a {str(tensor.dtype).replace('torch.', '')} tensor: "
                                   f"the backend accepts only {names}")


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """All-reduce a tensor of counts or sums (returned unchanged on one process)."""
    check_collective_dtype(values, "all_reduce")
    if _initialized():
        values = values.clone()
        with _peers("summing across processes"):
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank the buffers (BatchNorm running statistics) of rank ``src``.

    Each rank's training forward updates its own copy from its own batch. Validating
    without this would use different statistics on each rank, and not those rank 0 saves.
    """
    for buffer in module.buffers():
        check_collective_dtype(buffer, "broadcast")
        if _initialized():
            with _peers("sharing rank 0's BatchNorm statistics"):
                dist.broadcast(buffer, src=src)


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s value on every rank (e.g. the resume path rank 0 chose)."""
    if _initialized():
        holder = [value]
        with _peers("sharing a value of rank 0"):
            dist.broadcast_object_list(holder, src=src, group=_group.control)
        return holder[0]
    return value


def agree(flags: list[int]) -> list[int]:
    """The largest value of each flag over all ranks (host-side, on the CPU control group)."""
    if not _initialized():
        return list(flags)
    values = torch.tensor(flags, dtype=torch.int64)
    check_collective_dtype(values, "all_reduce")
    with _peers("agreeing with the other processes"):
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=_group.control)
    return [int(value) for value in values.tolist()]


def barrier() -> None:
    if _initialized():
        with _peers("waiting for the other processes"):
            dist.barrier(group=_group.control)


# -- the ModelZoo launcher: one process per device of this node ------------------------------

@dataclass(frozen=True)
class NodeLayout:
    """``--multiprocessing-distributed``: this node's devices and where the node sits."""

    device_ids: tuple[int, ...]
    nodes: int = 1
    node_rank: int = 0
    master_addr: str = DEFAULT_HOST
    master_port: int = DEFAULT_PORT

    @property
    def processes(self) -> int:
        return len(self.device_ids) * self.nodes


def rendezvous_address(dist_url: str | None, addr: str | None, port: int | None) -> tuple[str, int]:
    """Master host and port from ``--dist-url``, ``--addr`` and ``--port``.

    An explicit ``--addr`` names the host even when ``--dist-url`` is given: the ModelZoo
    scripts pass ``--addr=<master IP>`` with ``--dist-url tcp://127.0.0.1:50000`` and
    their NPU path reads the address from ``--addr``. The port is ``--port``, else the URL's.
    """
    url_host, url_port = None, None
    if dist_url and dist_url != "env://":
        if not dist_url.startswith("tcp://") or ":" not in dist_url[len("tcp://"):]:
            raise DistributedError(f"--dist-url must look like tcp://HOST:PORT or env://, got {dist_url!r}")
        url_host, _, port_text = dist_url[len("tcp://"):].rpartition(":")
        try:
            url_port = int(port_text)
        except ValueError:
            raise DistributedError(f"--dist-url has no port number: {dist_url!r}") from None
    elif dist_url == "env://":
        url_host = os.environ.get("MASTER_ADDR")
        url_port = int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT") else None
    return addr or url_host or DEFAULT_HOST, port or url_port or DEFAULT_PORT


def spawn(worker: Callable[..., int], layout: NodeLayout, *args: Any) -> torch.multiprocessing.ProcessContext:
    """Start one process per device of ``layout`` on this node, each with torchrun's environment;
    the caller joins them (``join()`` until it returns True)."""
    return torch.multiprocessing.start_processes(_spawned_entry, nprocs=len(layout.device_ids), join=False,
                                                 args=(worker, layout, args), start_method="spawn")


def set_process_environment(layout: NodeLayout, local_rank: int) -> None:
    """The variables torchrun would set for local process ``local_rank`` of ``layout``."""
    per_node = len(layout.device_ids)
    os.environ.update({
        "MASTER_ADDR": layout.master_addr, "MASTER_PORT": str(layout.master_port),
        "WORLD_SIZE": str(layout.processes), "RANK": str(layout.node_rank * per_node + local_rank),
        "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(per_node),
    })


def _spawned_entry(local_rank: int, worker: Callable[..., int], layout: NodeLayout, args: tuple[Any, ...]) -> None:
    set_process_environment(layout, local_rank)
    code = worker(*args, device_index=layout.device_ids[local_rank])
    if code:
        raise SystemExit(code)
