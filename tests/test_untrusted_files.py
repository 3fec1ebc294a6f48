"""Files from elsewhere: checkpoints carrying pickled code, dataset folders full of junk."""
import os
import pickle
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from checkpoints import load_checkpoint, load_weights
from pipeline import load_model
from preprocess import MAX_DECODE_PIXELS, image_folder, load_image
from tests.test_training import config, make_folder
from tests.webserver import tiny_model
from trainer import Trainer

ROOT_USER = os.geteuid() == 0  # root reads files without read permission: then that one is a good image


class Payload:
    """Unpickling this calls open(marker, "w"): a harmless stand-in for any code an attacker would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def evil_files(tmp_path):
    """The same payload as a torch zip checkpoint, a raw pickle, and a pickle dressed up as safetensors."""
    marker = tmp_path / "payload_ran"
    state = {"config": {"unet": {}}, "model": {}, "ema": {}, "evil": Payload(marker)}
    zipped, raw = tmp_path / "checkpoint_00000009.pt", tmp_path / "raw.pt"
    torch.save(state, zipped)
    raw.write_bytes(pickle.dumps(state, protocol=2))  # torch's own protocol: read up to the payload's global
    disguised = tmp_path / "model.safetensors"
    disguised.write_bytes(pickle.dumps(state))
    torch.load(zipped, weights_only=False)  # the payload is live: loading without weights_only runs it
    assert marker.exists()
    marker.unlink()
    return marker, zipped, raw, disguised


def test_checkpoints_with_a_pickled_payload_are_refused_without_running_it(evil_files):
    marker, zipped, raw, disguised = evil_files
    for path in (zipped, raw):
        with pytest.raises(ValueError, match=r"refused to load .*pickled Python objects other than tensors"):
            load_checkpoint(path)
        with pytest.raises(ValueError, match="refused to load"):
            load_model(path)  # what `sample` and the web app call
    newer_protocol = disguised.with_name("protocol4.pt")
    newer_protocol.write_bytes(disguised.read_bytes())  # a framing torch's safe unpickler does not read at all
    with pytest.raises(ValueError, match="corrupted or not a checkpoint"):
        load_checkpoint(newer_protocol)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_weights(disguised)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_model(disguised)
    assert not marker.exists()


def test_resume_refuses_a_checkpoint_with_a_payload(evil_files, tmp_path_factory):
    marker, zipped, _, _ = evil_files
    folder = make_folder(tmp_path_factory.mktemp("shapes") / "shapes")
    with pytest.raises(ValueError, match=r"refused to load .*checkpoint_00000009\.pt"):
        Trainer(config(folder, tmp_path_factory.mktemp("cache"), zipped.parent, resume=True))
    assert not marker.exists()


def test_shipped_format_loads_without_pickle(tmp_path, monkeypatch):
    path = tiny_model(tmp_path / "tiny.safetensors")
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle used for a .safetensors model"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load used for a .safetensors model"))
    model, _, info = load_model(path)
    assert info["parameters"] == sum(p.numel() for p in model.parameters()) > 0


# --- dataset folders full of junk --------------------------------------------------------------------

def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no pixel data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_forged_huge_image_is_refused_before_decoding(tmp_path):
    forged = tmp_path / "forged.png"
    forged.write_bytes(png_header(8000, 8000))  # under Pillow's own bomb limit, over ours: 192 MB if decoded
    assert 8000 * 8000 > MAX_DECODE_PIXELS
    with pytest.raises(ValueError, match="8000x8000 pixels is more than"):
        load_image(forged, 16, False)


def write_junk(cat) -> int:
    """Every kind of bad file the loader must survive; returns how many it should skip and count."""
    noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    noise.save(cat / "whole.png")
    whole = (cat / "whole.png").read_bytes()
    (cat / "whole.png").unlink()
    junk = {"zero_bytes.png": b"", "text.jpg": b"not an image at all", "random.webp": os.urandom(4096),
            "truncated.png": whole[: len(whole) // 2], "bomb.png": png_header(30000, 30000),
            "forged.png": png_header(8000, 8000)}
    for name, data in junk.items():
        (cat / name).write_bytes(data)
    with open(cat / "huge_sparse.jpg", "wb") as f:  # 2 GB of nothing, without using the disk
        f.truncate(2 * 1024 ** 3)
    (cat / "dangling.png").symlink_to(cat / "no_such_file.png")
    unreadable = cat / "no_permission.png"
    noise.save(unreadable)
    unreadable.chmod(0)
    os.mkfifo(cat / "pipe.png")  # not a regular file: never opened (a read would block forever)
    (cat / "folder.png").mkdir()
    return len(junk) + 2 + (not ROOT_USER)


def test_folder_of_junk_files_loads_the_good_ones_and_counts_the_rest(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for k in range(2):
            Image.new("RGB", (20, 20), (200, 30 * k, 30)).save(tmp_path / cls / f"good{k}.png")
    (tmp_path / "dog" / "good0.txt").write_bytes(b"\xff\xfe not utf-8 \xc3")  # a broken caption file
    skipped = write_junk(tmp_path / "cat")
    with ThreadPoolExecutor(1) as pool, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = pool.submit(image_folder, tmp_path, 16).result(timeout=120)  # bounded: a hang fails the test
    good = 4 + ROOT_USER
    assert data.skipped == skipped and len(data) == good
    assert [c[0] for c in data.captions] == ["cat"] * (good - 2) + ["dog"] * 2
    messages = [str(w.message) for w in caught]
    assert any(f"skipped {skipped} of {skipped + good} files" in m for m in messages), messages
    assert any("ignored caption file" in m and "good0.txt" in m for m in messages), messages
