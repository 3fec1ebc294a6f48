"""What a user of `python web.py` waits for: the first streamed preview and the finished batch.

Starts web.py on 127.0.0.1 with the shipped model (or --checkpoint), then for each batch size submits
/generate through gradio_client, the app's default sampler (SDE-DPM-Solver++(2M)) at 25 steps and guidance, and times from submit to the first
output carrying a preview frame, and to the finished gallery (PNGs and GIF written). One warm-up
request, then --rounds rounds; medians. Includes the HTTP/queue round trips a browser also pays.

    python bench/web_latency.py                 # shipped model, 1 and 4 images
"""
import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import (  # first: sets sys.path, HF offline
    PEAK_N,
    add_output_args,
    matmul_peak,
    report,
    table,
)
from gradio_client import Client

from guidance import DEFAULT_GUIDANCE, describe_guidance
from models.cpu import bf16_pays_off
from samplers import DEFAULT_SAMPLER
from tests.webserver import start_server


def timed_request(client: Client, n: int, steps: int, seed: int, timeout_s: float = 300) -> tuple[float, float]:
    """(seconds to the first preview, seconds to the final gallery) for one request."""
    start = time.perf_counter()
    job = client.submit("red apple", n, steps, DEFAULT_SAMPLER, DEFAULT_GUIDANCE.scale, seed, api_name="/generate")
    first = None
    while not job.done() and time.perf_counter() - start < timeout_s:
        if first is None and any(isinstance(out[2], str) for out in job.outputs()):
            first = time.perf_counter() - start
        time.sleep(0.01)
    gallery, *_ = job.result(timeout=timeout_s)
    total = time.perf_counter() - start
    assert len(gallery) == n, f"asked for {n} images, got {len(gallery)}"
    return (first if first is not None else total), total


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="model; default: the shipped one")
    p.add_argument("--n", type=int, nargs="+", default=[1, 4], help="batch sizes")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--peak-seconds", type=float, default=3.0,
                   help="time spent measuring the matmul peak before and after the requests")
    add_output_args(p)
    args = p.parse_args(argv)
    precision, dtype = ("bf16", torch.bfloat16) if bf16_pays_off("cpu") else ("fp32", torch.float32)
    # The host's own speed, before and after: shared machines drift by up to 2x over a day, and this tells a
    # slow host from a slow model.
    peak_before = matmul_peak(dtype, seconds=args.peak_seconds) / 1e9
    rows = []
    with tempfile.TemporaryDirectory() as tmp, start_server(args.checkpoint, Path(tmp) / "out") as server:
        client = Client(server.url, verbose=False)
        timed_request(client, 1, args.steps, 0)  # warm-up: first-call allocations, caches
        for n in args.n:
            times = [timed_request(client, n, args.steps, seed) for seed in range(1, args.rounds + 1)]
            first, total = (statistics.median(t[i] for t in times) for i in (0, 1))
            rows.append([n, f"{first:.2f}", f"{total:.2f}"])
            print(rows[-1])
        threads = re.search(r"^torch threads: .*$", server.log_text(), re.M)  # its choice (web_threads.py)
    peak_after = matmul_peak(dtype, seconds=args.peak_seconds) / 1e9
    body = table(["images", "first preview s", "finished batch s"], rows)
    notes = (f"{DEFAULT_SAMPLER} (the app's default sampler), {args.steps} steps, {describe_guidance(DEFAULT_GUIDANCE)} (the app's default; conditional and "
             "unconditional halves in one batch), "
             f"the denoiser in {precision} (the app's choice here, `models.cpu.bf16_pays_off`), "
             f"prompt \"red apple\"; medians of {args.rounds} requests after a warm-up, through gradio_client "
             "against web.py on 127.0.0.1 (queue, HTTP and writing PNGs and the GIF included). "
             f"The host's {precision} matrix-product peak in this run (`bench/common.py`'s `matmul_peak`, {PEAK_N}^3): "
             f"{peak_before:.0f} GFLOP/s before the requests, {peak_after:.0f} after. The server's log: "
             f"\"{threads.group(0) if threads else 'no torch thread count'}\".")
    report(args, "web-latency", "Web app latency (shipped model)", body, notes)
    return body


if __name__ == "__main__":
    main()
