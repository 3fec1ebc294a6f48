"""The web app under bad input, departing clients, load and attack, against real servers on 127.0.0.1."""
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

import web
from tests.webserver import REPO, assert_stopped_early, start_server, tiny_model
from web_checks import InputError, parse_request
from web_guard import WebGuard

# every refusal names the input and what is accepted
CLEAR_MESSAGES = re.compile(r"the prompt is empty|the prompt must be text|number of images must be a whole number "
                            r"from 1 to 16|steps must be a whole number from 1 to 200|sampler must be one of "
                            r"dpmpp_sde, dpmpp, ddim, ddpm|guidance scale must be a number from 0 to 20|seed must be a whole "
                            r"number from -1 to 2147483647")
SECRET = "TOP SECRET: must never be served"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("webfaults")
    (root / "secret.txt").write_text(SECRET)  # beside the output folder: the classic traversal target
    with start_server(tiny_model(root / "tiny.safetensors"), root / "out") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False)


def generate(client, *args, timeout=120):
    return client.submit(*args, api_name="/generate").result(timeout=timeout)


def assert_serving(client):
    gallery, *_ = generate(client, "sun", 1, 2, "dpmpp", 3.0, 0)
    assert len(gallery) == 1


# --- bad input ---------------------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)  # lone surrogates cannot be sent as JSON
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 12, 10 ** 12), TEXT,
                 st.floats(allow_nan=False, allow_infinity=False),  # NaN/inf are not JSON: sent as text below
                 st.sampled_from(["nan", "inf", "-inf", "1e400", "0x10", "", "1/2"]),
                 st.lists(st.integers(0, 9), max_size=2), st.dictionaries(st.sampled_from(["a", "path"]), TEXT, max_size=1))
# per argument: values the server must accept (edges and odd spellings included), and values it must refuse
VALID = {
    "prompt": st.one_of(TEXT.map(lambda t: "sun " + t),
                        st.sampled_from(["🍎 red apple 🍎", "a\u202eb\u200d", "red\x00\x1b apple", "red apple " * 300])),
    "n": st.one_of(st.integers(1, 3), st.sampled_from([16, "2", 2.0, " 1 ", "\u0663"])),
    "steps": st.one_of(st.integers(1, 4), st.sampled_from([200, "3", 3.0, "1e0"])),
    "sampler": st.sampled_from(["dpmpp_sde", "dpmpp", "ddim"]),  # ddpm always runs 1000 steps: tested apart
    "guidance": st.one_of(st.floats(0, 20), st.sampled_from(["2.5", 0, 20, " 7 ", -0.0, "-0", 5e-324, "4.9e-324"])),
    "seed": st.one_of(st.integers(-1, 2 ** 31 - 1), st.sampled_from(["", " 42 ", None, "-1", 5.0, -0.0, "-0"])),
}
INVALID = {
    "prompt": st.one_of(st.sampled_from(["", " \t\n ", "\x00\x07\x1b", "\u200b"]), JUNK.filter(lambda v: not isinstance(v, str))),
    "n": st.one_of(st.integers(-5, 0), st.integers(17, 10 ** 9), st.sampled_from([1.5, "two", "nan", "inf", True, [2], 2 ** 64, 5e-324])),
    "steps": st.one_of(st.integers(-5, 0), st.integers(201, 10 ** 9), st.sampled_from([2.5, "many", None, "-inf", {}])),
    "sampler": st.one_of(st.sampled_from(["euler", "DDIM", "", "ddim ", None, 3]), TEXT.filter(lambda t: t not in ("dpmpp_sde", "dpmpp", "ddim", "ddpm"))),
    "guidance": st.one_of(st.floats(-1e6, -1e-6), st.floats(20.001, 1e9),
                          st.sampled_from(["nan", "inf", "lots", None, [1], 10 ** 400, -10 ** 400, True, -5e-324])),
    "seed": st.one_of(st.integers(-10 ** 6, -2), st.integers(2 ** 31, 2 ** 40),
                      st.sampled_from(["abc", 1.5, "1e400", True, [0], 2 ** 63, 2 ** 64, -2 ** 63 - 1, 10 ** 400])),
}
FIELD_OF_MESSAGE = {"prompt": "prompt", "number of images": "n", "steps": "steps", "sampler": "sampler",
                    "guidance": "guidance", "seed": "seed"}


@st.composite
def api_calls(draw) -> tuple[dict, set]:
    """Arguments of one /generate call with up to two of them broken, and which ones are."""
    broken = draw(st.sets(st.sampled_from(list(VALID)), max_size=2))
    return {k: draw(INVALID[k] if k in broken else VALID[k]) for k in VALID}, broken


def test_fuzzed_generate_calls_get_images_or_a_clear_message_and_no_traceback(client, server):
    log_from = len(server.log_text())

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(call=api_calls())
    def one_call(call):
        args, broken = call
        try:
            gallery, gif, _, status = generate(client, *args.values())
        except AppError as error:
            found = CLEAR_MESSAGES.search(str(error))
            assert found, f"unclear refusal: {error}"
            field = next(f for text, f in FIELD_OF_MESSAGE.items() if text in found.group(0))
            assert field in broken, f"refused {field}, which was valid: {args}"
            event(f"refused: {field}")
            return
        assert not broken, f"accepted invalid {broken}: {args}"
        event("generated")
        done = re.match(r"Done: (\d+) image\(s\) of “(.*)”, seed (\d+), (\w+), (\d+) steps, guidance", status, re.S)
        assert done, status
        count, shown_prompt, _, used_sampler, used_steps = done.groups()
        assert len(gallery) == int(count) == int(float(str(args["n"]).strip()))
        assert int(used_steps) == int(float(str(args["steps"]).strip())) and used_sampler == args["sampler"]
        assert shown_prompt.strip() and shown_prompt.isprintable() and Path(gif).is_file()

    one_call()
    assert_serving(client)
    log = server.log_text(log_from)
    assert "Traceback" not in log and "generation failed" not in log, log[-3000:]


def test_long_prompt_is_truncated_and_the_page_says_so(client):
    *_, status = generate(client, "a red apple on a wooden table " * 40, 1, 2, "dpmpp", 3.0, 0)
    assert status.startswith("Done") and "reads only the first 64 tokens of the prompt; the rest is ignored" in status
    *_, status = generate(client, "x" * (web.MAX_PROMPT_CHARS + 500), 1, 2, "dpmpp", 3.0, 0)
    assert f"prompt cut to its first {web.MAX_PROMPT_CHARS} characters" in status


def test_control_characters_are_dropped_and_emoji_kept(client):
    gallery, *_ = generate(client, "red\x00 apple\x1b[31m 🍎\u200b", 1, 2, "dpmpp", 3.0, 0)
    with Image.open(gallery[0]["image"]) as img:
        prompt = img.text["prompt"]
    assert "🍎" in prompt and prompt.startswith("red apple") and prompt.isprintable()


NUMBER_EDGES = [10 ** 400, -10 ** 400, 10 ** 5000, 2 ** 63, 2 ** 64, -2 ** 63 - 1, 1e308, -0.0, "-0", 5e-324, -5e-324,
                "4.9e-324", "1e400", "-1e400", "1" + "0" * 400, True, False]


def test_numbers_beyond_float_or_int64_range_negative_zero_and_subnormals_are_checked():
    for value in NUMBER_EDGES:
        for field in range(1, 6):  # n, steps, sampler, guidance, seed
            args = ["sun", 1, 2, "dpmpp", 3.0, 0]
            args[field] = value
            try:
                req = parse_request(*args)
            except InputError as error:
                assert CLEAR_MESSAGES.search(str(error)) and len(str(error)) < 200, (field, str(error))
                continue
            assert math.isfinite(req.guidance) and 0 <= req.guidance <= 20 and 0 <= req.seed < 2 ** 31, (field, value)
            assert str(req.guidance) != "-0.0", "negative zero is made zero"
    assert parse_request("sun", 1, 2, "dpmpp", "-0", "-0").guidance == 0.0


def test_an_overflowing_number_in_raw_json_gets_a_message_not_a_null_error(client, server):
    log_from = len(server.log_text())
    for body in ('{"data": ["sun", 1, 2, "dpmpp", 1%s, 0, ""]}' % ("0" * 400), '{"data": ["sun", 1, 2, "dpmpp", 1e400, 0, ""]}',
                 '{"data": ["sun", 1, 2, "dpmpp", 3, 18446744073709551616, ""]}'):
        r = httpx.post(server.url + "gradio_api/call/generate", content=body, headers={"content-type": "application/json"})
        events = httpx.get(server.url + f"gradio_api/call/generate/{r.json()['event_id']}", timeout=60).text
        assert "event: error" in events and CLEAR_MESSAGES.search(events), events[-300:]
    assert "Traceback" not in server.log_text(log_from) and "OverflowError" not in server.log_text(log_from)
    assert_serving(client)


# --- a client that leaves ----------------------------------------------------------------------------

DEPARTING_CLIENT = """
import sys, time
from gradio_client import Client
job = Client(sys.argv[1], verbose=False).submit("sun", 16, 200, "ddpm", 3.0, 0, api_name="/generate")
deadline = time.monotonic() + 120
while len(job.outputs()) < 3 and time.monotonic() < deadline:  # until it is really sampling
    time.sleep(0.05)
print("sampling", flush=True)
time.sleep(300)
"""


def test_a_client_killed_mid_generation_frees_its_worker(client, server):
    log_from = len(server.log_text())
    proc = subprocess.Popen([sys.executable, "-c", DEPARTING_CLIENT, server.url], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "sampling"
    finally:
        proc.kill()  # like a closed laptop: no cancel request, the connection just drops
        proc.wait(timeout=30)
    assert_serving(client)  # 16 images x 1000 DDPM steps would hold the only worker for minutes
    assert_stopped_early(server, 1000, log_from)


# --- security defaults -------------------------------------------------------------------------------

class LaunchRecorder:
    def __init__(self):
        self.kwargs = None

    def launch(self, **kwargs):
        self.kwargs = kwargs


def launch_flags(monkeypatch, tmp_path, *argv) -> dict:
    class FakePipe:
        info = {"path": "tiny", "parameters": 1}
    recorder, pipe, probed = LaunchRecorder(), FakePipe(), []
    monkeypatch.setattr(web.Pipeline, "load", staticmethod(lambda *a, **k: pipe))
    monkeypatch.setattr(web, "build_app", lambda *a, **k: recorder)
    monkeypatch.setattr(web, "choose_sampling_threads", probed.append)  # the thread probe: tests/test_web_threads.py
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    web.main(["--out-dir", str(tmp_path / "out"), *argv])
    assert probed == [pipe]  # the loaded model's thread count was chosen, once
    return recorder.kwargs


def test_defaults_listen_locally_share_nothing_and_serve_only_the_output_folder(monkeypatch, tmp_path):
    flags = launch_flags(monkeypatch, tmp_path)
    assert flags["server_name"] == "127.0.0.1" and flags["share"] is False and flags["auth"] is None
    out = (tmp_path / "out").resolve()
    assert flags["allowed_paths"] == [str(out)] and flags["show_error"] is False and flags["max_file_size"] == "1mb"
    # Gradio's cache, where uploads land, is not inside an allowed path (Gradio would serve them inline as pages)
    assert os.environ["GRADIO_TEMP_DIR"] == str(out.with_name("out-cache"))
    guard = flags["app_kwargs"]["middleware"][0]
    assert guard.cls is WebGuard and guard.kwargs["served"] == [out, out.with_name("out-cache") / "results"]
    flags = launch_flags(monkeypatch, tmp_path, "--host", "0.0.0.0", "--share", "--auth", "ann:pw:with:colons")
    assert (flags["server_name"], flags["share"], flags["auth"]) == ("0.0.0.0", True, ("ann", "pw:with:colons"))
    for bad in ("ann", "ann:", ":pw"):
        with pytest.raises(SystemExit, match="--auth takes user:password"):
            launch_flags(monkeypatch, tmp_path, "--auth", bad)


def outside_address() -> str | None:
    """This machine's address on its network, if it has one (a UDP 'connect' sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_server_is_not_reachable_from_the_network(server):
    address = outside_address()
    if address is None:
        pytest.skip("this machine has no network address besides loopback")
    port = int(server.url.rsplit(":", 1)[1].strip("/"))
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # reachable locally...
    with pytest.raises(OSError):  # ...but not on the network address
        socket.create_connection((address, port), timeout=5).close()


def test_no_file_outside_the_output_folder_is_served(client, server):
    gallery, *_ = generate(client, "sun", 1, 2, "dpmpp", 3.0, 0)
    result = httpx.post(server.url + "gradio_api/call/generate", json={"data": ["sun", 1, 2, "dpmpp", 3.0, 0, ""]})
    stream = httpx.get(server.url + f"gradio_api/call/generate/{result.json()['event_id']}", timeout=120).text
    served = re.findall(r'"url": "([^"]+)"', stream)
    assert served and httpx.get(served[0]).status_code == 200  # the probe can tell a served file
    out = server.log.parent / "out"
    assert all(re.search(rf"file={re.escape(str(out.resolve()))}(-cache)?/", url) for url in served), served
    root = server.log.parent
    targets = ["/etc/passwd", str(root / "secret.txt"), f"{out.resolve()}/../secret.txt",
               f"{out.resolve()}-cache/../secret.txt", str(root / "tiny.safetensors"), str(REPO / "web.py"),
               "web.py", "../secret.txt", "README.md", str(server.log)]
    for target in targets:
        for route in ("gradio_api/file=", "file=", "gradio_api/file/", "gradio_api/static/", "static/", "assets/"):
            for form in (target, quote(target, safe=""), target.replace("..", "%2e%2e")):
                r = httpx.get(server.url + route + form, timeout=10)
                leaked = SECRET in r.text or "root:" in r.text or "def main" in r.text or "model:" in r.text
                assert r.status_code >= 400 and not leaked, (route + form, r.status_code, r.text[:200])


def test_malformed_api_calls_are_refused_and_nothing_outside_is_copied_in(client, server):
    secret = str(server.log.parent / "secret.txt")
    file_ref = {"path": secret, "meta": {"_type": "gradio.FileData"}}
    bad_bodies = [{"data": [file_ref, 1, 2, "dpmpp", 3.0, 0, ""]}, {"data": ["sun", file_ref, 2, "dpmpp", 3.0, 0, ""]},
                  {"data": ["sun"]}, {"data": []}, {"data": "sun"}, {"nothing": 1}]
    for body in bad_bodies:
        r = httpx.post(server.url + "gradio_api/call/generate", json=body, timeout=30)
        if r.status_code == 200:
            events = httpx.get(server.url + f"gradio_api/call/generate/{r.json()['event_id']}", timeout=60).text
            assert "event: error" in events and SECRET not in events, events[-500:]
        else:
            assert r.status_code == 422, r.text
    copies = subprocess.run(["grep", "-rl", SECRET, str(server.log.parent / "out")], capture_output=True, text=True)
    assert copies.stdout == ""
    assert_serving(client)


def test_auth_refuses_unauthenticated_calls(tmp_path):
    with start_server(tiny_model(tmp_path / "tiny.safetensors"), tmp_path / "out", "--auth", "ann:s3cret") as srv:
        call = httpx.post(srv.url + "gradio_api/call/generate", json={"data": ["sun", 1, 2, "dpmpp", 3.0, 0, ""]})
        assert call.status_code in (401, 403), call.text
        for path in ("config", "gradio_api/info", "gradio_api/queue/status"):
            assert httpx.get(srv.url + path).status_code in (401, 403), path
        for auth in (None, ("ann", "wrong")):
            with pytest.raises(Exception):
                Client(srv.url, auth=auth, verbose=False)
        authed = Client(srv.url, auth=("ann", "s3cret"), verbose=False)
        gallery, *_ = generate(authed, "sun", 1, 2, "dpmpp", 3.0, 0)
        assert len(gallery) == 1


# --- load ----------------------------------------------------------------------------------------------

USERS, REQUESTS_EACH, QUEUE = 20, 2, 4


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def python_heap_mb(server, probe: Path) -> float:
    probe.unlink(missing_ok=True)
    server.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 60
    while not probe.exists():
        assert time.monotonic() < deadline, "memory probe did not answer"
        time.sleep(0.1)
    return int(probe.read_text()) / 2 ** 20


def one_user(client, index: int, barrier, outcomes: list) -> None:
    barrier.wait(timeout=120)
    for j in range(REQUESTS_EACH):
        try:
            gallery, *_, status = generate(client, f"user {index} request {j}", 1, 30, "ddim", 3.0, j)
            outcomes.append("done" if len(gallery) == 1 and status.startswith("Done") else f"bad result {status}")
        except QueueError:
            outcomes.append("busy")
        except Exception as error:  # anything else is a request lost or garbled
            outcomes.append(f"error {error!r}")


def watch_queue(url: str, stop: threading.Event, sizes: list) -> None:
    with httpx.Client(timeout=5) as http:
        while not stop.is_set():
            sizes.append(http.get(url + "gradio_api/queue/status").json()["queue_size"])
            time.sleep(0.05)


def serve_many(clients, prompts: list[str], total: int) -> int:
    """`total` requests spread over the clients, retrying a busy answer; returns how many were busy."""
    busy, lock, jobs = [0], threading.Lock(), iter(range(total))

    def work(client):
        for k in iter(lambda: next(jobs, None), None):
            for _ in range(50):
                try:
                    gallery, *_ = generate(client, prompts[k % len(prompts)], 1, 1, "dpmpp", 3.0, k)
                    assert len(gallery) == 1
                    break
                except QueueError:
                    with lock:
                        busy[0] += 1
                    time.sleep(0.2)
            else:
                raise AssertionError("request never admitted")
    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    [t.start() for t in threads]
    [t.join(timeout=600) for t in threads]
    assert not any(t.is_alive() for t in threads)
    return busy[0]


@pytest.mark.slow
def test_twenty_users_at_once_then_memory_flat_across_120_requests(tmp_path):
    probe = tmp_path / "heap.txt"
    with start_server(tiny_model(tmp_path / "tiny.safetensors"), tmp_path / "out", "--max-queue", str(QUEUE),
                      script="tests/memory_probe.py", env={"MEMORY_PROBE_FILE": str(probe)}) as srv:
        clients = [Client(srv.url, verbose=False) for _ in range(USERS)]
        outcomes, sizes, stop = [], [], threading.Event()
        barrier = threading.Barrier(USERS)
        watcher = threading.Thread(target=watch_queue, args=(srv.url, stop, sizes))
        users = [threading.Thread(target=one_user, args=(c, i, barrier, outcomes)) for i, c in enumerate(clients)]
        watcher.start()
        [u.start() for u in users]
        [u.join(timeout=600) for u in users]
        stop.set()
        watcher.join(timeout=30)
        assert not any(u.is_alive() for u in users), "a request never returned"
        done, busy = outcomes.count("done"), outcomes.count("busy")
        assert done + busy == len(outcomes) == USERS * REQUESTS_EACH, [o for o in outcomes if o not in ("done", "busy")]
        assert done >= QUEUE and busy >= 1, outcomes  # some were served, the queue limit turned the rest away
        assert sizes and max(sizes) <= QUEUE, max(sizes)

        prompts = [f"a red fish number {k}" for k in range(20)]
        serve_many(clients[:4], prompts, 20)  # warm-up: every prompt encoded, caches and pools filled
        heap0, rss0 = python_heap_mb(srv, probe), rss_mb(srv.proc.pid)
        serve_many(clients[:4], prompts, 120)
        heap1, rss1 = python_heap_mb(srv, probe), rss_mb(srv.proc.pid)
        print(f"\n{done} done, {busy} busy, max queue {max(sizes)}; across 120 requests: Python heap "
              f"{heap0:.1f} -> {heap1:.1f} MB, resident {rss0:.0f} -> {rss1:.0f} MB")
        assert heap1 - heap0 < 2.0, (heap0, heap1)  # the old per-request leak was ~9 MB per 200 requests
        assert rss1 - rss0 < 50, (rss0, rss1)  # resident size is noisy (allocator arenas): a coarse bound
        assert "Traceback" not in srv.log_text(), srv.log_text()[-3000:]
