"""The arithmetic a training step runs in: fp32, or bf16 autocast on channels-last tensors.

bf16 pays only where the processor multiplies bf16 natively. On this project's 2-core dev VM (AMD EPYC with
avx512_bf16) a ResNet-18 training step at 64 px ran about 2x faster in bf16 on channels-last tensors than in fp32
(bench/precision_bench.py, BENCHMARKS.md); on an AVX2-only machine of the same kind bf16 was far slower than fp32.
So `auto` is bf16 on CUDA and on a CPU with bf16 instructions (avx512_bf16 or AMX), fp32 elsewhere: decided by
the processor, not by a timing, so two runs on one machine train the same way. The weights, the optimizer, the
EMA copy and the bundle stay fp32 either way; evaluation on the CPU runs in fp32, as every predictor does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

from shell.cli import log

PRECISIONS = ("auto", "fp32", "bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when /proc/cpuinfo lists a native bf16 instruction set (Linux; False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in NATIVE_BF16_FLAGS)
    except OSError:
        pass
    return False


@dataclasses.dataclass(frozen=True)
class Precision:
    """fp32 or bf16 on one device; bf16 means autocast plus channels-last model and inputs."""

    name: str
    device: torch.device

    @classmethod
    def choose(cls, requested: str, device: torch.device) -> "Precision":
        if requested not in PRECISIONS:
            raise ValueError(f"precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
        if requested == "auto":
            requested = "bf16" if device.type == "cuda" or cpu_has_bf16() else "fp32"
        elif requested == "bf16" and device.type == "cpu" and not cpu_has_bf16():
            log.warning("train: --precision bf16 on a CPU without bf16 instructions (no avx512_bf16/AMX) is emulated "
                        "and usually slower than fp32; --precision auto picks fp32 here")
        return cls(requested, device)

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def model(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` laid out for this precision (channels-last for bf16; its weights stay fp32)."""
        return module.to(memory_format=torch.channels_last) if self.bf16 else module

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.bf16 else x

    def train_step(self):
        """The context of a training forward pass (and its loss)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def evaluation(self):
        """The context of an evaluation forward pass: bf16 on CUDA only (on a CPU, fp32 as the predictors run)."""
        if self.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()
