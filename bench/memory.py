"""Peak memory (resident set size) of generation and training, each a fresh `python sample.py` or `python train.py` process.

    python bench/memory.py             # shipped model settings: sample --n 8 / 16, train --batch-size 64

The peak is the child's ru_maxrss (os.wait4): everything the process held at its worst moment, Python,
torch and the text encoder included. The first row is that floor: a process that imports the
pipeline and loads the text encoder, nothing else. Generation uses a randomly initialised model of
the shipped config (weights do not change memory or speed), written to a temporary safetensors file.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DEEP, ROOT, SHIPPED, TINY, add_output_args, our_unet, section, table, write_section

from checkpoints import save_weights

ARCHS = {"shipped": SHIPPED, "deep": DEEP, "tiny": TINY}


def peak_rss(cmd: list[str], log: Path) -> tuple[float, float]:
    """(peak resident MiB, wall seconds) of a child process; raises if it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def arch_flags(arch, size: int) -> list[str]:
    res = size // arch.patch_size
    return ["--image-size", str(size), "--patch-size", str(arch.patch_size), "--base-channels", str(arch.widths[0]),
            "--channel-mult", *[str(w // arch.widths[0]) for w in arch.widths], "--num-res-blocks", str(arch.blocks),
            "--attention-resolutions", *[str(res >> i) for i in arch.attn_levels], "--num-heads", str(arch.heads),
            "--dropout", "0"]


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="shipped")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--n", type=int, nargs="*", default=[8, 16], help="images per `sample` run (8: its default)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--data", default="emoji")
    p.add_argument("--cache-dir", default="data")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure a process that only loads the text encoder")
    p.add_argument("--train-precisions", nargs="*", default=["auto", "fp32"], choices=["auto", "fp32", "bf16"])
    add_output_args(p)
    args = p.parse_args(argv)
    arch, py = ARCHS[args.arch], sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    model = our_unet(arch, args.size)
    checkpoint = tmp / "model.safetensors"
    save_weights(model.state_dict(), {"config": {"unet": model.cfg.to_dict(), "schedule": "cosine", "timesteps": 1000},
                                      "info": {"dataset": "random weights"}}, checkpoint)
    runs = [("floor: import, load the text encoder",
             [py, "-c", "from pipeline import Pipeline; from models.text_encoder import TextEncoder; TextEncoder()"])]
    runs = runs if args.floor else []
    for n in args.n:
        runs.append((f"`sample --n {n} --steps {args.steps}` (DPM-Solver++, guidance 3)",
                     [py, "sample.py", "--checkpoint", str(checkpoint), "--prompt", "a red apple",
                      "--n", str(n), "--steps", str(args.steps), "--sampler", "dpmpp", "--out-dir", str(tmp / f"samples{n}")]))
    for prec in args.train_precisions:
        runs.append((f"`train --batch-size {args.batch} --precision {prec}`",
                     [py, "train.py", "--data", args.data, "--cache-dir", args.cache_dir,
                      *arch_flags(arch, args.size), "--batch-size", str(args.batch), "--precision", prec,
                      "--max-steps", str(args.train_steps), "--sample-every", "0", "--out-dir", str(tmp / f"run_{prec}")]))
    rows = []
    for name, cmd in runs:
        mib, seconds = peak_rss(cmd, tmp / "log.txt")
        rows.append([name, f"{mib:.0f}", f"{seconds:.1f}"])
        print(rows[-1])
    body = table(["process", "peak RSS MiB", "wall s"], rows)
    notes = (f"Model: the shipped config ({arch.describe()}, {args.size}px, "
             f"{model.num_parameters() / 1e6:.2f}M parameters). Training runs {args.train_steps} optimizer steps "
             f"on `{args.data}` with the shipped model's flags (`--precision auto` is bf16 autocast on CPUs with native "
             "bf16); its wall time includes loading the data set and writing a checkpoint.")
    print(body + "\n\n" + notes)
    if args.write:
        write_section(f"memory-{args.arch}", section("Peak memory", body, notes), args.doc)
    return body


if __name__ == "__main__":
    main()
