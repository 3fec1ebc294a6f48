"""Start `python web.py` as a real server on 127.0.0.1 for tests, with a bounded wait."""
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoints import save_weights
from models.unet import ConditionalUNet, UNetConfig
from tests.waits import wait_for

REPO = Path(__file__).resolve().parents[1]


def tiny_model(path: Path, style_words: tuple[str, ...] = (), **info_extra) -> Path:
    """A small random-weight model in the shipped format: enough to exercise the app end to end."""
    torch.manual_seed(0)
    cfg = UNetConfig(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(8,), num_heads=2, style_words=style_words)
    model = ConditionalUNet(cfg)
    torch.nn.init.normal_(model.out[-1].weight, std=0.02)  # zero-init output would make every frame alike
    if model.style_embed is not None:
        torch.nn.init.normal_(model.style_embed.weight)  # so that a style changes the pictures
    info = {"dataset": "tiny test", "image_size": 16, "steps": 0, "epochs": 0, "example_prompts": ["red apple", "sun"],
            **info_extra}
    save_weights(model.state_dict(), {"config": {"unet": cfg.to_dict(), "schedule": "cosine", "timesteps": 1000},
                                      "info": info}, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path  # the server's stdout and stderr
    out: Path  # its --out-dir

    def log_text(self, since: int = 0) -> str:
        """The log from character `since` on: a test of a shared server reads what came during its own work."""
        return self.log.read_text(errors="replace")[since:]


def assert_stopped_early(server: Server, steps: int, log_from: int, timeout_s: float = 60) -> None:
    """The server log, from character `log_from` on, says that a generation of `steps` steps was stopped before its
    end. Waited for: the sampler thread logs it at its next step, which may come after other work was served."""
    stopped = lambda: re.findall(rf"generation stopped after (\d+) of {steps} steps", server.log_text(log_from))
    found = wait_for(stopped, timeout_s, f"'generation stopped after ... of {steps} steps' in the server log")
    assert all(int(done) < steps for done in found), found


@contextmanager
def web_server(checkpoint, out_dir: Path, *extra: str, timeout_s: float = 120):
    """Yield the URL of a running web.py; stop it afterwards. Fails if it is not up within `timeout_s`."""
    with start_server(checkpoint, out_dir, *extra, timeout_s=timeout_s) as server:
        yield server.url


@contextmanager
def start_server(checkpoint, out_dir: Path, *extra: str, timeout_s: float = 120, env: dict | None = None,
                 script: str = "web.py"):
    """Like web_server, but yield the Server: its URL, process and log. `script` runs instead of web.py."""
    port = free_port()
    args = [sys.executable, script, "--port", str(port), "--out-dir", str(out_dir), "--device", "cpu", *extra]
    if checkpoint is not None:
        args += ["--checkpoint", str(checkpoint)]
    log = open(out_dir.parent / f"web_{port}.log", "w")
    proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"web.py exited with {proc.returncode}: {Path(log.name).read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except urllib.error.HTTPError:  # up, but wants a login
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"web.py not up after {timeout_s}s: {Path(log.name).read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield Server(url, proc, Path(log.name), out_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
