"""Which accelerators and CPU cores this host has, and which of them each replica gets.

Runs in the agent process. Owns no socket and starts nothing: pure functions and one small bookkeeping
class (`DeviceAllocator`), so placement on a host is testable without hardware. Never raises from
discovery (a host without NVML simply has no GPUs); allocation raises `ValueError` naming the knob to
change when a replica does not fit.

A replica's devices reach vLLM only through its environment:
- GPU replica: `CUDA_VISIBLE_DEVICES` lists its GPUs in NVML (PCI bus) order, with
  `CUDA_DEVICE_ORDER=PCI_BUS_ID` so CUDA numbers them the same way; its tensor-parallel size is the count.
- CPU replica: `VLLM_CPU_OMP_THREADS_BIND` pins its OpenMP threads to its own cores (without it every
  vLLM on the host binds to the same cores and throughput halves), `VLLM_CPU_KVCACHE_SPACE` (GiB) sizes
  its KV cache, and `CUDA_VISIBLE_DEVICES=""` keeps it off any GPU the host has.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import msgspec

from runtime.capacity import Demand, Host, demand_of, divide_cores, pick_cores, why_not
from runtime.protocol import GpuInfo, ReplicaSpec

__all__ = ["Allocation", "DeviceAllocator", "devices_for", "discover_gpus", "format_id_list", "host_cpu_cores",
           "pick_cores", "stopping_holders"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- discovery


def discover_gpus(nvml: Any = None) -> list[GpuInfo]:
    """The host's NVIDIA GPUs via NVML (`pynvml`, package nvidia-ml-py); [] when there is none or no NVML.

    `nvml` is the module to use (tests pass a fake); by default `pynvml` is imported if installed.
    """
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[import-not-found, no-redef, unused-ignore]
        except ImportError:
            return []
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no usable GPU here
        log.info("agent [devices] NVML unavailable (%s): no GPUs", exc)
        return []
    try:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):  # older pynvml returns bytes
                name = name.decode("utf-8", "replace")
            memory = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
            gpus.append(GpuInfo(index=index, name=str(name), memory_bytes=memory))
        return gpus
    except Exception as exc:
        log.warning("agent [devices] NVML query failed (%s): reporting no GPUs", exc)
        return []
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def host_cpu_cores() -> list[int]:
    """The CPU ids this process may run on (its affinity mask), sorted."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


# --------------------------------------------------------------------------- pure helpers


def format_id_list(ids: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (the format of VLLM_CPU_OMP_THREADS_BIND)."""
    ordered = sorted(set(ids))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else "%d-%d" % (ordered[i], ordered[j]))
        i = j + 1
    return ",".join(parts)


def parse_id_list(text: str) -> list[int]:
    """"0-2,5" -> [0, 1, 2, 5]: format_id_list's inverse (also plain "0,1"). Raises ValueError."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, dash, last = part.partition("-")
        out += range(int(first), int(last) + 1) if dash else [int(first)]
    return sorted(set(out))


# --------------------------------------------------------------------------- allocator


@dataclass(frozen=True)
class Allocation:
    replica_id: str
    gpus: tuple[int, ...]
    cpus: tuple[int, ...]
    env: dict[str, str]

    @property
    def tensor_parallel_size(self) -> int:
        return max(1, len(self.gpus))


class DeviceAllocator:
    """Which GPUs and cores each replica on this host holds. Not thread-safe: one owner (the agent loop).

    `allocate` is idempotent for a replica that already holds devices of the same shape (an agent that
    re-applies the same assignment gets the same env back). A replica whose process is stopping is
    `retire`d: its devices stay taken until `release` (its process gone), but it no longer counts among
    the holders of cores when they are divided (it will not run on them again).
    """

    def __init__(self, gpu_indices: Iterable[int], cpu_cores: Iterable[int],
                 kv_cache_gib: Optional[int] = None) -> None:
        self._gpus = sorted(set(gpu_indices))
        self._cores = sorted(set(cpu_cores))
        if kv_cache_gib is not None and kv_cache_gib < 1:
            raise ValueError("kv_cache_gib must be a whole number of GiB >= 1 (VLLM_CPU_KVCACHE_SPACE), "
                             "got %r" % kv_cache_gib)
        self._kv_cache_gib = kv_cache_gib
        self._held: dict[str, Allocation] = {}
        self._retiring: set[str] = set()  # held by a process that is stopping

    @property
    def free_gpus(self) -> list[int]:
        taken = {g for a in self._held.values() for g in a.gpus}
        return [g for g in self._gpus if g not in taken]

    @property
    def free_cores(self) -> list[int]:
        taken = {c for a in self._held.values() for c in a.cpus}
        return [c for c in self._cores if c not in taken]

    @property
    def cores(self) -> list[int]:
        return list(self._cores)

    def held_cores(self) -> dict[str, tuple[int, ...]]:
        """The cores each pinned CPU replica holds now (not those of replicas being stopped)."""
        return {rid: a.cpus for rid, a in self._held.items() if a.cpus and rid not in self._retiring}

    def retiring(self) -> dict[str, Allocation]:
        """The devices still held by replicas whose processes are stopping."""
        return {rid: self._held[rid] for rid in sorted(self._retiring)}

    def retire(self, replica_id: str) -> None:
        """The replica's process is stopping: its devices stay taken until `release`."""
        if replica_id in self._held:
            self._retiring.add(replica_id)

    def get(self, replica_id: str) -> Optional[Allocation]:
        return self._held.get(replica_id)

    def pin(self, replica_id: str, cores: tuple[int, ...]) -> Allocation:
        """Pin a CPU replica to `cores`, chosen by runtime.capacity.divide_cores. They may still be
        held by a replica whose share shrank until the agent re-pins it (agent.server)."""
        if not cores or any(c not in self._cores for c in cores):
            raise ValueError("replica %s: cores %s are not this host's %s"
                             % (replica_id, list(cores), format_id_list(self._cores)))
        allocation = Allocation(replica_id, (), tuple(sorted(cores)), self._cpu_env(tuple(sorted(cores))))
        self._held[replica_id] = allocation
        log.info("agent [devices] %s pinned to cpus=%s", replica_id, format_id_list(cores))
        return allocation

    def _cpu_env(self, cores: tuple[int, ...]) -> dict[str, str]:
        env = {"VLLM_CPU_OMP_THREADS_BIND": format_id_list(cores), "CUDA_VISIBLE_DEVICES": ""}
        if self._kv_cache_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self._kv_cache_gib)
        return env

    def allocate(self, replica_id: str, gpus: int = 0, cpus: Optional[int] = None) -> Allocation:
        """Reserve devices for a replica and return them with its environment.

        gpus > 0: that many free GPUs (tensor parallel across them); cores are not pinned.
        gpus == 0: a CPU replica pinned to `cpus` free cores (default: every free core).
        """
        if gpus < 0:
            raise ValueError("gpus must be >= 0 (deployment gpus), got %d" % gpus)
        if cpus is not None and cpus < 1:
            raise ValueError("cpus must be >= 1, got %d" % cpus)
        held = self._held.get(replica_id)
        if held is not None:
            if len(held.gpus) == gpus and (gpus > 0 or cpus is None or len(held.cpus) == cpus):
                return held
            raise ValueError("replica %s already holds gpus=%s cpus=%s; release it before asking for "
                             "a different shape" % (replica_id, list(held.gpus), list(held.cpus)))
        if gpus > 0:
            allocation = self._allocate_gpus(replica_id, gpus)
        else:
            allocation = self._allocate_cores(replica_id, cpus)
        self._held[replica_id] = allocation
        log.info("agent [devices] %s gets gpus=%s cpus=%s", replica_id,
                 list(allocation.gpus), format_id_list(allocation.cpus))
        return allocation

    def adopt(self, replica_id: str, env: dict[str, str]) -> Allocation:
        """Record the devices a running replica started by a previous agent holds, read from its
        environment (the CUDA_VISIBLE_DEVICES and VLLM_CPU_OMP_THREADS_BIND that agent gave it), so a
        new replica is not given them, and its successor waits for them when it stops. An id that is not
        this host's is ignored; one already held by another replica is kept by both (logged)."""
        gpus = tuple(g for g in _ids(env.get("CUDA_VISIBLE_DEVICES", "")) if g in self._gpus)
        cpus = () if gpus else tuple(c for c in _ids(env.get("VLLM_CPU_OMP_THREADS_BIND", "")) if c in self._cores)
        clash = [other for other, a in self._held.items()
                 if other != replica_id and (set(a.gpus) & set(gpus) or set(a.cpus) & set(cpus))]
        if clash:
            log.warning("agent [devices] adopted %s shares devices with %s", replica_id, ",".join(clash))
        allocation = Allocation(replica_id, gpus, cpus, {})
        self._held[replica_id] = allocation
        log.info("agent [devices] adopted %s holding gpus=%s cpus=%s", replica_id, list(gpus),
                 format_id_list(cpus))
        return allocation

    def release(self, replica_id: str) -> None:
        """Return a replica's devices (its process is gone); unknown ids are ignored (idempotent)."""
        self._held.pop(replica_id, None)
        self._retiring.discard(replica_id)

    def _allocate_gpus(self, replica_id: str, count: int) -> Allocation:
        free = self.free_gpus
        if count > len(self._gpus):
            raise ValueError("replica %s needs %d GPUs but this host has %d: lower the deployment's gpus"
                             % (replica_id, count, len(self._gpus)))
        if count > len(free):
            raise ValueError("replica %s needs %d GPUs but only %d are free (%s held by %s): lower the "
                             "deployment's gpus or its replica count"
                             % (replica_id, count, len(free), self._holders("gpus"), self._holder_ids()))
        chosen = tuple(free[:count])
        env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID",
               "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in chosen)}
        return Allocation(replica_id, chosen, (), env)

    def _allocate_cores(self, replica_id: str, count: Optional[int]) -> Allocation:
        free = self.free_cores
        want = len(free) if count is None else count
        if want < 1 or want > len(free):
            asked = "some" if count is None else str(count)
            raise ValueError("replica %s needs %s CPU cores but %d of %d are free: lower the number of "
                             "CPU replicas per host or their cpus"
                             % (replica_id, asked, len(free), len(self._cores)))
        chosen = tuple(pick_cores(free, want) or ())
        return Allocation(replica_id, (), chosen, self._cpu_env(chosen))

    def _holders(self, kind: str) -> str:
        return ",".join(str(x) for a in self._held.values() for x in getattr(a, kind)) or "none"

    def _holder_ids(self) -> str:
        return ",".join(sorted(self._held)) or "nobody"


# --------------------------------------------------------------------------- one replica's devices


def devices_for(devices: DeviceAllocator, host: Host, demands: dict[str, Demand],
                spec: ReplicaSpec) -> tuple[ReplicaSpec, dict[str, str], set[str]]:
    """Devices for a replica about to start, by runtime.capacity (the head's arithmetic): its spec (a
    multi-GPU replica gets its tensor_parallel_size), its environment, and the replicas that must give
    up cores it now has (a CPU replica: the host's cores divided anew, sticky). `demands`: every replica
    assigned to this host. Raises ValueError when it does not fit beside the others (the head placed it
    by the same rule, so only a disagreement about the host, e.g. a changed core count, gets here). The
    mock engine takes no devices."""
    mine = demands.get(spec.replica_id) or demand_of(spec.engine, spec.gpus, spec.cpus, spec.memory_bytes)
    why = why_not(host, [d for rid, d in demands.items() if rid != spec.replica_id], mine)
    if why:
        raise ValueError(why)
    if spec.engine != "vllm":
        return spec, {}, set()
    if spec.gpus:
        alloc = devices.allocate(spec.replica_id, gpus=spec.gpus)
        if spec.gpus > 1 and "tensor_parallel_size" not in spec.engine_args:
            spec = msgspec.structs.replace(
                spec, engine_args={**spec.engine_args, "tensor_parallel_size": alloc.tensor_parallel_size})
        return spec, dict(alloc.env), set()
    held = devices.held_cores()
    held.pop(spec.replica_id, None)
    targets = divide_cores(devices.cores, demands, held)
    gave_up = set()
    for other, cores in held.items():
        if other in targets and not set(cores) <= set(targets[other]):
            log.info("agent [devices] replica %s gives up cores %s to %s (it keeps %s)", other,
                     format_id_list(set(cores) - set(targets[other])), spec.replica_id,
                     format_id_list(targets[other]))
            gave_up.add(other)
    return spec, dict(devices.pin(spec.replica_id, targets[spec.replica_id]).env), gave_up


def stopping_holders(devices: DeviceAllocator, demands: dict[str, Demand], spec: ReplicaSpec) -> list[str]:
    """The stopping replicas whose processes still hold GPUs or cores a replica about to start would
    get; the agent starts it once there are none (a vLLM on a GPU another process still fills fails to
    load; on cores still busy it runs slow). `demands` as for `devices_for`. [] for a replica that takes
    no devices or does not fit anyway (`devices_for` then says why)."""
    retiring = devices.retiring()
    if spec.engine != "vllm" or not retiring:
        return []
    if spec.gpus:
        if len(devices.free_gpus) >= spec.gpus:
            return []
        return [rid for rid, a in retiring.items() if a.gpus]
    held = devices.held_cores()
    held.pop(spec.replica_id, None)
    mine = demands.get(spec.replica_id) or demand_of(spec.engine, spec.gpus, spec.cpus, spec.memory_bytes)
    try:
        cores = set(divide_cores(devices.cores, {**demands, spec.replica_id: mine}, held)[spec.replica_id])
    except (ValueError, KeyError):
        return []
    return [rid for rid, a in retiring.items() if cores & set(a.cpus)]


def _ids(text: str) -> list[int]:
    try:
        return parse_id_list(text)
    except ValueError:  # not ours to read: hold nothing rather than guess
        return []
