"""Which device a job evaluates on, and in which precision.

Under ``eval.device=auto`` (or plain ``cuda``) each process claims ONE GPU for its lifetime: the sequential
launcher's one process, each joblib worker, each Slurm task. The claim is an advisory file lock per GPU
slot in a per-user folder of this host (released by the OS when the process ends, also when it is killed),
so concurrent workers and concurrent sweeps on one machine land on different GPUs. With more processes
than GPUs the least-claimed GPU is shared and the job says so (its ``gpu_shared`` tag and a warning: its
milliseconds then measure contention). ``cuda:N`` is an explicit choice and claims nothing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

import torch

from sweep.config.schema import ConfigError

log = logging.getLogger(__name__)


@dataclass
class GpuClaim:
    """The GPU a process claimed (``index`` among the visible ones) and whether another process shares it."""

    index: int
    shared: bool
    handle: IO[bytes] | None = None  # the open, locked slot file: the claim lasts as long as it stays open

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def claims_folder() -> Path:
    """This user's lock folder on this host (``$XDG_RUNTIME_DIR`` when set: never on a shared file system)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"sweep-gpu-claims-{os.getuid()}"


def claim_gpu(gpu_ids: Sequence[str], folder: Path) -> GpuClaim:
    """Claim the least-claimed of the GPUs named ``gpu_ids`` (stable names, e.g. UUIDs; their position is the
    visible index): slot 0 of each GPU in order, then slot 1 of each, ... The first slot whose lock this
    process gets is its claim; a slot above 0 means the GPU is shared."""
    if not gpu_ids:
        raise ValueError("gpu_ids is empty: need at least one CUDA device")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    slot = 0
    while True:
        for index, gpu in enumerate(gpu_ids):
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", gpu)
            handle = open(folder / f"{name}.slot{slot}.lock", "ab")  # noqa: SIM115 - held for the claim's life
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            return GpuClaim(index, slot > 0, handle)
        slot += 1


def visible_gpu_ids() -> list[str]:
    """Stable names of the visible CUDA devices (UUIDs: index 0 of two Slurm jobs may be different GPUs)."""
    ids = []
    for i in range(torch.cuda.device_count()):
        uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
        ids.append(f"gpu-{uuid}" if uuid is not None else f"index-{i}")
    return ids


def resolve_device(device: str, half: bool | None, claim: GpuClaim | None = None) -> tuple[torch.device, bool]:
    """``auto`` and ``cuda`` -> the process's claimed GPU (``claim``, see :func:`claim_gpu`) when CUDA is
    present, else the CPU for ``auto``; ``cuda:N`` -> that GPU; ``half`` None -> FP16 on CUDA.

    FP16 on CPU is refused with a warning. CUDA_VISIBLE_DEVICES is never touched (a Slurm job with one GPU
    sees exactly that one). ``claim`` is needed only when CUDA is present and the device is auto or cuda.
    """
    cuda = torch.cuda.is_available()
    if device in ("auto", "cuda") and cuda:
        if claim is None:
            raise ValueError("a GPU claim is needed for eval.device=auto|cuda with CUDA present")
        dev = torch.device("cuda", claim.index)
    elif device == "auto":
        dev = torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not cuda:
            raise ConfigError(f"eval.device={device!r} is invalid: no CUDA device is available here; "
                              "allowed are auto or cpu")
        if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"eval.device={device!r} is invalid: {torch.cuda.device_count()} CUDA device(s) are "
                              f"visible; allowed are auto, cpu, cuda or cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if half is None:
        half = dev.type == "cuda"
    if half and dev.type != "cuda":
        log.warning("eval.half=true is only supported on CUDA; evaluating in FP32 on %s", dev)
        half = False
    return dev, bool(half)


def release_cached_memory(device: torch.device) -> None:
    """Hand the CUDA caching allocator's free blocks back to the driver (end of a job: the next job, or another
    process on a shared GPU, gets them); a no-op on the CPU."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.empty_cache()
