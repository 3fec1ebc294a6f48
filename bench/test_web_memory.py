"""Memory under raw API clients: each call without a session is a new Gradio session, and Gradio keeps a copy of
the page's config per session, some 40 KB (web.MAX_SESSIONS bounds them; Gradio kept 10,000). What remains is
Gradio's own: an LRU of 2,000 per-session message queues filling, and the names of cached result files until
its cache cleanup. Against a real server on 127.0.0.1. It takes 12 to 15 minutes on 2 cores, so it is a
benchmark (`python -m pytest -q -s bench/test_web_memory.py`), not part of the test run."""
import time

import httpx
import pytest

from tests.test_web_faults import python_heap_mb
from tests.webserver import start_server, tiny_model

WARM_UP, MEASURED, TIME_LIMIT_S = 400, 2000, 1500
MAX_KB_PER_CALL = 12  # measured 6.9 and 7.0 after the warm-up; 70 while Gradio kept 10,000 sessions


def raw_calls(url: str, count: int, deadline: float) -> None:
    """`count` identical raw calls (POST, then read the result stream), each a new session."""
    with httpx.Client(timeout=60) as http:
        for _ in range(count):
            assert time.monotonic() < deadline, "the raw calls took too long"
            event = http.post(url + "gradio_api/call/generate", json={"data": ["sun", 1, 1, "ddim", 3, 0, ""]})
            assert "event: complete" in http.get(url + f"gradio_api/call/generate/{event.json()['event_id']}").text


@pytest.mark.slow
def test_memory_grows_little_across_thousands_of_raw_api_calls(tmp_path):
    probe = tmp_path / "heap.txt"
    with start_server(tiny_model(tmp_path / "tiny.safetensors"), tmp_path / "out", script="tests/memory_probe.py",
                      env={"MEMORY_PROBE_FILE": str(probe)}) as srv:
        deadline = time.monotonic() + TIME_LIMIT_S
        raw_calls(srv.url, WARM_UP, deadline)  # caches, pools and MAX_SESSIONS sessions filled
        heap0 = python_heap_mb(srv, probe)
        raw_calls(srv.url, MEASURED, deadline)
        heap1 = python_heap_mb(srv, probe)
        per_call_kb = (heap1 - heap0) * 1024 / MEASURED
        print(f"\nPython heap across {MEASURED} raw calls: {heap0:.1f} -> {heap1:.1f} MB ({per_call_kb:.1f} KB a call)")
        assert per_call_kb < MAX_KB_PER_CALL, (heap0, heap1)
        assert "Traceback" not in srv.log_text(), srv.log_text()[-3000:]
