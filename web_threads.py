"""The torch thread count the web app samples with: the fastest of a few, timed at the server's start on the app's
own work (a short 4-image generation on a new thread, as web_results samples), unless OMP_NUM_THREADS names one.

Why measure: web.py lets OpenMP's threads sleep between parallel regions (OMP_WAIT_POLICY=PASSIVE, so that a busy
neighbour does not slow sampling 2x), and a team of threads then pays a wake-up at every one of a step's many small
regions. On a 2-core AMD EPYC the shipped model's 4 images took 2.82 and 2.90 s with the one thread this probe
chose there against 3.75 s with two (`python bench/web_latency.py`, then with `OMP_NUM_THREADS=2`; model card,
"Next steps"). Where the matrix work outweighs the wake-ups (a larger model, AMX, more cores) more threads may win;
so the server measures rather than assumes.
"""
import functools
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch

PROBE_STEPS = 4  # sampler steps per timed generation: a step's cost is what differs, the rest is alike
PROBE_ROUNDS = 3  # timed generations per count (medians), after one warm-up each


def thread_counts(cores: int) -> list[int]:
    """Counts worth timing on `cores` cores: 1, 2, 4, ... below `cores`, and `cores` itself."""
    counts, n = [], 1
    while n < cores:
        counts.append(n)
        n *= 2
    return counts + [max(cores, 1)]


def timed_on_new_thread(call: Callable[[], object], clock=time.perf_counter) -> float:
    """Seconds `call()` takes on a new thread (which starts with torch's current thread count); its error re-raised."""
    result = {}

    def run() -> None:
        try:
            start = clock()
            call()
            result["seconds"] = clock() - start
        except BaseException as error:  # noqa: BLE001 (re-raised on the caller's thread)
            result["error"] = error

    worker = threading.Thread(target=run, name="thread-probe")
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["seconds"]


def fastest_thread_count(call: Callable[[], object], counts: list[int], rounds: int = PROBE_ROUNDS,
                         clock=time.perf_counter) -> tuple[int, dict[int, float]]:
    """The count in `counts` under which `call()`, on a new thread, takes the least median time, and the medians.
    Rounds alternate the counts, so a change of load hits them alike; the first round only warms up (oneDNN builds
    its kernels at first use). Ties go to the earlier count. Leaves torch's thread count at the one chosen."""
    seconds = {n: [] for n in counts}
    for round_ in range(rounds + 1):
        for n in counts:
            torch.set_num_threads(n)
            took = timed_on_new_thread(call, clock)
            if round_:
                seconds[n].append(took)
    medians = {n: statistics.median(times) for n, times in seconds.items()}
    best = min(counts, key=lambda n: medians[n])
    torch.set_num_threads(best)
    return best, medians


def choose_sampling_threads(pipe, environ=os.environ, log=functools.partial(print, flush=True)) -> int:
    """Set and return the torch thread count `pipe` samples with in the web app: OMP_NUM_THREADS where set, the
    current one off the CPU, else the fastest of thread_counts() for 4 images of the app's sampler."""
    if next(pipe.model.parameters()).device.type != "cpu":
        return torch.get_num_threads()
    if environ.get("OMP_NUM_THREADS", "").strip():
        log(f"torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS)")
        return torch.get_num_threads()
    counts = thread_counts(torch.get_num_threads())
    if len(counts) == 1:
        log(f"torch threads: {counts[0]} (one core)")
        return counts[0]
    best, medians = fastest_thread_count(lambda: pipe.generate(["a probe"] * 4, steps=PROBE_STEPS), counts)
    timings = ", ".join(f"{n}: {s:.3f} s" for n, s in medians.items())
    log(f"torch threads: {best}, the fastest for 4 images of {PROBE_STEPS} steps ({timings}; "
        "OMP_NUM_THREADS sets it instead)")
    return best
