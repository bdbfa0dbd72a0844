"""A CPU platform for verl, for the tests only: verl 0.9.1 ships CUDA, NPU and ROCm platforms, none for CPU.

Importing it registers the platform "cpu" (select it with VERL_PLATFORM=cpu before verl first asks for its platform).
The process group must be initialised with gloo before verl's TrainingWorker is built.
"""
from types import ModuleType

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry


class _CPUDevice(ModuleType):
    """torch.cpu plus the memory queries verl reads from its device module (no allocator stats on CPU: 0)."""

    def __getattr__(self, name):
        if name in ("max_memory_allocated", "max_memory_reserved", "memory_allocated", "memory_reserved"):
            return lambda *a, **k: 0
        if name in ("reset_peak_memory_stats", "empty_cache", "reset_max_memory_allocated"):
            return lambda *a, **k: None
        if name in ("get_rng_state", "set_rng_state"):  # the CPU generator is torch's default one
            return getattr(torch, name)
        if name == "get_device_name":
            return lambda *a, **k: "CPU"
        if name == "mem_get_info":
            return lambda *a, **k: (0, 0)
        return getattr(torch.cpu, name)


_CPU = _CPUDevice("verl_cpu_device")


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return _CPU

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        return True

    def current_device(self):
        return torch.device("cpu")  # used as model.to(device=...) by verl's FSDP2 loading

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index=None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_resource_options(self, num_gpus: float):
        return {}

    def ray_noset_envvars(self):
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def rollout_env_vars(self):
        return {}

    def nvtx_range(self, msg: str):
        import contextlib

        return contextlib.nullcontext()

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def cudart(self):
        return None
