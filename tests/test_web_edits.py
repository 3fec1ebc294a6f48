"""The web app's image-to-image, inpainting, morph, negative prompt, reuse and MCP endpoints, against a real server
on 127.0.0.1 through gradio_client and the `mcp` client (the browser tests are in test_web_browser_edits.py)."""
import asyncio
import base64
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from plot_func import save_png
from sources.images import fit_image
from tests import gifs
from tests.test_web_faults import JUNK, TEXT
from tests.webserver import REPO, assert_stopped_early, start_server, tiny_model
from web import Studio

SIZE = 16  # the tiny model's image size
SECRET = "TOP SECRET: must never be read"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("webedits")
    (root / "secret.txt").write_text(SECRET)
    with start_server(tiny_model(root / "tiny.safetensors"), root / "out", "--mcp") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Pictures to upload: a 64x48 photo-like picture, masks for it, and some that must be refused."""
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    mask = Image.new("RGBA", (64, 48), (0, 0, 0, 0))  # painted (opaque) on the left half, as the page's brush does
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 47), fill=(255, 0, 255, 255))
    dot = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    dot.putpixel((1, 1), (255, 0, 255, 255))  # outside the centre square the model sees
    named = {"picture.png": picture, "mask.png": mask, "dot.png": dot, "small_mask.png": mask.resize((10, 10)),
             "empty.png": Image.new("RGBA", (64, 48), (0, 0, 0, 0)), "wide.png": Image.new("RGB", (5000, 4))}
    for name, img in named.items():
        img.save(root / name)
    (root / "text.png").write_text("not a picture at all")
    return root


def editor(background=None, layers=(), composite=None) -> dict:
    ref = lambda p: None if p is None else handle_file(str(p))  # noqa: E731
    return {"background": ref(background), "layers": [ref(p) for p in layers], "composite": ref(composite)}


def native(item) -> np.ndarray:
    """The model-size pixels of a gallery image (the gallery shows a nearest-neighbour upscale)."""
    with Image.open(item["image"]) as img:
        scale = int(img.text["upscale"])
        return np.asarray(img.convert("RGB"))[::scale, ::scale]


def fitted(path, grayscale=False) -> np.ndarray:
    with Image.open(path) as img:
        return fit_image(img, SIZE, grayscale).permute(1, 2, 0).numpy()


def test_image_to_image_at_strength_0_returns_the_picture_and_above_redraws_it(client, files):
    gallery, _, _, status = client.predict(editor(files / "picture.png"), "sun", 0.0, 2, 3, "dpmpp", 3.0, 5, "",
                                           api_name="/edit_image")
    assert status.startswith("Done: 2 image(s)") and "0 steps" in status
    for item in gallery:
        assert np.array_equal(native(item), fitted(files / "picture.png"))
    redrawn, _, _, status = client.predict(editor(files / "picture.png"), "sun", 0.6, 1, 3, "dpmpp", 3.0, 5, "",
                                           api_name="/edit_image")
    assert "3 steps" in status and not np.array_equal(native(redrawn[0]), fitted(files / "picture.png"))
    with Image.open(redrawn[0]["image"]) as img:
        assert img.text["mode"] == "image-to-image" and img.text["strength"] == "0.6"


def test_the_composite_is_the_starting_picture_when_there_is_one(client, files):
    gallery, *_ = client.predict(editor(files / "mask.png", composite=files / "picture.png"), "sun", 0.0, 1, 3,
                                 "dpmpp", 3.0, 5, "", api_name="/edit_image")
    assert np.array_equal(native(gallery[0]), fitted(files / "picture.png"))


def test_inpainting_keeps_the_unpainted_pixels_exactly_and_redraws_the_painted_ones(client, files):
    gallery, *_ = client.predict(editor(files / "picture.png", [files / "mask.png"]), "sun", 2, 3, "dpmpp", 3.0, 9, "",
                                 api_name="/inpaint")
    with Image.open(files / "mask.png") as m:
        redraw = fit_image(m.getchannel("A"), SIZE, True)[0].numpy() >= 128  # as the app fits it
    assert 0.25 < redraw.mean() < 0.75
    for item in gallery:
        out = native(item)
        assert np.array_equal(out[~redraw], fitted(files / "picture.png")[~redraw])
        assert not np.array_equal(out[redraw], fitted(files / "picture.png")[redraw])
    with Image.open(gallery[0]["image"]) as img:
        assert img.text["mode"] == "inpainting"


def test_a_morph_runs_from_one_prompt_to_the_other_and_its_gif_goes_there_and_back(client):
    gallery, gif, _, status = client.predict("sun", "red apple", 4, 3, "dpmpp", 3.0, 7, "", api_name="/morph")
    assert len(gallery) == 4 and status.startswith("Done: 4 frames from “sun” to “red apple”, seed 7")
    morph = [np.asarray(Image.open(item["image"]).convert("RGB")) for item in gallery]
    assert gifs.plays(gif, morph + morph[-2:0:-1])  # 4 frames, then 2 back to the first
    alone = [client.predict(p, 1, 3, "dpmpp", 3.0, 7, "", api_name="/generate")[0][0] for p in ("sun", "red apple")]
    assert np.array_equal(native(gallery[0]), native(alone[0]))
    assert np.array_equal(native(gallery[-1]), native(alone[1]))
    assert not np.array_equal(native(gallery[1]), native(gallery[0]))


def test_an_empty_negative_prompt_is_plain_guidance_and_a_negative_prompt_changes_the_images(client):
    default, *_ = client.predict("sun", 1, 3, "dpmpp", 3.0, 3, api_name="/generate")
    empty, *_ = client.predict("sun", 1, 3, "dpmpp", 3.0, 3, "  ", api_name="/generate")
    negative, *_ = client.predict("sun", 1, 3, "dpmpp", 3.0, 3, "red apple", api_name="/generate")
    assert np.array_equal(native(default[0]), native(empty[0]))
    assert not np.array_equal(native(default[0]), native(negative[0]))
    with Image.open(negative[0]["image"]) as img:
        assert img.text["negative_prompt"] == "red apple"


BAD = [
    ("edit_image", lambda f: (editor(f / "picture.png"), "sun", 1.5, 1, 3, "dpmpp", 3.0, 1, ""), "strength must be a number from 0 to 1"),
    ("edit_image", lambda f: (editor(), "sun", 0.5, 1, 3, "dpmpp", 3.0, 1, ""), "there is no picture to start from"),
    ("edit_image", lambda f: (editor(f / "text.png"), "sun", 0.5, 1, 3, "dpmpp", 3.0, 1, ""), "the picture is not an image"),
    ("edit_image", lambda f: (editor(f / "wide.png"), "sun", 0.5, 1, 3, "dpmpp", 3.0, 1, ""), "the picture is 5000x4 pixels; at most 4096"),
    ("inpaint", lambda f: (editor(f / "picture.png"), "sun", 1, 3, "dpmpp", 3.0, 1, ""), "the mask is empty"),
    ("inpaint", lambda f: (editor(f / "picture.png", [f / "empty.png"]), "sun", 1, 3, "dpmpp", 3.0, 1, ""), "the mask is empty"),
    ("inpaint", lambda f: (editor(f / "picture.png", [f / "small_mask.png"]), "sun", 1, 3, "dpmpp", 3.0, 1, ""),
     "the mask \\(layer 1\\) is 10x10 pixels but the picture is 64x48"),
    ("inpaint", lambda f: (editor(None, [f / "mask.png"]), "sun", 1, 3, "dpmpp", 3.0, 1, ""), "there is no picture to inpaint"),
    ("inpaint", lambda f: (editor(f / "picture.png", [f / "dot.png"]), "sun", 1, 3, "dpmpp", 3.0, 1, ""), "the painted part vanishes"),
    ("morph", lambda f: ("sun", "moon", 1, 3, "dpmpp", 3.0, 1, ""), "frames must be a whole number from 2 to 24"),
    ("morph", lambda f: ("sun", "moon", 25, 3, "dpmpp", 3.0, 1, ""), "frames must be a whole number from 2 to 24"),
    ("morph", lambda f: ("sun", " ", 4, 3, "dpmpp", 3.0, 1, ""), "the second prompt is empty"),
    ("generate", lambda f: ("sun", 1, 3, "dpmpp", 3.0, 1, ["x"]), "the negative prompt must be text"),
]


@pytest.mark.parametrize("api, args, message", BAD, ids=[f"{a}-{m[:24]}" for a, _, m in BAD])
def test_bad_input_gets_a_clear_message_and_the_server_keeps_serving(client, files, api, args, message):
    with pytest.raises(AppError, match=message):
        client.predict(*args(files), api_name=f"/{api}")
    gallery, *_ = client.predict("sun", 1, 2, "dpmpp", 3.0, 0, api_name="/generate")
    assert len(gallery) == 1


def raw_call(server, api: str, data: list) -> str:
    """One call over plain HTTP, as any client could make it: the events it gets back."""
    r = httpx.post(server.url + f"gradio_api/call/{api}", json={"data": data}, timeout=30)
    if r.status_code != 200:
        return r.text
    return httpx.get(server.url + f"gradio_api/call/{api}/{r.json()['event_id']}", timeout=60).text


def test_a_picture_path_outside_the_uploads_is_never_read_nor_copied(client, server):
    secret = str(server.log.parent / "secret.txt")
    for ref in ({"path": secret, "meta": {"_type": "gradio.FileData"}}, {"path": secret},
                {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}):
        for api, data in (("edit_image", [{"background": ref, "layers": []}, "sun", 0.5, 1, 2, "dpmpp", 3, 1, ""]),
                          ("inpaint", [{"background": ref, "layers": [ref]}, "sun", 1, 2, "dpmpp", 3, 1, ""])):
            events = raw_call(server, api, data)
            assert "event: error" in events or "detail" in events, events[-300:]
            assert SECRET not in events and "root:" not in events
    copies = subprocess.run(["grep", "-rl", SECRET, str(server.log.parent / "out"), str(server.log.parent / "out-cache")],
                            capture_output=True, text=True)
    assert copies.stdout == ""
    assert len(client.predict("sun", 1, 2, "dpmpp", 3.0, 0, api_name="/generate")[0]) == 1


# --- fuzzing the new endpoints, as test_web_faults fuzzes /generate ------------------------------------

VALID = {"strength": st.one_of(st.floats(0, 1), st.sampled_from(["0.5", 0, 1, " 1 ", "-0", 5e-324])),
         "frames": st.one_of(st.integers(2, 3), st.sampled_from(["2", 3.0, " 2 "])),
         "prompt_b": TEXT.map(lambda t: "moon " + t),
         "negative_prompt": st.one_of(st.none(), TEXT)}
INVALID = {"strength": st.one_of(st.floats(1.0001, 1e9), st.floats(-1e9, -1e-9),
                                 st.sampled_from(["nan", "inf", "half", None, [0.5], True, 10 ** 400])),
           "frames": st.one_of(st.integers(-5, 1), st.integers(25, 10 ** 12), st.sampled_from([2.5, "two", None, [3], True])),
           "prompt_b": st.one_of(st.sampled_from(["", "  ", "\x00"]), JUNK.filter(lambda v: not isinstance(v, str))),
           "negative_prompt": JUNK.filter(lambda v: v is not None and not isinstance(v, str))}
MESSAGES = {"strength": "strength must be a number from 0 to 1", "frames": "frames must be a whole number from 2 to 24",
            "prompt_b": "the second prompt", "negative_prompt": "the negative prompt must be text"}


@st.composite
def edit_calls(draw):
    broken = draw(st.sets(st.sampled_from(list(VALID)), max_size=1))
    return {k: draw(INVALID[k] if k in broken else VALID[k]) for k in VALID}, broken


def test_fuzzed_edit_and_morph_calls_get_images_or_a_clear_message_and_no_traceback_of_ours(client, files, server):
    log_from = len(server.log_text())

    @settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(call=edit_calls(), api=st.sampled_from(["edit_image", "inpaint", "morph"]))
    def one_call(call, api):
        args, broken = call
        relevant = {"edit_image": {"strength", "negative_prompt"}, "inpaint": {"negative_prompt"},
                    "morph": {"frames", "prompt_b", "negative_prompt"}}[api]
        a = args
        data = {"edit_image": (editor(files / "picture.png"), "sun", a["strength"], 1, 2, "dpmpp", 3.0, 1, a["negative_prompt"]),
                "inpaint": (editor(files / "picture.png", [files / "mask.png"]), "sun", 1, 2, "dpmpp", 3.0, 1, a["negative_prompt"]),
                "morph": ("sun", a["prompt_b"], a["frames"], 2, "dpmpp", 3.0, 1, a["negative_prompt"])}[api]
        try:
            gallery, gif, _, status = client.predict(*data, api_name=f"/{api}")
        except AppError as error:
            field = next((f for f, text in MESSAGES.items() if text in str(error)), None)
            assert field is not None, f"unclear refusal: {error}"
            assert field in broken & relevant, f"refused {field}, which was valid: {args}"
            event(f"{api} refused: {field}")
            return
        assert not broken & relevant, f"accepted invalid {broken}: {args}"
        event(f"{api} drew")
        assert status.startswith("Done") and Path(gif).is_file() and gallery

    one_call()
    # Gradio's own checks of a file reference (a path not uploaded, an editor value without its "meta" field) log
    # their refusals with a traceback of Gradio's frames; no code of ours may fail
    log = server.log_text(log_from)
    ours = [block for block in log.split("Traceback")[1:] if str(REPO) in block]
    assert not ours and "generation failed" not in log, log[-3000:]


@pytest.mark.parametrize("api", ["inpaint", "morph"])
def test_each_feature_streams_previews_and_stop_frees_the_worker_promptly(client, files, server, api):
    args = {"inpaint": (editor(files / "picture.png", [files / "mask.png"]), "sun", 4, 200, "ddpm", 3.0, 0, ""),
            "morph": ("sun", "moon", 24, 200, "ddpm", 3.0, 0, "")}[api]  # DDPM: 1000 steps (x 10 resampling)
    job = client.submit(*args, api_name=f"/{api}")
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 3 and time.monotonic() < deadline:  # previews are streaming: it is really sampling
        time.sleep(0.05)
    assert len(job.outputs()) >= 3 and all(out[2] for out in job.outputs()[1:])
    log_from = len(server.log_text())
    job.cancel()
    gallery, *_ = client.submit("sun", 1, 2, "dpmpp", 3.0, 0, api_name="/generate").result(timeout=120)
    assert len(gallery) == 1
    assert_stopped_early(server, 1000, log_from)  # the log line comes when the sampler reaches its next step: waited for


# --- click a result to reuse its settings ----------------------------------------------------------------

def test_a_clicked_result_gives_back_its_settings_and_its_own_seed_and_nothing_else_is_read(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir(), elsewhere.mkdir()
    studio = Studio(SimpleNamespace(info={}), out, [out], str(tmp_path / "uploads"))
    meta = {"prompt": "red apple", "negative_prompt": "green", "sampler": "ddim", "steps": 12, "guidance": 4.5,
            "seed": 40, "image_seed": 42}
    for folder in (out, elsewhere):
        save_png(Image.new("RGB", (4, 4)), folder / "0002.png", meta)
    save_png(Image.new("RGB", (4, 4)), out / "forged.png", {**meta, "steps": "9999"})

    def click(path):
        return studio.reuse(gr.SelectData(None, {"index": 2, "value": {"image": {"path": str(path)}, "caption": ""}}))

    assert click(out / "0002.png") == ["red apple", "green", "ddim", 12, 4.5, "42"]
    for refused in (elsewhere / "0002.png", out / "forged.png", out / "missing.png", out / ".." / "elsewhere" / "0002.png"):
        assert all(isinstance(v, type(gr.skip())) for v in click(refused)), refused


# --- MCP -------------------------------------------------------------------------------------------------

async def mcp_session(url: str, work):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    async with httpx.AsyncClient(timeout=30) as http, \
            streamable_http_client(url + "gradio_api/mcp/", http_client=http) as (read, write, _):
        async with ClientSession(read, write) as session:
            await asyncio.wait_for(session.initialize(), 30)
            return await asyncio.wait_for(work(session), 120)


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def test_mcp_clients_see_the_documented_tools_and_get_images(server, files):
    settings_ = {"steps": 3, "sampler": "dpmpp", "guidance": 3, "seed": "4", "negative_prompt": ""}
    picture = {"background": data_url(files / "picture.png"), "layers": [], "composite": None}
    calls = {"edit_image": {"picture": picture, "prompt": "sun", "strength": 0.6, "n": 1, **settings_},
             "inpaint": {"picture": {**picture, "layers": [data_url(files / "mask.png")]}, "prompt": "sun", "n": 1,
                         **settings_},
             "morph": {"prompt": "sun", "prompt_b": "red apple", "frames": 2, **settings_}}

    async def work(session):
        tools = {t.name: t for t in (await session.list_tools()).tools}
        async def note(progress, total, message):
            progress_notes.append(message)
        drawn = await session.call_tool("generate", {"prompt": "sun", "n": 2, "steps": 6, "sampler": "dpmpp",
                                                     "guidance": 3, "seed": "4", "negative_prompt": ""},
                                        progress_callback=note)
        refused = await session.call_tool("generate", {"prompt": "  ", "n": 1})
        others = {name: await session.call_tool(name, args) for name, args in calls.items()}
        return tools, drawn, refused, others

    progress_notes = []  # a client that asks for progress gets the outputs one by one (images as images)
    tools, drawn, refused, others = asyncio.run(mcp_session(server.url, work))
    assert progress_notes
    assert {"generate", "edit_image", "inpaint", "morph"} <= set(tools)
    assert "Text to image" in tools["generate"].description and "prompt morph" in tools["morph"].description.lower()
    assert "what to draw" in tools["generate"].inputSchema["properties"]["prompt"]["description"]
    assert "$ref" not in str(tools["edit_image"].inputSchema), tools["edit_image"].inputSchema
    for result in (drawn, *others.values()):
        text = " ".join(c.text for c in result.content if c.type == "text")
        assert not result.isError, text[:500]
        images = [c for c in result.content if c.type == "image"]
        assert images and all(c.mimeType in ("image/png", "image/gif") for c in images), [c.type for c in result.content] + [text[-1500:]]
    assert any(c.type == "text" and "Done: 2 image(s) of “sun”, seed 4" in c.text for c in drawn.content)
    assert refused.isError and "the prompt is empty" in " ".join(c.text for c in refused.content if c.type == "text")


def test_an_mcp_picture_given_as_base64_lands_in_the_upload_folder_only(server, tmp_path):
    """Gradio's MCP module read its temp folder at import, before web.py named the upload folder: a base64 picture
    was saved under the system's temp folder (and never cleaned), then uploaded from there."""
    unique = tmp_path / "unique.png"  # bytes no other test sends
    Image.new("RGB", (8, 8), tuple(int(b) for b in os.urandom(3))).save(unique, pnginfo=None)
    picture = {"background": data_url(unique), "layers": [], "composite": None}
    args = {"picture": picture, "prompt": "sun", "strength": 0.0, "n": 1, "steps": 3, "sampler": "dpmpp"}
    result = asyncio.run(mcp_session(server.url, lambda session: session.call_tool("edit_image", args)))
    assert not result.isError, [c.text for c in result.content if c.type == "text"]
    sent = unique.read_bytes()
    holds = lambda folder: any(p.is_file() and p.read_bytes() == sent for p in Path(folder).rglob("*.png"))
    assert holds(server.out.with_name(server.out.name + "-cache")), "the picture is not in the upload folder"
    assert not holds(Path(tempfile.gettempdir()) / "gradio"), "the picture was saved outside the upload folder"


def test_mcp_is_refused_with_auth_before_the_model_loads():
    run = subprocess.run([sys.executable, "web.py", "--mcp", "--auth", "ann:s3cret", "--checkpoint", "/nonexistent"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and re.search(r"--mcp cannot be combined with --auth", run.stderr), run.stderr
