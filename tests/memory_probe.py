"""`python tests/memory_probe.py <web.py flags>`: web.py with its Python heap traced, for the load test.

On SIGUSR1 the server collects garbage and writes the bytes its Python objects hold to $MEMORY_PROBE_FILE:
far less noisy than the process's resident size, so a leak of a few kilobytes per request shows.
"""
import gc
import os
import signal
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import web  # noqa: E402  (after the path fix)


def report(*_) -> None:
    gc.collect()
    out = Path(os.environ["MEMORY_PROBE_FILE"])
    out.with_suffix(".tmp").write_text(str(tracemalloc.get_traced_memory()[0]))
    out.with_suffix(".tmp").replace(out)  # the test never reads half a number


if __name__ == "__main__":
    tracemalloc.start()  # after the imports: only what serving allocates is traced, at little cost
    signal.signal(signal.SIGUSR1, report)
    web.main()
