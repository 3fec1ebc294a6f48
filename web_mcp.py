"""The endpoints as Model Context Protocol tools: Gradio's MCP server, fixed for pictures (used by web.py --mcp).

Gradio 6.31 turns each file of a tool's arguments into a string (a base64 data URL or a URL) in the schema it
shows, and back into a file when a tool is called. For the image editors' value, a dict of files, it got both
wrong: the schema kept `$ref`s to the `$defs` it had moved under the argument (every call failed with
PointerToNowhere), and the files' places were recorded as places in the schema ("anyOf", 0; "items") rather
than in the value, so none was turned back into a file. It also saved base64 pictures into the temp folder it
read at import, before web.py names the upload folder; and a tool called without a progress token got its
outputs as one text (the tuple gradio_client returns, wrapped in a list). ToolServer corrects the four.
"""
import gradio.mcp
from gradio.utils import get_upload_folder

ANY_ITEM = "*"  # in a file's place: every item of the list there


def without_refs(node):
    """A schema with the `$ref` of each node Gradio made a string removed, and `$defs` too once nothing refers to them."""
    def strip(node, drop_defs: bool):
        if isinstance(node, list):
            return [strip(item, drop_defs) for item in node]
        if not isinstance(node, dict):
            return node
        made_string = node.get("type") == "string" and "$ref" in node
        return {key: strip(value, drop_defs) for key, value in node.items()
                if not (key == "$ref" and made_string) and not (key == "$defs" and drop_defs)}
    stripped = strip(node, False)
    return strip(stripped, "$ref" not in repr(stripped))


def value_place(schema_place: list) -> list | None:
    """Where in an argument's value the file at this place in its schema lies (None: a definition, no value)."""
    place, parts = [], iter(schema_place)
    for part in parts:
        if part == "$defs":
            return None
        if part in ("anyOf", "oneOf"):
            next(parts, None)  # the alternative's index: the value itself
        else:
            place.append(ANY_ITEM if part == "items" else part)
    return place


def expand(place: list, value) -> list[list]:
    """The places in `value` that `place` (perhaps with ANY_ITEM) names."""
    if not place:
        return [[]]
    head, *rest = place
    if head == ANY_ITEM:
        items = enumerate(value) if isinstance(value, list) else ()
    else:
        items = [(head, value[head])] if isinstance(value, dict) and head in value else ()
    return [[key, *tail] for key, item in items for tail in expand(rest, item)]


class ToolServer(gradio.mcp.GradioMCPServer):
    """GradioMCPServer whose tool schemas hold no dangling `$ref` and whose pictures inside dicts and lists are files."""

    def __init__(self, blocks):
        gradio.mcp.DEFAULT_TEMP_DIR = get_upload_folder()  # read now, after web.py has named it
        super().__init__(blocks)

    def simplify_filedata_schema(self, schema):
        simplified, places = super().simplify_filedata_schema(schema)
        in_values = [place for place in map(value_place, places) if place is not None]
        return without_refs(simplified), [p for k, p in enumerate(in_values) if p not in in_values[:k]]

    async def _execute_tool_without_progress(self, job):
        outputs = await super()._execute_tool_without_progress(job)
        return list(outputs[0]) if isinstance(outputs[0], tuple) else outputs  # several outputs: a tuple

    def convert_strings_to_filedata(self, value, filedata_positions):
        return super().convert_strings_to_filedata(
            value, [found for place in filedata_positions for found in expand(place, value)])


def serve_tools_with_pictures() -> None:
    """Make Gradio's launch(mcp_server=True) build a ToolServer (routes.py looks the class up in gradio.mcp then)."""
    gradio.mcp.GradioMCPServer = ToolServer
