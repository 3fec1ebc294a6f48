"""The web app against a real server on 127.0.0.1, through gradio_client (the browser test is apart)."""
import math
import re
import time

import httpx
import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from tests.webserver import assert_stopped_early, start_server, tiny_model
from web import MAX_IMAGES, InputError, parse_request


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    with start_server(tiny_model(root / "tiny.safetensors"), root / "out") as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False)


def pixels(gallery) -> list[np.ndarray]:
    return [np.asarray(Image.open(item["image"])) for item in gallery]


def test_the_server_chose_its_torch_thread_count_before_serving(server):
    assert re.search(r"^torch threads: \d+ \((OMP_NUM_THREADS|one core)\)$|^torch threads: \d+, the fastest for 4 images",
                     server.log_text(), re.M), server.log_text()[-2000:]


def test_same_seed_same_images_and_the_gif_has_one_frame_per_streamed_preview(client):
    runs = []
    for _ in range(2):
        job = client.submit("red apple", 2, 12, "dpmpp", 3.0, 1234, api_name="/generate")
        gallery, gif, *_ = job.result(timeout=120)
        previews = [out[2] for out in job.outputs() if isinstance(out[2], str)]
        previews = [p for i, p in enumerate(previews) if i == 0 or p != previews[i - 1]]  # the result repeats the last
        assert len(gallery) == 2
        with Image.open(gif) as g:
            assert g.n_frames == len(previews) == 13  # 12 steps + the final grid
        runs.append(pixels(gallery))
    assert all(np.array_equal(a, b) for a, b in zip(*runs))
    assert not np.array_equal(runs[0][0], runs[0][1])  # two different images in one batch
    assert [item["caption"] for item in gallery] == ["#0 · seed 1234", "#1 · seed 1235"]
    alone, *_ = client.predict("red apple", 1, 12, "dpmpp", 3.0, 1235, api_name="/generate")
    assert np.abs(pixels(alone)[0].astype(int) - runs[0][1].astype(int)).max() <= 1, "image #1 redrawn alone from its seed"


def test_different_seed_different_images_and_png_metadata(client, server):
    a, *_ = client.predict("sun", 1, 5, "ddim", 2.0, 1, api_name="/generate")
    b, *_ = client.predict("sun", 1, 5, "ddim", 2.0, 2, api_name="/generate")
    assert not np.array_equal(pixels(a)[0], pixels(b)[0])
    with Image.open(a[0]["image"]) as img:
        assert img.format == "PNG"
        meta = img.text
    assert meta["prompt"] == "sun" and meta["seed"] == "1" and meta["sampler"] == "ddim"
    assert meta["steps"] == "5" and meta["guidance"] == "2.0" and meta["model"] == "tiny.safetensors"
    written = sorted(server.out.glob("*/0000.png"))  # native-resolution copies in the output folder
    assert written and Image.open(written[-1]).size == (16, 16)


def test_random_seed_is_reported_and_reproduces(client):
    gallery, _, _, status = client.predict("sun", 1, 4, "dpmpp", 3.0, -1, api_name="/generate")
    seed = int(status.split("seed ")[1].split(",")[0])
    again, *_ = client.predict("sun", 1, 4, "dpmpp", 3.0, seed, api_name="/generate")
    assert np.array_equal(pixels(gallery)[0], pixels(again)[0])


@pytest.mark.parametrize("args, message", [
    (("", 2, 10, "dpmpp", 3.0, 0), "prompt is empty"),
    ((" \n\t ", 2, 10, "dpmpp", 3.0, 0), "prompt is empty"),
    (("sun", 2, 0, "dpmpp", 3.0, 0), "steps must be a whole number from 1 to"),
    (("sun", MAX_IMAGES + 1, 10, "dpmpp", 3.0, 0), "number of images must be a whole number from 1 to 16"),
    (("sun", 2, 10, "dpmpp", 3.0, "abc"), "seed must be a whole number"),
    (("sun", 2, 10, "euler", 3.0, 0), "sampler must be one of dpmpp_sde, dpmpp, ddim, ddpm"),
    (("sun", 2, 10, "dpmpp", 25.0, 0), "guidance scale must be a number from 0 to 20"),
    (("sun", 2, 10, "dpmpp", "lots", 0), "guidance scale must be a number from 0 to 20"),
])
def test_bad_input_gets_a_clear_message_and_the_server_keeps_serving(client, args, message):
    with pytest.raises(AppError, match=message):
        client.predict(*args, api_name="/generate")
    gallery, *_ = client.predict("sun", 1, 2, "dpmpp", 3.0, 0, api_name="/generate")
    assert len(gallery) == 1


def test_stop_frees_the_worker_promptly(client, server):
    job = client.submit("sun", 4, 200, "ddpm", 3.0, 0, api_name="/generate")  # DDPM: 1000 steps
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 3 and time.monotonic() < deadline:  # wait until it is really sampling
        time.sleep(0.05)
    assert len(job.outputs()) >= 3
    log_from = len(server.log_text())
    job.cancel()
    # freed: the next request is served (the 1000-step job would hold the only worker for a minute or more)...
    gallery, *_ = client.submit("sun", 1, 2, "dpmpp", 3.0, 0, api_name="/generate").result(timeout=120)
    assert len(gallery) == 1
    assert_stopped_early(server, 1000, log_from)  # ...and the sampler was stopped, not left to finish beside it


def test_parse_request_cleans_and_checks_inputs():
    req = parse_request("  red\x00 apple\n", "3", 25.0, "ddim", "2.5", " 42 ")
    assert (req.prompt, req.n, req.steps, req.sampler, req.guidance, req.seed) == ("red apple", 3, 25, "ddim", 2.5, 42)
    assert 0 <= parse_request("sun", 1, 1, "dpmpp", 0, -1).seed < 2 ** 31
    assert "first 64 tokens" in parse_request("sun " * 100, 1, 1, "dpmpp", 0, 0, token_count=lambda p: 101).note
    for bad in [dict(n=2.5), dict(n=math.inf), dict(steps=-1), dict(guidance=-0.1), dict(guidance=math.nan), dict(seed=-2), dict(seed=2 ** 40)]:
        kwargs = dict(prompt="sun", n=1, steps=1, sampler="dpmpp", guidance=1.0, seed=0) | bad
        with pytest.raises(InputError):
            parse_request(**kwargs)


def test_without_a_model_web_py_says_so_instead_of_crashing(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "web.py", "--checkpoint", str(tmp_path / "missing.pt"), "--port", "1"],
                         capture_output=True, text=True, timeout=120, cwd=str(tiny_model.__globals__["REPO"]))
    assert out.returncode != 0 and "cannot load a model" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("given,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_server_waits_for_its_threads_passively_unless_told_otherwise(given, expected):
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: web.py must set it before, and keep a user's value."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": given} if given else {})
    probe = ("import builtins, os\nseen, real = [], builtins.__import__\n"  # the value at the first `import torch`
             "def spy(name, *args, **kwargs):\n"
             "    if name == 'torch' and not seen:\n        seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
             "    return real(name, *args, **kwargs)\n"
             "builtins.__import__ = spy\nimport web\nprint(seen[0], os.environ['OMP_WAIT_POLICY'])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env,
                         cwd=str(tiny_model.__globals__["REPO"]))
    assert out.returncode == 0 and out.stdout.split() == [expected, expected], out.stderr[-2000:]


def test_markup_in_the_prompt_is_shown_as_text_in_every_status_line(client):
    prompt = "<img src=x onerror=\"document.title='XSS'\"> red apple"
    job = client.submit(prompt, 1, 2, "dpmpp", 3.0, 0, api_name="/generate")
    *_, status = job.result(timeout=120)
    statuses = [out[3] for out in job.outputs()] + [status]
    assert status.startswith("Done") and "&lt;img src=x onerror=" in status
    assert all("<img" not in s and "onerror=\"" not in s for s in statuses), statuses
    frames, *_, morph_status = client.predict("sun", prompt, 2, 2, "dpmpp", 3.0, 0, "", api_name="/morph")
    assert "&lt;img" in morph_status and "<img" not in morph_status


def test_only_the_named_endpoints_can_be_called(server):
    for name in ("generate_1", "nonexistent"):  # the prompt's Enter was a second endpoint, "generate_1"
        r = httpx.post(server.url + f"gradio_api/call/{name}", json={"data": ["sun", 1, 2, "dpmpp", 3.0, 0, ""]}, timeout=30)
        assert r.status_code >= 400, (name, r.status_code, r.text[:200])
    names = set(Client(server.url, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert names == {"/generate", "/edit_image", "/inpaint", "/morph"}, names
