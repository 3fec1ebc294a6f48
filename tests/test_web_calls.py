"""Raw HTTP API calls against a real server on 127.0.0.1. Calls that Gradio checks before the app's code runs
(web_calls.py, web_guard.py): too few values, values that are not editor-shaped, odd click events, unknown
endpoints; each gets a one-line message and no traceback in the log. And a call whose results nobody reads."""
import json
import re
import time

import httpx
import pytest

from tests.waits import wait_for
from tests.webserver import assert_stopped_early, start_server, tiny_model
from web_results import READ_WITHIN_S


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("webcalls")
    with start_server(tiny_model(root / "tiny.safetensors"), root / "out") as srv:
        yield srv


def raw_call(server, name: str, data) -> str:
    """The error message of a raw API call (POST /gradio_api/call/<name>, then its event stream), or fail."""
    r = httpx.post(server.url + f"gradio_api/call/{name}", json={"data": data}, timeout=30)
    assert r.status_code == 200, r.text
    events = httpx.get(server.url + f"gradio_api/call/{name}/{r.json()['event_id']}", timeout=60).text
    error = re.search(r"event: error\ndata: (.*)", events)
    assert error, events[-300:]
    return json.loads(error.group(1))["error"]


def assert_one_line(message, *words) -> None:
    assert isinstance(message, str) and "\n" not in message and len(message) < 400, message
    assert all(w in message for w in words), message


SETTINGS = [3, "dpmpp", 3.0, 0, ""]  # steps, sampler, guidance, seed, negative prompt
TOO_FEW = {"generate": (["sun", 1, 2, "dpmpp", 3.0, 0], "generate takes 7 values (prompt, n, steps, sampler, guidance, "
                                                          "seed, negative_prompt); got 6"),
           "edit_image": (["sun"], "edit_image takes 9 values (picture, prompt, strength, n,"),
           "inpaint": ([], "inpaint takes 8 values (picture, prompt, n, steps,"),
           "morph": (["sun"], "morph takes 8 values (prompt, prompt_b, frames,")}


def test_too_few_values_get_a_message_naming_the_values(server):
    log_from = len(server.log_text())
    for name, (data, words) in TOO_FEW.items():
        assert_one_line(raw_call(server, name, data), words, f"; got {len(data)}")
    assert "Traceback" not in server.log_text(log_from), server.log_text(log_from)[-3000:]


FILE = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}
NOT_EDITOR = {"a string": "x", "a list": [1], "a number": 3, "layers as a dict": {"background": None, "layers": {"a": 1}},
              "layers None": {"background": None, "layers": None}, "a null layer": {"background": None, "layers": [None]},
              "a file without meta": {"background": {"path": "/etc/passwd"}}}


def test_editor_values_that_are_not_editor_shaped_get_a_message(server):
    log_from = len(server.log_text())
    for case, value in NOT_EDITOR.items():
        for name, data in (("edit_image", [value, "sun", 0.5, 1, *SETTINGS]), ("inpaint", [value, "sun", 1, *SETTINGS])):
            message = f"{case}: {raw_call(server, name, data)}"  # the case named if it fails
            assert_one_line(message, "the picture is not an image editor value", '"layers": [')
    for value in ({"background": FILE, "layers": []}, {"background": None, "layers": [FILE]}):
        message = raw_call(server, "inpaint", [value, "sun", 1, *SETTINGS])
        assert_one_line(message, "the picture names a file that was not uploaded to this app")
    assert "Traceback" not in server.log_text(log_from), server.log_text(log_from)[-3000:]


def click_result(server, event_data) -> str:
    """The outcome of a click on a result, with this event data, sent as the page sends it (the queue)."""
    config = httpx.get(server.url + "config").json()
    dep = next(d for d in config["dependencies"] if d.get("api_name") == "reuse")
    session = f"click{time.monotonic_ns()}"
    body = {"data": [], "event_data": event_data, "fn_index": dep["id"], "trigger_id": dep["targets"][0][0],
            "session_hash": session}
    assert httpx.post(server.url + "gradio_api/queue/join", json=body, timeout=30).status_code == 200
    with httpx.stream("GET", server.url + f"gradio_api/queue/data?session_hash={session}", timeout=60) as stream:
        for line in stream.iter_lines():
            if '"process_completed"' in line:
                return json.loads(line.removeprefix("data: "))["output"]
    raise AssertionError("the click's event stream ended without a result")


def test_a_result_click_with_null_list_or_indexless_data_changes_nothing_and_logs_no_traceback(server):
    log_from = len(server.log_text())
    r = httpx.post(server.url + "gradio_api/call/generate", json={"data": ["red apple", 1, 2, "dpmpp", 3.0, 5, ""]})
    stream = httpx.get(server.url + f"gradio_api/call/generate/{r.json()['event_id']}", timeout=120).text
    result = re.findall(r'"path": "([^"]+_x\d+\.png)"', stream)[0]
    for read in ({"index": 0, "value": {"image": {"path": result}, "caption": ""}}, {"value": {"image": {"path": result}}}):
        clicked = click_result(server, read)  # with or without an index: the probe tells a click that is read
        assert clicked.get("error") is None and clicked["data"][0] == "red apple", clicked
    for event_data in (None, [1, 2], "x", {"value": None}, {"index": None}):
        output = click_result(server, event_data)
        assert output.get("error") is None and output["data"][0] != "red apple", (event_data, output)
    refused = click_result(server, {"index": 0, "value": {"image": {"path": "/etc/passwd"}}})
    assert_one_line(refused.get("error"), "the clicked result is not an image of this app")
    assert "Traceback" not in server.log_text(log_from), server.log_text(log_from)[-3000:]


def test_an_unknown_endpoint_is_404_naming_the_endpoints(server):
    log_from = len(server.log_text())
    for route in ("gradio_api/call/nothing", "gradio_api/call/generate_1", "gradio_api/run/nothing", "gradio_api/call/v2/x"):
        r = httpx.post(server.url + route, json={"data": ["sun"]}, timeout=30)
        assert r.status_code == 404, (route, r.status_code, r.text)
        assert_one_line(r.json()["detail"], "there is no endpoint", "the endpoints are generate, edit_image, inpaint, morph")
    assert "Traceback" not in server.log_text(log_from), server.log_text(log_from)[-3000:]


def test_a_call_whose_results_nobody_reads_is_cancelled_and_frees_the_worker(server):
    log_from = len(server.log_text())
    unread = httpx.post(server.url + "gradio_api/call/generate", json={"data": ["sun", 16, 200, "ddpm", 3, 0, ""]})
    assert unread.status_code == 200, unread.text  # 16 images x 1000 DDPM steps; its result stream is never opened
    start = time.monotonic()
    r = httpx.post(server.url + "gradio_api/call/generate", json={"data": ["sun", 1, 2, "dpmpp", 3, 0, ""]})
    events = httpx.get(server.url + f"gradio_api/call/generate/{r.json()['event_id']}", timeout=120).text
    assert "event: complete" in events, events[-300:]
    assert time.monotonic() - start < READ_WITHIN_S + 60, "the unread call held the worker"
    wait_for(lambda: "generation cancelled: nobody read its results" in server.log_text(log_from), 60,
             "the log line that the unread call was cancelled")
    assert_stopped_early(server, 1000, log_from)
