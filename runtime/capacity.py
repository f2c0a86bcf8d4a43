"""What a replica takes from a host, and whether it fits: the one capacity model of head and agent.

Pure functions, no sockets, no clock, no I/O. The head (head.cluster) places a replica only where
`why_not` says it fits; the agent (agent.server) admits and pins replicas with the same functions, so
the agent accepts whatever the head placed.

What a replica takes (its `Demand`, from its deployment spec):
- `gpus`: that many whole GPUs.
- `memory`: that many bytes (0: nothing).
- CPU: a vLLM replica without GPUs is *pinned* to whole cores (VLLM_CPU_OMP_THREADS_BIND). With
  `cpus >= 1` it owns ceil(cpus) cores. With `cpus: 0` it *shares*: the cores no pinned replica owns
  are divided evenly among the sharing replicas, at least one core each. Every other replica (GPU
  replicas, the mock engine) reserves `cpus` as a plain number and is not pinned; 0 reserves nothing.

So on a 2-core host one `cpus: 0` vLLM replica gets both cores, two get one each, a third does not fit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

EPSILON = 1e-9


@dataclass(frozen=True)
class Demand:
    gpus: int = 0
    cpus: float = 0.0
    memory_bytes: int = 0
    pinned: bool = False  # a CPU vLLM replica: whole cores of its own

    @property
    def shares(self) -> bool:
        """Pinned without a core count: takes an even share of the unowned cores (at least one)."""
        return self.pinned and self.cpus == 0

    @property
    def cores(self) -> float:
        """Cores this replica counts against its host: its minimum when it shares."""
        if self.pinned:
            return 1 if self.cpus == 0 else math.ceil(self.cpus)
        return self.cpus


def demand_of(engine: str, gpus: int, cpus: float, memory_bytes: int) -> Demand:
    """A replica's demand from its deployment's fields (same rule on head and agent)."""
    return Demand(gpus=gpus, cpus=cpus, memory_bytes=memory_bytes, pinned=engine == "vllm" and gpus == 0)


@dataclass(frozen=True)
class Host:
    cpus: int
    memory_bytes: int
    gpus: int


def used(demands: Iterable[Demand]) -> tuple[int, float, int]:
    """(GPUs, cores, bytes) the replicas take together."""
    gpus, cores, memory = 0, 0.0, 0
    for d in demands:
        gpus, cores, memory = gpus + d.gpus, cores + d.cores, memory + d.memory_bytes
    return gpus, cores, memory


def why_not(host: Host, placed: Iterable[Demand], new: Demand) -> str:
    """"" if `new` fits beside `placed` on `host`, else why not (free and needed amounts)."""
    gpus, cores, memory = used(placed)
    if new.gpus and host.gpus - gpus < new.gpus:
        return "%d of %d GPU(s) free, need %d" % (max(0, host.gpus - gpus), host.gpus, new.gpus)
    if new.cores and host.cpus - cores + EPSILON < new.cores:
        return "%g of %d CPU core(s) free, need %g%s" % (
            max(0.0, host.cpus - cores), host.cpus, new.cores,
            " (a CPU vLLM replica needs at least one core of its own)" if new.shares else "")
    if new.memory_bytes and host.memory_bytes - memory < new.memory_bytes:
        return "%.1f GiB free, need %.1f GiB" % (max(0, host.memory_bytes - memory) / 2**30,
                                                  new.memory_bytes / 2**30)
    return ""


def fits_all(host: Host, demands: Sequence[Demand]) -> bool:
    """True if all of `demands` fit on `host` together."""
    for i, d in enumerate(demands):
        if why_not(host, demands[:i], d):
            return False
    return True


def core_shares(cores: int, demands: Mapping[str, Demand]) -> dict[str, int]:
    """How many cores each pinned replica gets on a host with `cores` cores, the others' reservations
    taken off first. Sharing replicas split what is left evenly; the first ones (by id) get the
    remainder. Raises ValueError if they do not fit (the head never places such a set)."""
    unpinned = sum(d.cpus for d in demands.values() if not d.pinned)
    pinnable = cores - math.ceil(unpinned - EPSILON)
    fixed = {rid: math.ceil(d.cpus) for rid, d in demands.items() if d.pinned and not d.shares}
    sharing = sorted(rid for rid, d in demands.items() if d.shares)
    left = pinnable - sum(fixed.values())
    if left < len(sharing) or left < 0:
        raise ValueError("%d pinned CPU replica(s) need %d core(s) but %d of %d are not reserved by others: "
                         "lower the deployments' cpus or replicas"
                         % (len(fixed) + len(sharing), sum(fixed.values()) + len(sharing), max(0, pinnable),
                            cores))
    shares = dict(fixed)
    for i, rid in enumerate(sharing):
        shares[rid] = left // len(sharing) + (1 if i < left % len(sharing) else 0)
    return shares


def divide_cores(cores: Sequence[int], demands: Mapping[str, Demand],
                 held: Optional[Mapping[str, Sequence[int]]] = None) -> dict[str, tuple[int, ...]]:
    """Which cores each pinned replica is pinned to. Sticky: a replica keeps (the lowest of) the cores
    it `held` up to its share, so one arriving or leaving moves as few replicas as possible; the rest
    take the lowest free cores, contiguous where possible."""
    held = held or {}
    shares = core_shares(len(cores), demands)
    out: dict[str, tuple[int, ...]] = {}
    taken: set[int] = set()
    for rid in sorted(shares, key=lambda r: (r not in held, r)):
        keep = [c for c in sorted(held.get(rid, ())) if c in cores and c not in taken][:shares[rid]]
        taken.update(keep)
        out[rid] = tuple(keep)
    for rid in sorted(shares, key=lambda r: (r not in held, r)):
        need = shares[rid] - len(out[rid])
        if need > 0:
            extra = pick_cores([c for c in cores if c not in taken], need) or []
            taken.update(extra)
            out[rid] = tuple(sorted(out[rid] + tuple(extra)))
    return out


def pick_cores(free: Sequence[int], count: int) -> Optional[list[int]]:
    """`count` cores from `free`: the lowest contiguous run if there is one, else the lowest ids."""
    ordered = sorted(free)
    if count > len(ordered):
        return None
    for start in range(len(ordered) - count + 1):
        window = ordered[start:start + count]
        if window[-1] - window[0] == count - 1:
            return window
    return ordered[:count]
