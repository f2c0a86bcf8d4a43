"""agent.devices: GPU discovery through a fake NVML, and device allocation per replica."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from agent.devices import (
    DeviceAllocator,
    discover_gpus,
    format_id_list,
    host_cpu_cores,
    pick_cores,
)
from runtime.protocol import GpuInfo


class FakeNvml:
    def __init__(self, gpus: list[tuple[object, int]], init_error: Exception | None = None,
                 query_error: Exception | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.query_error = query_error
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        if self.query_error:
            raise self.query_error
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> object:
        return self.gpus[handle][0]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(total=self.gpus[handle][1], free=0, used=0)


# --------------------------------------------------------------------------- discovery


def test_discover_gpus_reads_every_device_and_decodes_bytes_names() -> None:
    nvml = FakeNvml([(b"NVIDIA H100", 80 << 30), ("NVIDIA A10", 24 << 30)])
    assert discover_gpus(nvml) == [GpuInfo(0, "NVIDIA H100", 80 << 30), GpuInfo(1, "NVIDIA A10", 24 << 30)]
    assert nvml.shutdowns == 1


def test_discover_gpus_without_driver_is_empty() -> None:
    assert discover_gpus(FakeNvml([], init_error=RuntimeError("NVML Shared Library Not Found"))) == []


def test_discover_gpus_query_failure_is_empty_and_shuts_nvml_down() -> None:
    nvml = FakeNvml([("x", 1)], query_error=RuntimeError("GPU is lost"))
    assert discover_gpus(nvml) == []
    assert nvml.shutdowns == 1


def test_discover_gpus_on_this_host_never_raises() -> None:
    gpus = discover_gpus()
    assert isinstance(gpus, list)
    assert all(isinstance(g, GpuInfo) for g in gpus)


def test_host_cpu_cores_is_a_sorted_nonempty_list() -> None:
    cores = host_cpu_cores()
    assert cores and cores == sorted(cores)


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("ids, text", [
    ([], ""), ([3], "3"), ([0, 1, 2, 5, 7, 8], "0-2,5,7-8"), ([8, 7, 7, 0], "0,7-8"),
])
def test_format_id_list(ids: list[int], text: str) -> None:
    assert format_id_list(ids) == text


def test_pick_cores_prefers_a_contiguous_run() -> None:
    assert pick_cores([0, 2, 3, 4, 7], 3) == [2, 3, 4]
    assert pick_cores([0, 2, 4], 2) == [0, 2]
    assert pick_cores([1], 2) is None


# --------------------------------------------------------------------------- allocator


def test_two_cpu_replicas_on_two_cores_get_one_core_each() -> None:
    alloc = DeviceAllocator(gpu_indices=[], cpu_cores=[0, 1], kv_cache_gib=2)
    a = alloc.allocate("r0", gpus=0, cpus=1)
    b = alloc.allocate("r1", gpus=0, cpus=1)
    assert a.env == {"VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_KVCACHE_SPACE": "2",
                     "CUDA_VISIBLE_DEVICES": ""}
    assert b.env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert alloc.free_cores == []
    with pytest.raises(ValueError, match="r2 needs 1 CPU cores but 0 of 2 are free"):
        alloc.allocate("r2", cpus=1)


def test_cpu_replica_without_cpus_takes_every_free_core_and_no_kv_env_unless_configured() -> None:
    alloc = DeviceAllocator([], range(4))
    a = alloc.allocate("r0")
    assert a.cpus == (0, 1, 2, 3)
    assert a.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-3"
    assert "VLLM_CPU_KVCACHE_SPACE" not in a.env


def test_gpu_replicas_get_disjoint_gpus_with_tensor_parallel_size() -> None:
    alloc = DeviceAllocator(gpu_indices=[0, 1, 2, 3], cpu_cores=range(8))
    a = alloc.allocate("r0", gpus=2)
    b = alloc.allocate("r1", gpus=1)
    assert a.env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert a.tensor_parallel_size == 2 and a.cpus == ()
    assert b.env["CUDA_VISIBLE_DEVICES"] == "2"
    assert alloc.free_gpus == [3]
    with pytest.raises(ValueError, match=r"needs 2 GPUs but only 1 are free \(0,1,2 held by r0,r1\)"):
        alloc.allocate("r2", gpus=2)
    with pytest.raises(ValueError, match="this host has 4"):
        alloc.allocate("r3", gpus=5)


def test_release_frees_devices_and_is_idempotent() -> None:
    alloc = DeviceAllocator([0, 1], [0, 1])
    alloc.allocate("r0", gpus=2)
    alloc.release("r0")
    alloc.release("r0")
    alloc.release("never-seen")
    assert alloc.free_gpus == [0, 1]
    assert alloc.allocate("r1", gpus=2).gpus == (0, 1)


def test_allocate_again_with_same_shape_returns_the_same_devices() -> None:
    alloc = DeviceAllocator([0, 1], [0, 1, 2, 3])
    first = alloc.allocate("r0", cpus=2)
    assert alloc.allocate("r0", cpus=2) is first
    assert alloc.allocate("r0") is first
    with pytest.raises(ValueError, match="release it"):
        alloc.allocate("r0", gpus=1)


def test_cpu_replica_on_gpu_host_hides_gpus_and_leaves_them_free() -> None:
    alloc = DeviceAllocator([0], [0, 1])
    a = alloc.allocate("mock", cpus=1)
    assert a.env["CUDA_VISIBLE_DEVICES"] == ""
    assert alloc.free_gpus == [0]


@pytest.mark.parametrize("kwargs, match", [
    ({"gpus": -1}, "gpus must be >= 0"), ({"cpus": 0}, "cpus must be >= 1"),
])
def test_bad_requests_raise_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DeviceAllocator([0], [0]).allocate("r0", **kwargs)


def test_bad_kv_cache_size_names_the_knob() -> None:
    with pytest.raises(ValueError, match="VLLM_CPU_KVCACHE_SPACE"):
        DeviceAllocator([], [0], kv_cache_gib=0)
