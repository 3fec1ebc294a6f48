"""Shared pieces of the benchmarks: matched model configs, timing, machine info, docs/benchmarks.md sections."""
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models.cpu import native_bf16  # noqa: E402
from models.text_encoder import TextCondition, collate  # noqa: E402
from models.unet import ConditionalUNet, UNetConfig  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
# How the benchmarks' notes state `models.cpu.bf16_pays_off`'s rule.
BF16_RULE = "where it pays off: with AMX, or AVX512-BF16 on CPUs other than Intel's, `models.cpu.bf16_pays_off`"
LOAD_AT_START = os.getloadavg()[0]  # other processes competing for the cores skew every timing


@dataclass(frozen=True)
class Arch:
    """One U-Net shape that both libraries express: widths per level, blocks per level, levels with attention."""
    widths: tuple[int, ...] = (64, 128, 256)
    blocks: int = 2
    attn_levels: tuple[int, ...] = (1, 2)  # level indices (0 = full resolution) with self+cross-attention
    patch_size: int = 1
    heads: int = 4

    def describe(self) -> str:
        p = f", patch {self.patch_size}" if self.patch_size > 1 else ""
        return f"widths {self.widths}, {self.blocks} res blocks/level, attention at levels {self.attn_levels}{p}"


MATCHED = Arch()  # a standard config both libraries can build; parameter counts agree within 2%
# The default model's config until stage 8 (2026-12-06; stage 8 has 2 res blocks per level; docs/benchmarks.md's
# "shipped config" tables were measured on this one): 32px, patch 2, base 64, mult 1 2 2, 1 res block, attention at 8x8 and 4x4 feature maps.
SHIPPED = Arch(widths=(64, 128, 128), blocks=1, attn_levels=(1, 2), patch_size=2)
DEEP = Arch(widths=(64, 128, 128), blocks=2, attn_levels=(1, 2), patch_size=2)  # the default model, stages 8 to 12
DEEP3 = replace(DEEP, blocks=3)  # the default model since stage 13
TINY = Arch(widths=(32, 32), blocks=1, attn_levels=(1,), heads=2)  # for smoke tests
ARCHS = {"matched": MATCHED, "shipped": SHIPPED, "deep": DEEP, "deep3": DEEP3, "tiny": TINY}  # the --arch choices


def our_unet(arch: Arch, image_size: int) -> ConditionalUNet:
    res = image_size // arch.patch_size
    cfg = UNetConfig(image_size=image_size, base_channels=arch.widths[0],
                     channel_mult=tuple(w // arch.widths[0] for w in arch.widths), num_res_blocks=arch.blocks,
                     attention_resolutions=tuple(res >> i for i in arch.attn_levels), num_heads=arch.heads,
                     patch_size=arch.patch_size)
    return ConditionalUNet(cfg)


class DiffusersDenoiser(nn.Module):
    """diffusers.UNet2DConditionModel behind our model's call signature model(x, t, cond).

    Attention levels use diffusers' SimpleCrossAttn blocks (GroupNorm, q/k/v + text k/v projections, out
    projection, no feed-forward): the block of diffusers that has our attention's parameters, so the
    parameter counts match. `transformer=True` uses the Stable-Diffusion Transformer2D blocks instead
    (with a GEGLU feed-forward: about 30% more parameters). The pooled prompt embedding enters the time
    embedding through class_embed_type="projection", as ours does through `pooled_proj`; the patch size
    is the same pixel-unshuffle around the network.
    """

    def __init__(self, arch: Arch, image_size: int, transformer: bool = False):
        super().__init__()
        from diffusers import UNet2DConditionModel
        n, attn = len(arch.widths), set(arch.attn_levels)
        kind = "CrossAttn" if transformer else "SimpleCrossAttn"
        self.patch_size = arch.patch_size
        self.unet = UNet2DConditionModel(
            sample_size=image_size // arch.patch_size, in_channels=3 * arch.patch_size ** 2,
            out_channels=3 * arch.patch_size ** 2, block_out_channels=arch.widths, layers_per_block=arch.blocks,
            down_block_types=tuple(f"{kind}DownBlock2D" if i in attn else "DownBlock2D" for i in range(n)),
            up_block_types=tuple(f"{kind}UpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(n))),
            mid_block_type="UNetMidBlock2DCrossAttn" if transformer else "UNetMidBlock2DSimpleCrossAttn",
            # diffusers' naming quirk: for CrossAttn blocks attention_head_dim is the number of heads
            attention_head_dim=arch.heads if transformer else tuple(w // arch.heads for w in arch.widths),
            use_linear_projection=True, cross_attention_dim=384, resnet_time_scale_shift="scale_shift",
            class_embed_type="projection", projection_class_embeddings_input_dim=384)

    def forward(self, x, t, cond: TextCondition):
        out = self.unet(F.pixel_unshuffle(x, self.patch_size), t, encoder_hidden_states=cond.tokens,
                        class_labels=cond.pooled).sample
        return F.pixel_shuffle(out, self.patch_size)


def layout_name(memory_format: torch.memory_format) -> str:
    return "channels_last" if memory_format == torch.channels_last else "NCHW"


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def random_condition(batch: int, tokens: int = 12, seed: int = 0) -> TextCondition:
    """Prompts of `tokens` tokens each (the longest emoji names have 12), no padding."""
    g = torch.Generator().manual_seed(seed)
    return collate([(torch.randn(tokens, 384, generator=g), F.normalize(torch.randn(384, generator=g), dim=0))
                    for _ in range(batch)])


def autocast(dtype) -> object:
    return torch.autocast("cpu", dtype) if dtype not in (None, torch.float32) else nullcontext()


# --- timing ---------------------------------------------------------------------------------------------

def interleaved(fns: dict, reps: int, warmup: int = 1, min_time: float = 0.0) -> dict[str, list[float]]:
    """Run each fn in turn (A B A B ...), `reps` timed rounds after `warmup` rounds; seconds per call.

    A round repeats each fn until it has run `min_time` seconds (at least once), so fast calls get
    several iterations per sample.
    """
    times = {k: [] for k in fns}
    for r in range(warmup + reps):
        for name, fn in fns.items():
            n, start = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_time:
                    break
            if r >= warmup:
                times[name].append(elapsed / n)
    return times


def median(xs) -> float:
    return statistics.median(xs)


def ratio_of_medians(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios a/b (paired samples of interleaved runs)."""
    return statistics.median(x / y for x, y in zip(a, b))


# OpenMP's ways of waiting at a barrier that bench/threads.py and bench/sampler_threads.py compare (web.py: PASSIVE)
WAIT_POLICIES = {"OpenMP default": None, "OMP_WAIT_POLICY=PASSIVE": "PASSIVE"}


def run_child(script: str, child_args: list[str], policy: str | None, timeout_s: float = 1200) -> str:
    """stdout of `python script --child *child_args` in a process of its own, with OMP_WAIT_POLICY=policy (None:
    OpenMP's default) and torch's default thread count: OpenMP reads both only when torch loads."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update({"OMP_WAIT_POLICY": policy} if policy else {})
    cmd = [sys.executable, script, "--child", *child_args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=True).stdout


PEAK_N = 2048  # side of the square matrices matmul_peak multiplies (the notes quote it)


def matmul_peak(dtype=torch.float32, n: int = PEAK_N, seconds: float = 3.0) -> float:
    """FLOP/s of a large square matrix product: the machine's practical ceiling for our arithmetic."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# --- reporting ------------------------------------------------------------------------------------------

def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = "".join(f", {name}" for name, has in (("AVX512-BF16", "_is_avx512_bf16_supported"),
                                                   ("AMX", "_is_amx_tile_supported"))
                    if getattr(torch.cpu, has, lambda: False)())
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):  # how AMX (or all of bf16) is switched off for a process
        flags += f", ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}"
    try:
        import diffusers
        peer = f", diffusers {diffusers.__version__}"
    except ImportError:
        peer = ""
    return (f"{cpu}{flags}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}{peer}, Python {platform.python_version()}")


# What each ISA tag means in a section's title
ISA_LABELS = {"amx": "AMX", "amx-off": "AMX off", "avx512-bf16": "AVX512-BF16", "fp32": "no native bf16"}


def isa_tag() -> str:
    """The CPU's bf16 matrix units as this process may use them: "amx", "amx-off" (an AMX CPU with oneDNN capped
    below it by ONEDNN_MAX_CPU_ISA), "avx512-bf16", or "fp32" (no native bf16). Each kind of machine writes its own
    sections, so the tables of AMX, AMX off and AMD sit side by side instead of overwriting each other."""
    if not native_bf16("cpu"):
        return "fp32"
    if not getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "avx512-bf16"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return "amx" if cap in ("", "ALL", "DEFAULT") or "AMX" in cap or cap.startswith("AVX10_2") else "amx-off"


def command() -> str:
    args = " ".join(sys.argv[1:]).replace("--write", "").split()
    return "python " + " ".join(["bench/" + Path(sys.argv[0]).name, *args])


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def section(title: str, body: str, notes: str = "") -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = (f"## {title}, {ISA_LABELS[isa_tag()]}\n\n`{command()}`\n\nMachine: {machine()}; measured {when}, 1-minute load average "
            f"{LOAD_AT_START:.1f} when it started.\n\n{body}\n")
    return text + (f"\n{notes.strip()}\n" if notes else "")


def add_output_args(p) -> None:
    p.add_argument("--write", action="store_true", help="write the table into --doc")
    p.add_argument("--doc", type=Path, default=DOC, help="markdown file whose section --write replaces")


def report(args, key: str, title: str, body: str, notes: str = "") -> None:
    """Print a benchmark's tables and notes; with --write, put them into their section of --doc."""
    print(body + "\n\n" + notes)
    if args.write:
        write_section(key, section(title, body, notes), args.doc)


def write_section(key: str, text: str, path: Path = DOC) -> None:
    """Replace (or append) the block between <!-- bench:key-ISA --> markers of docs/benchmarks.md (isa_tag)."""
    key = f"{key}-{isa_tag()}"
    begin, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in doc:
        doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda m: block, doc, flags=re.S)
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)
    print(f"wrote section {key!r} of {path}")
