"""What this process's CPU computes fast: whether bf16 autocast pays off (sampling and training both ask), the
memory layout sampling and training run fastest in, and a model copy that spares bf16 sampling its weight casts."""
import functools
import os
import platform
from copy import deepcopy

import torch

# oneDNN ISAs (ONEDNN_MAX_CPU_ISA) without bf16 dot products: capped there, oneDNN emulates bf16 matmuls and
# convolutions at a fraction of fp32's speed (measured on a Xeon capped at AVX2: a bf16 matmul 1 GFLOP/s against
# 154 in fp32). The variable is how a user, or the test suite, turns AMX or all of bf16 off for a process.
ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def native_bf16(device) -> bool:
    """True on CPUs with native bf16 arithmetic (AVX512-BF16 / AMX) that oneDNN is allowed to use, where bf16
    matmuls run about 2x fp32 (AVX512-BF16) or several times it (AMX)."""
    if torch.device(device).type != "cpu" or not getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return False
    return _isa_cap() not in ISAS_WITHOUT_BF16


def _isa_cap() -> str:
    """The ISA oneDNN is capped at for this process ("" when not capped)."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()


def amx(device) -> bool:
    """True on CPUs with AMX tile units that oneDNN may use (unless ONEDNN_MAX_CPU_ISA caps it below an AMX ISA,
    e.g. AVX512_CORE_BF16): there bf16 convolutions in channels_last run several times their NCHW speed."""
    if not native_bf16(device) or not getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return False
    cap = _isa_cap()
    return cap in ("", "ALL", "DEFAULT") or "AMX" in cap


def bf16_pays_off(device) -> bool:
    """Whether bf16 autocast is the faster choice on `device` ("auto" precision, sampling and training): native
    bf16 with AMX, or without AMX on CPUs other than Intel's. Measured without AMX: on a 2-core AMD EPYC bf16
    trains 1.5x fp32; on an Intel Xeon with AMX capped at AVX512_CORE_BF16 it trains 0.7x fp32, and the web app's
    4-image batch took 5.80 s in bf16 and 3.70 s in fp32 (stages 14 and 15, the same cost; docs/model_card.md),
    so Intel CPUs whose bf16 runs without AMX stay in fp32. A rule, not a timing probe, so that a seed draws the same images every time."""
    return amx(device) or (native_bf16(device) and cpu_vendor() != "GenuineIntel")


@functools.cache
def cpu_vendor(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The CPU's vendor id ("GenuineIntel", "AuthenticAMD", ...; "" where unknown): /proc/cpuinfo on Linux, else
    the last word of platform.processor() (Windows: "Intel64 Family 6 Model 143 Stepping 8, GenuineIntel")."""
    try:
        with open(cpuinfo_path) as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    words = platform.processor().replace(",", " ").split()
    return words[-1] if words and words[-1].startswith(("Genuine", "Authentic")) else ""


# Largest feature map (image size / patch size) at which channels_last sampling was measured faster on AVX512-BF16
# without AMX (bench/layout.py: 16x16 1.12-1.21x, 32x32 1.06-1.07x; 64x64 0.92-1.00x, i.e. slower): beyond it,
# NCHW. With AMX channels_last is faster at every size measured (64x64 1.22-1.31x, `bench/layout.py --arch matched
# --size 64 --batch 16`).
CHANNELS_LAST_MAX_MAP = 32


def sampling_memory_format(device, feature_map: int) -> torch.memory_format:
    """channels_last where sampling runs in bf16 on the CPU (bf16_pays_off), on AMX at any size, on AVX512-BF16 on
    feature maps of at most CHANNELS_LAST_MAX_MAP pixels a side; else NCHW. oneDNN's bf16 convolutions are faster
    in channels_last (up to 2x on AVX512-BF16, several times with AMX) and the U-Net keeps the layout
    (models.modules.GroupNorm avoids PyTorch's slow channels_last kernels); without AMX, on larger maps the
    conversions cost more than that gains. A rule, not a timing probe, so that a seed draws the same images in
    every process on one machine (`python bench/layout.py` measures all of it)."""
    fast = bf16_pays_off(device) and (amx(device) or feature_map <= CHANNELS_LAST_MAX_MAP)
    return torch.channels_last if fast else torch.contiguous_format


def training_memory_format(device, dtype) -> torch.memory_format:
    """channels_last for bf16 training on CPUs with AMX, else NCHW. A training step also pays each GroupNorm's
    layout conversions in the backward pass: with AMX's bf16 convolutions the faster convolutions outweigh that;
    on AVX512-BF16 alone they do not (`python bench/layout.py`). `dtype`: the step's autocast dtype (None: fp32)."""
    return torch.channels_last if dtype == torch.bfloat16 and amx(device) else torch.contiguous_format


# What bf16 autocast casts to bf16 at every call: the weights and biases of these layers (torch's autocast op lists).
AUTOCAST_BF16_LAYERS = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)


def bf16_layer_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` for bf16 autocast inference whose convolution and linear layers hold their weights in
    bf16 already: exactly the values autocast would cast them to at every call (so the outputs are the same bit
    for bit), cast once instead of at every sampling step. Norms and other parameters stay as they were, as
    autocast leaves them. Not for training: the copy does not follow the model's later updates."""
    copy = deepcopy(model)
    for layer in copy.modules():
        if isinstance(layer, AUTOCAST_BF16_LAYERS):
            layer.to(torch.bfloat16)
    return copy
