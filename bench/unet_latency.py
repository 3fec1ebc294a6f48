"""Denoiser step latency: our ConditionalUNet vs diffusers' UNet2DConditionModel at a matched config.

One forward pass (inference mode) per call; the four variants (ours / diffusers, fp32 / bf16 autocast)
run interleaved, A B C D A B C D, and each cell is the median over the rounds.

    python bench/unet_latency.py                      # matched config, 32 and 64 px, batch 1 4 16
    python bench/unet_latency.py --arch shipped --sizes 32
    python bench/unet_latency.py --peer transformer   # diffusers' Stable-Diffusion attention blocks
"""
import argparse
import copy

import torch
from common import (
    ARCHS,
    BF16_RULE,
    PEAK_N,
    DiffusersDenoiser,
    add_output_args,
    autocast,
    count_flops,
    interleaved,
    layout_name,
    matmul_peak,
    median,
    n_params,
    our_unet,
    random_condition,
    ratio_of_medians,
    section,
    table,
    write_section,
)

from models.cpu import bf16_layer_copy, native_bf16, sampling_memory_format


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="matched")
    p.add_argument("--peer", choices=["simple", "transformer"], default="simple",
                   help="diffusers attention blocks: SimpleCrossAttn (parameter-matched) or Transformer2D (SD-style)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--reps", type=int, default=7, help="timed rounds (after one warm-up round)")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds each variant runs per round (>= 1 call)")
    p.add_argument("--compile", action="store_true",
                   help="also time ours under torch.compile (inductor, frozen weights), at our default precision")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--peak-seconds", type=float, default=3.0, help="time spent measuring the bf16 matmul peak")
    add_output_args(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = ARCHS[args.arch]
    # bf16 only where it is native: emulated it runs at a fraction of fp32's speed and is no one's default there
    bf16 = torch.bfloat16 if native_bf16("cpu") else None
    ours_default = "ours bf16" if bf16 else "ours fp32"
    # the ceiling "of bf16 peak" compares with; without native bf16 it would be emulated (minutes) and no ceiling
    peak = matmul_peak(torch.bfloat16, seconds=args.peak_seconds) if bf16 else None
    rows, info, layouts = [], [], []
    for size in args.sizes:
        torch.manual_seed(0)
        ours, theirs = our_unet(arch, size).eval(), DiffusersDenoiser(arch, size, args.peer == "transformer").eval()
        for m in (ours, theirs):
            m.requires_grad_(False)
        # bf16 is how our sampler runs: in the layout Pipeline.load puts the model in on this CPU
        layout = sampling_memory_format("cpu", size // arch.patch_size)
        ours_layout = copy.deepcopy(ours).to(memory_format=layout) if bf16 else ours
        ours_sampling = bf16_layer_copy(ours_layout) if bf16 else ours  # with its weights cast once, as there
        if bf16:
            layouts.append(f"{size}px: {layout_name(layout)}")
        if args.compile:
            from torch._inductor import config as inductor_config
            inductor_config.freezing = True  # weights become constants: prepacked for oneDNN
            compiled = torch.compile(ours)
        x1, t1, c1 = torch.randn(1, 3, size, size), torch.tensor([500]), random_condition(1)
        f_ours, f_theirs = count_flops(lambda: ours(x1, t1, c1)), count_flops(lambda: theirs(x1, t1, c1))
        info.append(f"{size}px: ours {n_params(ours) / 1e6:.2f}M parameters, {f_ours / 1e9:.2f} GFLOP per image; "
                    f"diffusers {n_params(theirs) / 1e6:.2f}M parameters, {f_theirs / 1e9:.2f} GFLOP per image "
                    f"(parameters ours/diffusers {n_params(ours) / n_params(theirs):.3f})")
        print(info[-1])
        for b in args.batches:
            x, t, c = torch.randn(b, 3, size, size), torch.randint(0, 1000, (b,)), random_condition(b)

            def run(model, dtype):
                def call():
                    with autocast(dtype):
                        model(x, t, c)
                return call
            variants = {"ours fp32": run(ours, None), "diffusers fp32": run(theirs, None)}
            if bf16:
                variants |= {"ours bf16": run(ours_sampling, bf16), "diffusers bf16": run(theirs, bf16),
                             "ours bf16, weights cast per call": run(ours_layout, bf16)}
            if args.compile:
                variants["ours compiled"] = run(compiled, bf16)
            with torch.inference_mode():
                r = interleaved(variants, args.reps, warmup=1, min_time=args.min_time)
            ms = {k: f"{1e3 * median(v):.1f}" for k, v in r.items()}
            ratio = lambda a, b: f"**{ratio_of_medians(r[a], r[b]):.2f}**" if a in r and b in r else "n/a"
            rows.append([size, b, ms["ours fp32"], ms["diffusers fp32"], ratio("ours fp32", "diffusers fp32"),
                         ms.get("ours bf16", "n/a"), ms.get("diffusers bf16", "n/a"), ratio("ours bf16", "diffusers bf16"),
                         ratio(ours_default, "diffusers fp32"),
                         f"{f_ours * b / median(r['ours bf16']) / peak:.0%}" if bf16 else "n/a",
                         ratio("ours bf16, weights cast per call", "ours bf16")])
            if args.compile:
                rows[-1] += [ms["ours compiled"], ratio("ours compiled", ours_default),
                             ratio("ours compiled", "diffusers bf16" if bf16 else "diffusers fp32")]
            print(rows[-1])
    header = ["px", "batch", "ours fp32 ms", "diffusers fp32 ms", "ratio fp32", "ours bf16 ms", "diffusers bf16 ms",
              "ratio bf16", "ours default / diffusers default", "ours bf16 of bf16 peak", "weights cast once: gain"]
    header += ["ours compiled ms", "compiled / ours", "compiled / diffusers"] if args.compile else []
    body = table(header, rows)
    peer = "Transformer2D (Stable Diffusion) blocks" if args.peer == "transformer" else "SimpleCrossAttn blocks"
    notes = (f"Config: {arch.describe()}, {arch.heads} heads, cross-attention dim 384, 12-token prompts; diffusers with {peer}.\n\n"
             + "\n".join(f"- {line}" for line in info) +
             "\n\nRatios are ours/diffusers (below 1: ours is faster), medians of the per-round ratios of "
             f"{args.reps} interleaved rounds. \"bf16\" is torch.autocast(\"cpu\", bfloat16); our sampler uses it by "
             f"default {BF16_RULE} (`diffusion.sample(..., precision=\"auto\")`), diffusers runs fp32 "
             "unless told otherwise, hence the column \"ours default / diffusers default\"; on CPUs without native "
             "bf16 (emulated there, at a fraction of fp32's speed) only fp32 runs." + (
                 f" \"of bf16 peak\": our FLOPs per second in bf16 over the {peak / 1e9:.0f} GFLOP/s of a "
                 f"{PEAK_N}^3 bf16 matrix product measured in the same run." if bf16 else "") + (
                 f" Ours in bf16 runs in the memory layout our sampler puts the model in on this CPU "
                 f"(`models.cpu.sampling_memory_format`: {', '.join(layouts)}), in fp32 in NCHW; with its convolution "
                 "and linear weights cast to bf16 once, as `Pipeline.sampling_model` does (`models.cpu.bf16_layer_copy`: "
                 "the same outputs bit for bit). \"weights cast once: gain\": the same model with fp32 weights that "
                 "autocast casts at every call, over it, interleaved in the same rounds." if layouts else "") + (
                 " \"compiled\": ours under torch.compile at our default precision, against ours and diffusers at the "
                 "same precision; its compilation (tens of seconds per shape) happens in the warm-up round."
                 if args.compile else ""))
    print(body + "\n\n" + notes)
    if args.write:
        key = f"latency-{args.arch}" + ("-transformer" if args.peer == "transformer" else "") + \
            ("-compile" if args.compile else "")
        write_section(key, section(f"Denoiser step latency ({args.arch} config"
                                   + (", SD-style peer" if args.peer == "transformer" else "") + ")", body, notes),
                      args.doc)
    return body


if __name__ == "__main__":
    main()
