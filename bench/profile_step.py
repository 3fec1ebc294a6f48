"""Where our training step's time goes: `torch.profiler` over `Trainer.train_step` (the step `bench/training.py`
times), its operators' self CPU time summed into a few kinds (convolutions forward and backward, GroupNorm, layout
copies, attention, matrix products, optimizer, EMA, the rest) and the slowest operators listed.

    python bench/profile_step.py --arch deep3             # the default model's config since stage 13, batch 64
"""
import tempfile
import time
from collections import defaultdict

import torch
from common import ARCHS, report, table
from torch.profiler import ProfilerActivity, profile
from training import forever, our_trainer, training_arguments

# Operator name fragments -> the kind its time is summed into; the first match wins, so specific ones come first.
KINDS = (
    ("convolution backward", ("convolution_backward",)),
    ("convolution forward", ("convolution", "conv2d")),
    ("GroupNorm", ("group_norm",)),
    ("attention (fused kernel, softmax)", ("scaled_dot_product", "flash_attention", "softmax")),
    ("optimizer (AdamW), gradient clipping", ("adamw", "_foreach_norm", "linalg_vector_norm", "clip_grad", "_foreach_mul")),
    ("EMA", ("lerp",)),
    ("matrix products", ("addmm", "::mm", "bmm", "matmul", "linear")),
    ("layout copies and casts", ("copy_", "contiguous", "clone", "_to_copy")),
    ("elementwise (SiLU, adds, scale-shift)", ("silu", "add", "mul", "sub", "div", "fill", "where", "sum", "mean")),
)


def kind_of(op: str) -> str:
    for kind, fragments in KINDS:
        if any(f in op for f in fragments):
            return kind
    return "other"


def main(argv=None) -> str:
    p = training_arguments(__doc__)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--top", type=int, default=15, help="slowest operators to list")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    trainer = our_trainer(args, ARCHS[args.arch], args.precision, tempfile.mkdtemp(prefix="bench_profile_"))
    data = forever(trainer.loader)
    batches = [next(data) for _ in range(args.reps + 1)]
    trainer.train_step(*batches[0])  # warm-up: oneDNN primitive creation, allocator
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for images, captions in batches[1:]:
            trainer.train_step(images, captions)
        wall = time.perf_counter() - start
    steps = args.reps
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]  # self times: no double counting
    by_kind = defaultdict(float)
    for e in events:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total / 1e6
    by_kind["outside aten operators (Python, autograd, profiler)"] = max(0.0, wall - sum(by_kind.values()))
    total = sum(by_kind.values())
    rows = [[k, f"{v / steps * 1e3:.1f}", f"{v / total:.0%}"] for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    body = table(["kind of operator", "ms per step", "share"], rows)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]
    body += "\n\n" + table(["operator", "calls per step", "ms per step", "share"],
                           [[f"`{e.key}`", f"{e.count / steps:.0f}", f"{e.self_cpu_time_total / steps / 1e3:.1f}",
                             f"{e.self_cpu_time_total / 1e6 / total:.0%}"] for e in top])
    notes = (f"Self CPU time of the operators over {steps} profiled steps of `Trainer.train_step` "
             f"({args.arch} config, batch {args.batch}, data `{args.data}`, precision {args.precision}); "
             "the profiler itself slows the step, so read the shares, not the milliseconds.")
    report(args, f"profile-{args.arch}", f"Where the training step's time goes ({args.arch} config)", body, notes)
    return body


if __name__ == "__main__":
    main()
