import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # every test runs with the model hub unreachable


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long tests, deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def text_encoder():
    from models.text_encoder import TextEncoder
    return TextEncoder()
