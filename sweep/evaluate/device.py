"""Which device a job evaluates on, and in which precision."""

from __future__ import annotations

import logging

import torch

from sweep.config.schema import ConfigError

log = logging.getLogger(__name__)


def gpu_for_job(job_num: int, device_count: int) -> int:
    """The CUDA index a job uses under ``eval.device=auto``: jobs spread round-robin over the visible GPUs.

    With ``hydra/launcher=joblib`` and ``n_jobs`` equal to the number of GPUs, jobs dispatched
    together (``k .. k+n_jobs-1``) land on different GPUs. The job number decides, not which GPU
    is free: jobs of very different length can meet on one GPU while another idles.
    """
    if device_count < 1:
        raise ValueError(f"device_count={device_count} is invalid: need at least one CUDA device")
    if job_num < 0:
        raise ValueError(f"job_num={job_num} is invalid: job numbers start at 0")
    return job_num % device_count


def resolve_device(device: str, half: bool | None, job_num: int = 0) -> tuple[torch.device, bool]:
    """``auto`` -> CUDA when present (``cuda:<job_num % GPUs>``); ``half`` None -> FP16 on CUDA.

    FP16 on CPU is refused with a warning. The index is chosen here, on the torch device;
    CUDA_VISIBLE_DEVICES is never touched (a Slurm job with one GPU sees exactly that one).
    """
    if device == "auto":
        dev = (torch.device("cuda", gpu_for_job(job_num, torch.cuda.device_count()))
               if torch.cuda.is_available() else torch.device("cpu"))
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"eval.device={device!r} is invalid: no CUDA device is available here; "
                              "allowed are auto or cpu")
        if dev.type == "cuda" and dev.index is None:  # plain `cuda` spreads jobs over the GPUs like auto
            dev = torch.device("cuda", gpu_for_job(job_num, torch.cuda.device_count()))
        elif dev.type == "cuda" and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"eval.device={device!r} is invalid: {torch.cuda.device_count()} CUDA device(s) are "
                              f"visible; allowed are auto, cpu, cuda or cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if half is None:
        half = dev.type == "cuda"
    if half and dev.type != "cuda":
        log.warning("eval.half=true is only supported on CUDA; evaluating in FP32 on %s", dev)
        half = False
    return dev, bool(half)
