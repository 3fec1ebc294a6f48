"""The web app's HTTP edges against real servers on 127.0.0.1: uploads never served back as pages, request
bodies capped, a huge prompt cheap, and with --auth no API description before login and throttled guessing."""
import io
import json
import math
import re
import time
from types import SimpleNamespace

import httpx
import pytest
from gradio_client import Client
from PIL import Image

import web_checks
from tests.webserver import start_server, tiny_model
from web_checks import MAX_PROMPT_CHARS, READ_PROMPT_CHARS, parse_request
from web_guard import MAX_BODY_BYTES, LoginThrottle

SCRIPT = b"<script>document.title='pwned'</script>"
UPLOADS = {"page.html": (SCRIPT, "text/html"), "page.htm": (SCRIPT, "text/html"),
           "image.svg": (b"<svg xmlns='http://www.w3.org/2000/svg'>" + SCRIPT + b"</svg>", "image/svg+xml"),
           "fake.png": (SCRIPT, "image/png"), "page.xhtml": (SCRIPT, "application/xhtml+xml")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("webguard")
    with start_server(tiny_model(root / "tiny.safetensors"), root / "out") as srv:
        yield srv


def generated_urls(url: str) -> list[str]:
    call = httpx.post(url + "gradio_api/call/generate", json={"data": ["sun", 1, 2, "dpmpp", 3.0, 0, ""]}, timeout=30)
    stream = httpx.get(url + f"gradio_api/call/generate/{call.json()['event_id']}", timeout=120).text
    return re.findall(r'"url": "([^"]+)"', stream)


def test_uploaded_pages_are_never_served_back_and_results_are_served_as_images(server):
    log_from = len(server.log_text())
    for name, (content, kind) in UPLOADS.items():
        r = httpx.post(server.url + "gradio_api/upload", files={"files": (name, content, kind)}, timeout=30)
        paths = r.json() if r.status_code == 200 else []
        for path in paths:  # stored, if Gradio takes it, but never served: neither as a page nor at all
            for route in ("gradio_api/file=", "gradio_api/file/"):
                got = httpx.get(server.url + route + path, timeout=10)
                assert got.status_code == 404 and b"pwned" not in got.content, (name, route, got.status_code, got.headers)
    served = generated_urls(server.url)
    assert {u.rsplit(".", 1)[1] for u in served} == {"png", "gif"}, served
    for url in served:
        got = httpx.get(url, timeout=10)
        kind = "image/gif" if url.endswith(".gif") else "image/png"
        assert got.status_code == 200 and got.headers["content-type"] == kind, (url, got.headers)
        assert got.headers["x-content-type-options"] == "nosniff" and got.content[:3] in (b"\x89PN", b"GIF")
    assert "Traceback" not in server.log_text(log_from)


def picture_bytes(kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format=kind)
    return buffer.getvalue()


def test_uploaded_pngs_and_gifs_are_not_served_back(server):
    """Uploads and Gradio's copies of results share its cache: only the copies are served."""
    served = generated_urls(server.url)
    assert served and all(httpx.get(url, timeout=10).status_code == 200 for url in served)  # the probe tells
    for name, kind in (("picture.png", "PNG"), ("picture.gif", "GIF")):
        r = httpx.post(server.url + "gradio_api/upload", files={"files": (name, picture_bytes(kind))}, timeout=30)
        assert r.status_code == 200, r.text
        for path in r.json():
            for route in ("gradio_api/file=", "gradio_api/file/", "file="):
                got = httpx.get(server.url + route + path, timeout=10)
                assert got.status_code == 404, (name, route, got.status_code)


def test_uploads_over_the_limit_are_refused_and_not_stored(server):
    cache = server.log.parent / "out-cache"
    for size in (1_500_000, 30_000_000):  # over Gradio's max_file_size; over the body cap
        start = time.monotonic()
        r = httpx.post(server.url + "gradio_api/upload", files={"files": (f"big{size}.bin", bytes(size))}, timeout=60)
        assert r.status_code == 413 and time.monotonic() - start < 20, (size, r.status_code, r.text[:200])
    assert not list(cache.rglob("big*.bin"))


def test_a_huge_prompt_is_cut_before_it_is_cleaned(monkeypatch):
    # cleaning all of it took seconds, on the event loop every route shares: the cleaning sees only the cut text
    cleaned = []
    monkeypatch.setattr(web_checks, "re", SimpleNamespace(sub=lambda p, r, text: cleaned.append(len(text)) or re.sub(p, r, text)))
    prompt = "a red apple\x00 " * 2_000_000  # 26 million characters
    req = parse_request(prompt, 1, 2, "dpmpp", 3.0, 0)
    assert cleaned and max(cleaned) <= READ_PROMPT_CHARS, cleaned
    assert len(req.prompt) <= MAX_PROMPT_CHARS and req.note == f"prompt cut to its first {MAX_PROMPT_CHARS} characters"


def test_request_bodies_over_the_cap_are_refused_at_once_and_every_route_stays_responsive(server):
    huge = json.dumps({"data": ["x" * 20_000_000, 1, 2, "dpmpp", 3.0, 0, ""]})  # 20 MB, with Content-Length

    def chunks():  # no Content-Length: the body is counted as it arrives
        for _ in range(MAX_BODY_BYTES // 2 ** 16 + 8):
            yield b" " * 2 ** 16
    for body in (huge, chunks()):
        start = time.monotonic()
        r = httpx.post(server.url + "gradio_api/call/generate", content=body, timeout=60,
                       headers={"content-type": "application/json"})
        assert r.status_code == 413 and time.monotonic() - start < 20, (r.status_code, r.text[:200])
        start = time.monotonic()
        assert httpx.get(server.url + "config", timeout=10).status_code == 200
        assert time.monotonic() - start < 2
    near_cap = json.dumps({"data": ["y " * (MAX_BODY_BYTES // 2 - 1000), 1, 1, "dpmpp", 3.0, 0, ""]})  # just under it
    call = httpx.post(server.url + "gradio_api/call/generate", content=near_cap, timeout=60,
                      headers={"content-type": "application/json"})
    events = httpx.get(server.url + f"gradio_api/call/generate/{call.json()['event_id']}", timeout=120).text
    assert f"prompt cut to its first {MAX_PROMPT_CHARS} characters" in events, events[-300:]


def test_login_throttle_doubles_the_wait_and_forgets(monkeypatch):
    now = [0.0]
    throttle = LoginThrottle(free=3, max_wait_s=8, forget_s=100, max_clients=2, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.wait_s("a") == 0
        throttle.attempt("a")
    waits = []
    for _ in range(6):
        waits.append(throttle.wait_s("a"))
        now[0] += waits[-1]
        throttle.attempt("a")
    assert waits == [1, 2, 4, 8, 8, 8]
    assert throttle.wait_s("b") == 0
    throttle.succeeded("a")
    assert throttle.wait_s("a") == 0
    for _ in range(5):
        throttle.attempt("c")
    now[0] += 101
    assert throttle.wait_s("c") == 0  # quiet long enough: forgotten
    for client in "xyz":
        throttle.attempt(client)
    assert len(throttle.failures) == 2  # bounded, oldest dropped


def test_auth_hides_the_api_before_login_and_throttles_guessing(tmp_path):
    with start_server(tiny_model(tmp_path / "tiny.safetensors"), tmp_path / "out", "--auth", "ann:s3cret") as srv:
        for encoding in ("identity", "gzip, deflate, br"):
            page = httpx.get(srv.url, headers={"accept-encoding": encoding}, timeout=10)
            assert page.status_code == 200 and '"auth_required":true' in page.text
            for leak in ("/generate", "named_endpoints", "parameter_name", "Prompt", "dpmpp"):
                assert leak not in page.text, leak
        answers, start, last_checked = [], time.monotonic(), 0.0
        for k in range(50):  # bounded: 50 guesses, each answered at once
            sent = time.monotonic()
            r = httpx.post(srv.url + "login", data={"username": "ann", "password": f"guess{k}"}, timeout=10)
            answers.append(r.status_code)
            last_checked = sent if r.status_code == 400 else last_checked
        elapsed = time.monotonic() - start
        assert elapsed < 30 and answers[:5] == [400] * 5 and set(answers) == {400, 429}, answers
        # after 5 free guesses, one more per 1, 2, 4, ... seconds: the rest are refused unchecked
        checked = answers.count(400)
        assert checked <= 6 + math.log2(1 + elapsed), (answers, elapsed)
        locked = httpx.post(srv.url + "login", data={"username": "ann", "password": "s3cret"}, timeout=10)
        if locked.status_code == 200:  # allowed only once the wait after the last checked guess has run out
            assert time.monotonic() >= last_checked + 2 ** (checked - 5), (answers, last_checked)
        else:
            assert locked.status_code == 429 and int(locked.headers["retry-after"]) >= 1  # not even checked
        elsewhere = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=10)
        assert elsewhere.post(srv.url + "login", data={"username": "ann", "password": "s3cret"}).status_code == 200
        time.sleep(int(locked.headers.get("retry-after", 0)) + 0.2)
        authed = Client(srv.url, auth=("ann", "s3cret"), verbose=False)  # the right password, after the wait
        *_, status = authed.submit("sun", 1, 2, "dpmpp", 3.0, 0, api_name="/generate").result(timeout=120)
        assert status.startswith("Done")
        assert "Traceback" not in srv.log_text()


def test_a_forged_x_forwarded_for_does_not_escape_the_login_throttle(tmp_path):
    # uvicorn believed X-Forwarded-For from 127.0.0.1: 40 guesses, each "from" another address, were all checked
    with start_server(tiny_model(tmp_path / "tiny.safetensors"), tmp_path / "out", "--auth", "ann:s3cret") as srv:
        start = time.monotonic()
        answers = [httpx.post(srv.url + "login", data={"username": "ann", "password": f"guess{k}"}, timeout=10,
                              headers={"x-forwarded-for": f"10.0.{k}.1"}).status_code for k in range(12)]
        elapsed = time.monotonic() - start
        # counted on the real peer: 5 free guesses, then one per 1, 2, 4, ... seconds (as in the test above)
        assert answers[:5] == [400] * 5 and 429 in answers, answers
        assert answers.count(400) <= 6 + math.log2(1 + elapsed), (answers, elapsed)
