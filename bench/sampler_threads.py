"""Where the web app's sampling time goes besides the model: the shipped model's 4-image batch (app defaults) timed
in a plain process under OpenMP's default waiting and under OMP_WAIT_POLICY=PASSIVE (web.py's setting), with 2 and
1 torch threads on the main thread, then with 2 threads on a new thread per call, as web_results.py samples.

Each policy runs in its own child process (OpenMP reads the variable when torch loads); within it the main-thread
rows come first, because once a second thread has run torch's OpenMP loops every thread may be slower.

    python bench/sampler_threads.py [--checkpoint CKPT] [--rounds 3]
"""
import argparse
import statistics
import time

from common import WAIT_POLICIES, add_output_args, report, run_child, table  # (sets sys.path, HF offline)

WAYS = ["main thread, 2 torch threads", "main thread, 1 torch thread", "a new thread per call, 2 torch threads"]


def child(checkpoint, rounds: int) -> None:
    """Print the median seconds of a 4-image generation for each of WAYS, in that order."""
    import torch

    from pipeline import Pipeline
    from web_threads import timed_on_new_thread
    pipe = Pipeline.load(checkpoint)

    def generate(seed: int) -> None:
        pipe.generate(["red apple"] * 4, seed=seed)

    def timed(seed: int) -> float:
        start = time.perf_counter()
        generate(seed)
        return time.perf_counter() - start

    def in_new_thread(seed: int) -> float:  # as the web app samples (the same helper its thread probe uses)
        return timed_on_new_thread(lambda: generate(seed))

    timed(0)  # warm-up
    medians = []
    for threads, call in ((2, timed), (1, timed), (2, in_new_thread)):
        torch.set_num_threads(threads)
        medians.append(statistics.median(call(seed) for seed in range(1, rounds + 1)))
    print(" ".join(f"{m:.3f}" for m in medians))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="model; default: the shipped one")
    p.add_argument("--rounds", type=int, default=3, help="timed generations per way")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    add_output_args(p)
    args = p.parse_args(argv)
    if args.child:
        return child(args.checkpoint, args.rounds)
    child_args = ["--rounds", str(args.rounds)] + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
    columns = [[float(s) for s in run_child(__file__, child_args, policy).split()[-len(WAYS):]]
               for policy in WAIT_POLICIES.values()]
    rows = [[way, *(f"{col[i]:.2f}" for col in columns)] for i, way in enumerate(WAYS)]
    body = table(["sampling on", *(f"{name} s" for name in WAIT_POLICIES)], rows)
    notes = (f"The shipped model (or --checkpoint), 4 images of \"red apple\" with `Pipeline.generate`'s defaults (the "
             f"app's sampler, steps, guidance and precision), no web server; medians of {args.rounds} generations "
             "after a warm-up, each policy in its own process. web.py sets OMP_WAIT_POLICY=PASSIVE unless the "
             "environment sets it, and samples on a new thread per request.")
    report(args, "sampler-threads", "Sampling threads and OpenMP waiting (shipped model)", body, notes)


if __name__ == "__main__":
    main()
