"""What this process's CPU computes fast: whether bf16 autocast pays off (sampling and training both ask), the
memory layout sampling and training run fastest in, and a model copy that spares bf16 sampling its weight casts."""
import os
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


# Largest feature map (image size / patch size) at which channels_last sampling was measured faster on AVX512-BF16
# without AMX (bench/layout.py: 16x16 1.12-1.21x, 32x32 1.06-1.07x; 64x64 0.92-1.00x, i.e. slower): beyond it,
# NCHW. With AMX channels_last is faster at every size measured (64x64 1.22-1.31x, `bench/layout.py --arch matched
# --size 64 --batch 16`).
CHANNELS_LAST_MAX_MAP = 32


def sampling_memory_format(device, feature_map: int) -> torch.memory_format:
    """channels_last where sampling runs in bf16 on the CPU (native bf16), on AMX at any size, on AVX512-BF16 on
    feature maps of at most CHANNELS_LAST_MAX_MAP pixels a side; else NCHW. oneDNN's bf16 convolutions are faster
    in channels_last (up to 2x on AVX512-BF16, several times with AMX) and the U-Net keeps the layout
    (models.modules.GroupNorm avoids PyTorch's slow channels_last kernels); without AMX, on larger maps the
    conversions cost more than that gains. A rule, not a timing probe, so that a seed draws the same images in
    every process on one machine (`python bench/layout.py` measures all of it)."""
    fast = native_bf16(device) and (amx(device) or feature_map <= CHANNELS_LAST_MAX_MAP)
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
