"""Smoke test: every benchmark script runs at tiny sizes and writes its markdown table."""
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import common  # noqa: E402  (bench/common.py)


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    """Two classes of four 32x32 images: a data set for `train --data FOLDER`."""
    root = tmp_path_factory.mktemp("data")
    for name, color in [("red", (255, 0, 0)), ("blue", (0, 0, 255))]:
        (root / name).mkdir()
        for i in range(4):
            Image.new("RGB", (32, 32), tuple(c // (i + 1) for c in color)).save(root / name / f"{i}.png")
    return root


def check_table(doc: Path, key: str, header: str):
    key = f"{key}-{common.isa_tag()}"
    text = doc.read_text()
    assert f"<!-- bench:{key} -->" in text and f"<!-- /bench:{key} -->" in text
    block = text.split(f"<!-- bench:{key} -->")[1].split(f"<!-- /bench:{key} -->")[0]
    assert "`python bench/" in block and "Machine: " in block and "torch " in block
    lines = [line for line in block.splitlines() if line.startswith("|")]
    assert lines[0].startswith(f"| {header}") and lines[1].startswith("|---") and len(lines) >= 3
    return lines


@pytest.mark.parametrize("native_bf16", [True, False])
def test_latency(tmp_path, monkeypatch, native_bf16):
    pytest.importorskip("diffusers")
    import unet_latency
    monkeypatch.setattr(unet_latency, "native_bf16", lambda device: native_bf16)
    # the real probe, at a size that is quick even where bf16 is emulated
    monkeypatch.setattr(unet_latency, "matmul_peak", lambda dtype, seconds: common.matmul_peak(dtype, 256, seconds))
    doc = tmp_path / "bench.md"
    key = f"latency-tiny-{common.isa_tag()}"
    doc.write_text(f"# Benchmarks\n\nintro\n\n<!-- bench:{key} -->\nold table\n<!-- /bench:{key} -->\n\nmore\n")
    unet_latency.main(["--arch", "tiny", "--sizes", "32", "--batches", "2", "--reps", "1", "--min-time", "0",
                       "--peak-seconds", "0.1", "--write", "--doc", str(doc)])
    lines = check_table(doc, "latency-tiny", "px")
    assert len(lines) == 3 and lines[2].startswith("| 32 | 2 |")
    cells = lines[2].strip("| ").split(" | ")  # bf16 runs only where it is native; else its cells say so
    assert [c == "n/a" for c in cells[5:8]] == [not native_bf16] * 3 and cells[8] != "n/a"
    assert (cells[9] == "n/a") is not native_bf16 and (native_bf16 is False or cells[9].endswith("%"))
    assert (cells[10] == "n/a") is not native_bf16 and (native_bf16 is False or float(cells[10].strip("*")) > 0)
    text = doc.read_text()  # its own section replaced in place, the rest kept
    assert "old table" not in text and text.count(f"<!-- bench:{key} -->") == 1
    assert text.startswith("# Benchmarks\n\nintro\n") and text.rstrip().endswith("more")


@pytest.mark.parametrize("native_bf16", [True, False])
def test_generation(tmp_path, text_encoder, monkeypatch, native_bf16):
    pytest.importorskip("diffusers")
    import generation
    monkeypatch.setattr(generation, "native_bf16", lambda device: native_bf16)
    # ours samples in the layout Pipeline.load would pick (here: as if that were channels_last with native bf16)
    layout = torch.channels_last if native_bf16 else torch.contiguous_format
    monkeypatch.setattr(generation, "sampling_memory_format", lambda device, size: layout)
    layouts, generate = [], generation.ours_generate
    monkeypatch.setattr(generation, "ours_generate", lambda pipe, *a: layouts.append(
        pipe.model.input_conv.weight.is_contiguous(memory_format=layout)) or generate(pipe, *a))
    doc = tmp_path / "bench.md"
    generation.main(["--arch", "shipped", "--n", "1", "--steps", "2", "--reps", "1", "--write", "--doc", str(doc)])
    lines = check_table(doc, "generation-shipped", "images")
    cells = lines[2].strip("| ").split(" | ")  # images, ours, diffusers fp32, diffusers bf16, the two ratios
    assert [c == "n/a" for c in cells[1:]] == [False, False, not native_bf16, False, not native_bf16]
    assert layouts and all(layouts)
    assert f"picks here ({'channels_last' if native_bf16 else 'NCHW'})" in doc.read_text()


@pytest.mark.parametrize("native_bf16", [True, False])
def test_training(tmp_path, folder_data, monkeypatch, native_bf16):
    pytest.importorskip("diffusers")
    import training
    probed = []

    def small_peak(dtype, seconds):  # the real probe, at a size that is quick even where bf16 is emulated
        probed.append(dtype)
        return common.matmul_peak(dtype, n=256, seconds=seconds)
    monkeypatch.setattr(training, "matmul_peak", small_peak)
    monkeypatch.setattr(training, "native_bf16", lambda device: native_bf16)
    doc = tmp_path / "bench.md"
    training.main(["--arch", "tiny", "--data", str(folder_data), "--cache-dir", str(tmp_path), "--batch", "4",
                   "--precisions", "fp32", "--reps", "1", "--peak-seconds", "0.1", "--write", "--doc", str(doc)])
    lines = check_table(doc, "training-tiny", "precision")
    assert lines[2].startswith("| fp32 |")
    # without native bf16 its peak is not probed (emulated: minutes) and its column says so
    assert probed == ([torch.float32, torch.bfloat16] if native_bf16 else [torch.float32])
    assert (lines[2].split(" | ")[6] == "n/a") != native_bf16


def test_layout(tmp_path, folder_data):
    import layout
    doc = tmp_path / "bench.md"
    layout.main(["--arch", "tiny", "--data", str(folder_data), "--cache-dir", str(tmp_path), "--batch", "4",
                 "--reps", "1", "--write", "--doc", str(doc)])
    lines = check_table(doc, "layout-tiny", "training step layout")
    assert [line.split(" | ")[0] for line in lines[2:5]] == \
        ["| NCHW", "| channels_last, PyTorch's GroupNorm", "| channels_last, the model's GroupNorm"]
    assert [line.split(" | ")[4] for line in lines[2:5]].count("yes |") == 1  # the layout the trainer picks here
    text = doc.read_text()
    assert "| sampling batch |" in text and "| 8 |" in text and "| GroupNorm input |" in text
    assert "| 16x128x64x64 |" in text and "| channels_last kernel |" in text and "| via NCHW |" in text


def test_profile_step(tmp_path, folder_data):
    import profile_step
    doc = tmp_path / "bench.md"
    profile_step.main(["--arch", "tiny", "--data", str(folder_data), "--cache-dir", str(tmp_path), "--batch", "4",
                       "--reps", "1", "--precision", "fp32", "--write", "--doc", str(doc)])
    lines = check_table(doc, "profile-tiny", "kind of operator")
    rows = lines[2:lines.index(next(line for line in lines if line.startswith("| operator |")))]
    kinds = {row.split(" | ")[0].lstrip("| ") for row in rows}
    assert {"convolution forward", "convolution backward", "GroupNorm"} <= kinds  # the model's operators, sorted in
    shares = [int(row.split(" | ")[2].rstrip("% |")) for row in rows]
    assert abs(sum(shares) - 100) <= len(shares) / 2 and shares == sorted(shares, reverse=True)  # whole %s, rounded
    assert profile_step.kind_of("aten::convolution_backward") == "convolution backward"
    assert profile_step.kind_of("aten::_fused_adamw_") == "optimizer (AdamW), gradient clipping"


def test_memory(tmp_path, folder_data):
    import memory
    doc = tmp_path / "bench.md"
    memory.main(["--arch", "tiny", "--n", "1", "--steps", "2", "--data", str(folder_data), "--cache-dir", str(tmp_path),
                 "--batch", "4", "--train-steps", "1", "--train-precisions", "fp32", "--no-floor", "--write", "--doc", str(doc)])
    lines = check_table(doc, "memory-tiny", "process")
    assert len(lines) == 4 and all(float(line.split("|")[2]) > 50 for line in lines[2:])  # MiB


def test_web_latency(tmp_path):
    import web_latency

    from tests.webserver import tiny_model
    doc = tmp_path / "bench.md"
    ckpt = tiny_model(tmp_path / "tiny.safetensors")
    web_latency.main(["--checkpoint", str(ckpt), "--n", "2", "--steps", "3", "--rounds", "1", "--peak-seconds", "0.1",
                      "--write", "--doc", str(doc)])
    lines = check_table(doc, "web-latency", "images")
    first, total = map(float, lines[2].split("|")[2:4])
    assert len(lines) == 3 and 0 < first <= total
    precision = "bf16" if web_latency.bf16_pays_off("cpu") else "fp32"
    text = doc.read_text()
    assert f"the denoiser in {precision} (the app's choice here" in text
    peaks = re.search(rf"host's {precision} matrix-product peak in this run .*?: (\d+) GFLOP/s before the requests, (\d+) after", text)
    assert peaks and all(int(g) > 0 for g in peaks.groups())
    assert re.search(r'The server\'s log: "torch threads: \d+', text)  # the thread count it chose


def test_threads(tmp_path):
    import threads

    from tests.webserver import tiny_model
    doc = tmp_path / "bench.md"
    ckpt = tiny_model(tmp_path / "tiny.safetensors")
    threads.main(["--checkpoint", str(ckpt), "--batch", "2", "--calls", "2", "--rounds", "1", "--busy", "1",
                  "--write", "--doc", str(doc)])
    lines = check_table(doc, "threads", "other cores")
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["idle", "1 busy torch process"]
    assert all(float(ms) > 0 for line in lines[2:] for ms in line.split("|")[2:4])


def test_sampler_threads(tmp_path):
    import sampler_threads

    from tests.webserver import tiny_model
    doc = tmp_path / "bench.md"
    ckpt = tiny_model(tmp_path / "tiny.safetensors")
    sampler_threads.main(["--checkpoint", str(ckpt), "--rounds", "1", "--write", "--doc", str(doc)])
    lines = check_table(doc, "sampler-threads", "sampling on")
    assert [line.split("|")[1].strip() for line in lines[2:]] == sampler_threads.WAYS
    assert all(float(s) > 0 for line in lines[2:] for s in line.split("|")[2:4])


def test_every_number_in_the_benchmark_summary_comes_from_a_measured_table():
    """The summary quotes results; each number in its result column must appear in a table written by a
    command (a bench section of benchmarks.md, or an evaluate.py output in docs/evaluation*.md)."""
    docs = ROOT / "docs"
    text = (docs / "benchmarks.md").read_text()
    summary = text.split("<!-- summary -->")[1].split("<!-- /summary -->")[0]
    measured = text.split("<!-- /summary -->")[1] + "".join(p.read_text() for p in docs.glob("evaluation*.md"))
    rows = [line.split("|") for line in summary.splitlines() if line.startswith("| ") and "---" not in line][1:]
    quoted = {n for row in rows for n in re.findall(r"\d+\.\d+", row[2])}
    assert quoted, "the summary quotes measured numbers"
    assert not sorted(n for n in quoted if n not in measured), "numbers quoted without a measured table"


@pytest.mark.parametrize("bf16, amx, cap, tag", [
    (False, True, "", "fp32"), (True, False, "", "avx512-bf16"), (True, True, "", "amx"),
    (True, True, "AVX512_CORE_BF16", "amx-off"), (True, True, "avx512_core_amx", "amx")])
def test_each_cpu_kind_writes_its_own_sections(tmp_path, monkeypatch, bf16, amx, cap, tag):
    monkeypatch.setattr(common, "native_bf16", lambda device: bf16)
    monkeypatch.setattr(common.torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert common.isa_tag() == tag
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\n<!-- bench:x-other -->\nanother machine's table\n<!-- /bench:x-other -->\n")
    common.write_section("x", common.section("X", "| a |\n|---|\n| 1 |"), doc)
    text = doc.read_text()
    assert "another machine's table" in text and f"<!-- bench:x-{tag} -->" in text
    assert f"## X, {common.ISA_LABELS[tag]}" in text
