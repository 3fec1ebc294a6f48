"""The web app's denoiser call when another process keeps one core busy: OpenMP's default (spin, then sleep) against
OMP_WAIT_POLICY=PASSIVE, which web.py sets unless the user has set it.

Each setting runs in its own child process (OpenMP reads the variable when torch loads it), with torch's default
thread count, on the shipped model at the web app's 4-image batch (8 rows: the conditional and unconditional
halves of guidance), idle and beside `--busy` one-thread torch processes that multiply matrices without pause, as
a training run with OMP_NUM_THREADS=1 would (default: one per core but one). The rounds interleave the settings;
medians.

    python bench/threads.py                     # shipped model, batch 8
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

from common import (  # first: sets sys.path, HF offline
    WAIT_POLICIES,
    add_output_args,
    random_condition,
    report,
    run_child,
    table,
)

BUSY = "import torch\ntorch.set_num_threads(1)\na = torch.randn(256, 256)\nwhile True:\n    a @ a"


def child(checkpoint, batch: int, calls: int) -> None:
    """Print the median milliseconds of one denoiser call (after warm-up calls)."""
    import torch

    from pipeline import load_model
    model, _, _ = load_model(checkpoint)
    size = model.cfg.image_size
    x, t = torch.randn(batch, model.cfg.in_channels, size, size), torch.randint(0, 1000, (batch,))
    cond = random_condition(batch)
    times = []
    with torch.inference_mode():
        for _ in range(calls + 3):
            start = time.perf_counter()
            model(x, t, cond)
            times.append(time.perf_counter() - start)
    print(f"{1000 * statistics.median(times[3:]):.2f}")


def timed(policy, args) -> float:
    child_args = ["--batch", str(args.batch), "--calls", str(args.calls)]
    child_args += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    return float(run_child(__file__, child_args, policy, timeout_s=600).split()[-1])


def measure(args, busy: int) -> list[float]:
    """Median ms per setting with `busy` busy torch processes running."""
    loads = [subprocess.Popen([sys.executable, "-c", BUSY], env={**os.environ, "OMP_NUM_THREADS": "1"})
             for _ in range(busy)]
    try:
        runs = {name: [] for name in WAIT_POLICIES}
        for _ in range(args.rounds):
            for name, policy in WAIT_POLICIES.items():
                runs[name].append(timed(policy, args))
        return [statistics.median(runs[name]) for name in WAIT_POLICIES]
    finally:
        for p in loads:
            p.kill()
            p.wait()


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="model; default: the shipped one")
    p.add_argument("--batch", type=int, default=8, help="rows per call (8: the web app's 4 images with guidance)")
    p.add_argument("--calls", type=int, default=20, help="timed calls per child process")
    p.add_argument("--rounds", type=int, default=3, help="child processes per setting and load")
    p.add_argument("--busy", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="busy processes beside it")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    add_output_args(p)
    args = p.parse_args(argv)
    if args.child:
        child(args.checkpoint, args.batch, args.calls)
        return ""
    rows = []
    for label, busy in (("idle", 0), (f"{args.busy} busy torch process{'es' * (args.busy > 1)}", args.busy)):
        default_ms, passive_ms = measure(args, busy)
        rows.append([label, f"{default_ms:.1f}", f"{passive_ms:.1f}", f"**{default_ms / passive_ms:.2f}x**"])
        print(rows[-1])
    body = table(["other cores", "OpenMP default ms", "PASSIVE ms", "PASSIVE speed"], rows)
    notes = (f"One fp32 denoiser call (no autocast) of the shipped model at batch {args.batch}, torch's default "
             f"thread count, medians of {args.calls} calls in each of {args.rounds} child processes per setting, "
             "settings interleaved. web.py sets OMP_WAIT_POLICY=PASSIVE unless the environment sets it.")
    report(args, "threads", "OpenMP waiting beside a busy core (shipped model)", body, notes)
    return body


if __name__ == "__main__":
    main()
