import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # every test runs with the model hub unreachable



@pytest.fixture(scope="session")
def text_encoder():
    from models.text_encoder import TextEncoder
    return TextEncoder()


@pytest.fixture(scope="session")
def emoji_dir(tmp_path_factory):
    """A cache folder holding the emoji set rendered at 32 px (rendered once per test session)."""
    from sources.emoji_font import build_emoji
    cache = tmp_path_factory.mktemp("emoji")
    build_emoji(32, cache)
    return cache
