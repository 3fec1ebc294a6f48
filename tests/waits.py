"""Waiting in tests: on a polled condition with a deadline, never on a fixed sleep."""
import time


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.05):
    """Poll `condition()` until it returns something truthy, and return that; fail naming `what` after `timeout_s`.
    The deadline bounds a hang: it is set far above how long the awaited thing takes, so load cannot reach it."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(poll_s)
    return value
