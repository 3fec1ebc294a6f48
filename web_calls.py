"""Gradio's own checks of a call, which run before the app's code, answered with a sentence (used by web.py).

Gradio refuses some calls itself, before an endpoint's code runs, and a client then gets {"error": null} while
the log gets a traceback: too few values, a value the image editors' data model refuses, a file reference
outside the upload folder, and a click whose event data names such a file. CheckedBlocks makes the same
checks first and raises each as a gr.Error with a one-line message (and no traceback in the log).
And result_unread tells whether anyone reads the results of the call being run: Gradio runs a call whether
or not a client ever opens its result stream.
"""
import inspect

import gradio as gr
import pydantic
from gradio.context import LocalContext
from gradio_client.utils import is_file_obj, is_file_obj_with_meta, traverse

from web_checks import InputError, file_inside

UNREAD_MESSAGES = 2  # a stream's reader takes each message as it comes; without one, they pile up

EDITOR_VALUE = ('{"background": file or null, "layers": [file, ...], "composite": file or null}, a file being '
                '{"path": ..., "meta": {"_type": "gradio.FileData"}} (gradio_client: handle_file)')


def check_values(block_fn, inputs: list) -> None:
    """What Gradio checks of a call's values before our code runs, as InputError: too few values, and a value its
    component's data model (the image editors') refuses. (Gradio's own errors reach the client as null.)"""
    names = list(inspect.signature(block_fn.fn).parameters)[:len(block_fn.inputs)] if block_fn.fn else []
    if len(inputs) < len(block_fn.inputs):
        raise InputError(f"{block_fn.api_name or block_fn.name} takes {len(block_fn.inputs)} values "
                         f"({', '.join(names)}); got {len(inputs)}")
    for name, block, value in zip(names, block_fn.inputs, inputs):
        model = getattr(block, "data_model", None)
        if model is None or value is None:
            continue
        try:
            model.model_validate(value, context={"validate_meta": True})
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            where = ".".join(map(str, first["loc"])) or "the value"
            raise InputError(f"the {name} is not an image editor value ({where}: {first['msg'][:100]}); send "
                             f"{EDITOR_VALUE}") from None
    for name, value in zip(names, inputs):
        uploaded_only(value, f"the {name} names a file that was not uploaded to this app; upload it first "
                             "(gradio_client: handle_file)", is_file_obj_with_meta)  # the ones Gradio moves


def uploaded_only(value, message: str, is_file=is_file_obj) -> None:
    """InputError(message) if `value` refers to a file (a dict that `is_file`) anywhere but in Gradio's upload
    folder (its cache)."""
    paths = []
    traverse(value, lambda file: paths.append(file.get("path")) or file, is_file)
    folder = gr.utils.get_upload_folder()
    if any(not isinstance(p, str) or "\0" in p or file_inside(p, [folder]) is None for p in paths):
        raise InputError(message)


class CheckedBlocks(gr.Blocks):
    """gr.Blocks whose checks of a call's values, before our own, answer the client with a sentence."""

    def validate_inputs(self, block_fn, inputs):
        try:
            check_values(block_fn, inputs)
        except InputError as error:
            raise gr.Error(str(error), print_exception=False) from None

    async def process_api(self, *args, event_data=None, **kwargs):
        """Also the client's event data (a clicked result), which Gradio checks before our code runs."""
        try:
            uploaded_only(getattr(event_data, "_data", None), "the clicked result is not an image of this app")
        except InputError as error:
            raise gr.Error(str(error), print_exception=False) from None
        return await super().process_api(*args, event_data=event_data, **kwargs)


def result_unread():
    """For the call being run now (in Gradio's queue), a check that nobody reads its results: the messages Gradio
    keeps for its session until a client's stream takes them pile up. None outside the queue."""
    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    queue = getattr(blocks, "_queue", None)
    event = queue.event_ids_to_events.get(event_id) if queue is not None and event_id else None
    if event is None:
        return None
    session = event.session_hash
    return lambda: (messages := queue.pending_messages_per_session.get(session)) is not None and \
        messages.qsize() >= UNREAD_MESSAGES

