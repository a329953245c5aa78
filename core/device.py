"""The device every model runs on, chosen once per process, how much work fits on it, and the encoding precision.

Device: `--device` on any `python -m core` command, else `DPR_LENS_DEVICE`, else CUDA when there is a GPU, else the
CPU. A requested device this machine does not have is a one-sentence DeviceError. Models are moved there when they
are loaded (core.pair, core.adapters), `Tower.tokenize` puts its tensors there, analyses make their own tensors on
the model's device and hand results back as numpy (`.cpu()`). Each device has its own model worker (core.runtime).

Batch sizes: every module keeps its CPU constant (TOKEN_BUDGET of the IG driver, MAX_TOKEN_LAYERS of the neuron
attribution, the encode batch sizes), each sized for about REFERENCE_BYTES of activations on the 2-core CPU
(MAX_TOKEN_LAYERS' BERT-base pass peaked at 1.9 GB). `scaled` multiplies such a constant by `memory_scale`: 1 on
the CPU; on CUDA, SAFETY_FRACTION of the GPU's free memory (read once, after the models are loaded) over
REFERENCE_BYTES. That ratio assumes BERT-base-sized activations per token; it has not been checked on a GPU.

Precision: corpus and query encoding (`Tower.encode`) can run under autocast in bf16 or fp16 (`--encode-dtype`,
`DPR_LENS_ENCODE_DTYPE`). The default is fp32 on every device: agreement with fp32 has only been measured on the
CPU (bf16 autocast, tests/test_device.py), not on a GPU. A reduced precision is part of every encoder's fingerprint,
so its embeddings and everything computed from them are cached apart. Attributions always run in fp32.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from .errors import LensError

DEVICE_ENV = "DPR_LENS_DEVICE"
ENCODE_DTYPE_ENV = "DPR_LENS_ENCODE_DTYPE"
ENCODE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REFERENCE_BYTES = 2 * 1024**3
SAFETY_FRACTION = 0.6  # of the free GPU memory: the rest is for the allocator's fragmentation and other processes


class DeviceError(LensError):
    """A requested device or precision this machine cannot use; the message is meant for the user."""


def resolve_device(name: str | None = None) -> torch.device:
    """`name`, else $DPR_LENS_DEVICE, else cuda when available, else cpu; checked against this machine."""
    name = (name or os.environ.get(DEVICE_ENV, "")).strip().lower()
    if not name:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"Unknown device '{name}': use cpu, cuda or cuda:N.") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceError(f"Device '{name}' is not supported: use cpu, cuda or cuda:N.")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = device.index or 0
    if index >= count:
        raise DeviceError(
            f"Device '{name}' was requested but this machine has "
            f"{'no CUDA GPU' if not count else f'{count} CUDA GPU(s)'}."
        )
    return torch.device("cuda", index)


def resolve_encode_dtype(name: str | None = None) -> str:
    """`name`, else $DPR_LENS_ENCODE_DTYPE, else fp32."""
    name = (name or os.environ.get(ENCODE_DTYPE_ENV, "") or "fp32").strip().lower()
    if name not in ENCODE_DTYPES:
        raise DeviceError(f"Unknown encoding precision '{name}': use {', '.join(ENCODE_DTYPES)}.")
    return name


_chosen: dict[str, object] = {}


def use_device(name: str | None = None, encode_dtype: str | None = None) -> torch.device:
    """Chooses this process's device and encoding precision (the command line calls it before loading models)."""
    _chosen["device"] = resolve_device(name)
    _chosen["encode_dtype"] = resolve_encode_dtype(encode_dtype)
    return _chosen["device"]


def model_device() -> torch.device:
    """The device of this process's models (chosen at the first call if `use_device` was not called)."""
    if "device" not in _chosen:
        use_device()
    return _chosen["device"]


def encode_dtype() -> str:
    if "encode_dtype" not in _chosen:
        use_device()
    return _chosen["encode_dtype"]


def device_name(device: torch.device) -> str:
    """For people: 'cpu' or 'cuda:0 (NVIDIA H200)'."""
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def encoding(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to the chosen encoding precision (nothing in fp32)."""
    dtype = ENCODE_DTYPES[encode_dtype()]
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@functools.cache
def memory_scale(device: torch.device) -> float:
    """How many times the CPU's working set fits on `device` (1 on the CPU)."""
    if device.type != "cuda":
        return 1.0
    free, total = torch.cuda.mem_get_info(device)
    return max(1.0, SAFETY_FRACTION * min(free, total) / REFERENCE_BYTES)


def scaled(cpu_value: int, device: torch.device, cap: int | None = None) -> int:
    """A CPU-sized batch constant for `device`, at most `cap`."""
    value = int(cpu_value * memory_scale(torch.device(device)))
    return value if cap is None else max(cpu_value, min(value, cap))
