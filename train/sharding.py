"""Data parallelism: one `data` mesh axis over every device of every process.

The batch is split along its first dimension (`batch_sharding`); the train state and the base params are
replicated (`replicated`). The train step (train.step) runs each device's rows under `jax.shard_map` and sums the
gradients over `AXIS` once per step; elsewhere `jax.jit` with these committed inputs runs SPMD.

Multi-host: start one process per host (or per GPU) and call `init_distributed` before anything touches the
devices; each process loads its own samples (`SFTLoader` slices by process index) and `put_batch` assembles the
global array from the per-process pieces.
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
HEARTBEAT_S = 30


def init_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                     process_id: Optional[int] = None) -> bool:
    """jax.distributed.initialize when several processes are asked for (flags, or the JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables). Returns True when it initialised."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes or _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if not coordinator and not (num_processes and num_processes > 1):
        return False
    if num_processes is None or process_id is None or not coordinator:
        raise ValueError("multi-process training needs all of --coordinator HOST:PORT, --num_processes N and "
                         f"--process_id I (got coordinator={coordinator!r}, num_processes={num_processes!r}, "
                         f"process_id={process_id!r})")
    # A process that stops answering is declared dead after HEARTBEAT_S (JAX's default is 100 s).
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=HEARTBEAT_S)
    return True


def cpu_device_count(requested: int, rows: int, cores: Optional[int] = None, cap: int = 8) -> int:
    """How many XLA devices to split this host's CPU into: `requested` if > 0, else (auto) one per core, at most
    `cap` and at most `rows` (this process's samples per step: a device with no row to run would only idle)."""
    if requested > 0:
        return requested
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, cap, rows))


def configure_cpu_devices(requested: int, global_rows: int, num_processes: Optional[int] = None) -> Optional[int]:
    """Split the host CPU into several XLA devices (data parallel over its cores); call before JAX starts.
    global_rows: the global batch (samples); each process's share (num_processes or JAX_NUM_PROCESSES) counts.

    Why (measured, not derived: docs/benchmarks.md): one XLA:CPU device leaves part of the cores idle during a
    LoRA step, while one device per core, each running its share of the rows, keeps them all busy. Only the CPU
    backend is affected: on a GPU the mesh uses the GPUs. Returns the count set, or None when left alone (XLA_FLAGS /
    JAX_NUM_CPU_DEVICES already choose it, one device was asked for, or JAX's backends are already running:
    e.g. a second main() call).
    """
    if ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
            or os.environ.get("JAX_NUM_CPU_DEVICES")):
        return None
    procs = num_processes or _env_int("JAX_NUM_PROCESSES") or 1
    n = cpu_device_count(requested, max(1, global_rows // procs))
    if n <= 1:
        return None
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already initialised in this process: keep its devices
        return None
    return n


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows [B, ...] split over `data`; chunked rows [C, P, ...] (train.step.prepare_batch) split on P."""
    return NamedSharding(mesh, P(AXIS) if ndim < 3 else P(None, AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
    """Place a host pytree (identical on every process) on every device."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)


def put_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's rows [B_local, ...] (or chunks [C, P_local, ...]) -> global arrays with the rows of every
    process, in process order, split over `data`."""
    if jax.process_count() == 1:
        return {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), np.asarray(v))
            for k, v in batch.items()}


def agree_max(values) -> np.ndarray:
    """Element-wise max of small int vectors over all processes (so every host picks the same static shapes)."""
    values = np.asarray(values, np.int64)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values)).max(0)
