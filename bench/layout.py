"""Memory layout: NCHW against channels_last, for the training step and for the sampler's network call, and why.

oneDNN's convolutions are faster in channels_last (on AMX several times, in bf16), but a model is only as
channels_last as its slowest layer. This measures the training step three ways, interleaved: NCHW (what
training uses); channels_last with PyTorch's channels_last GroupNorm kernel; channels_last with the model's
GroupNorm (models.modules.GroupNorm: PyTorch's NCHW kernel on a copy). Then the sampler's network call
(inference, the sampler's precision) in NCHW and channels_last at the web app's batch and a larger one, with
the layout `models.cpu.sampling_memory_format` picks on this CPU. Then GroupNorm alone (forward + backward)
at each of the model's shapes, in both layouts and dtypes (CPU autocast runs group_norm in bf16: it is not on
autocast's fp32 list).

    python bench/layout.py                 # shipped config, batch 64
    python bench/layout.py --threads 1
"""
import copy
import itertools
import tempfile

import torch
import torch.nn.functional as F
from common import (
    ARCHS,
    BF16_RULE,
    autocast,
    interleaved,
    layout_name,
    median,
    our_unet,
    random_condition,
    report,
    table,
)
from torch import nn
from training import forever, our_trainer, training_arguments

from models.cpu import native_bf16, sampling_memory_format, training_memory_format
from models.modules import CHANNELS_LAST_GROUP_NORM_MIN_PIXELS, GroupNorm

CL = torch.channels_last
SAMPLING_BATCHES = (8, 32)  # the web app's 4 images under guidance; a batch of evaluate.py's size


def to_layout(trainer, layout, pytorch_group_norm: bool = False) -> None:
    """The trainer's model and its EMA copy in `layout` (a mixed-layout EMA update would be slow), with PyTorch's
    own GroupNorm kernel if asked (the class swapped in place: the parameters stay the same objects, so the
    optimizer and its schedule keep working on them). Before the first step: the optimizer's state is made then."""
    for model in (trainer.model, trainer.ema.module):
        model.to(memory_format=layout)
        for m in model.modules():
            if pytorch_group_norm and isinstance(m, GroupNorm):
                m.__class__ = nn.GroupNorm


def sampling_rows(args) -> list[list[str]]:
    """The sampler's network call (inference at its precision) in both layouts, interleaved, per batch: one copy of
    the model per layout, so that no call times a conversion of the weights."""
    nchw = our_unet(ARCHS[args.arch], args.size).eval().requires_grad_(False)
    models = {"NCHW": nchw, "channels_last": copy.deepcopy(nchw).to(memory_format=CL)}
    dtype = torch.bfloat16 if native_bf16("cpu") else torch.float32
    pick = layout_name(sampling_memory_format("cpu", args.size // ARCHS[args.arch].patch_size))
    rows = []
    for batch in SAMPLING_BATCHES:
        x, t, cond = torch.randn(batch, 3, args.size, args.size), torch.full((batch,), 500), random_condition(batch)

        def call(model):
            def run():
                with torch.inference_mode(), autocast(dtype):
                    model(x, t, cond)
            return run
        times = interleaved({name: call(m) for name, m in models.items()}, args.reps, warmup=1, min_time=0.2)
        base, cl = median(times["NCHW"]), median(times["channels_last"])
        rows.append([str(batch), f"{base * 1000:.1f}", f"{cl * 1000:.1f}", f"**{base / cl:.2f}x**", pick])
    return rows


def group_norm_shapes(trainer, images, captions) -> list[tuple]:
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append((tuple(i[0].shape), m.num_groups)))
             for m in trainer.model.modules() if isinstance(m, nn.GroupNorm)]
    trainer.train_step(images, captions)
    for h in hooks:
        h.remove()
    return sorted(set(shapes))


def group_norm_step(shape, groups, dtype, layout, norm=None):
    """Forward + backward of F.group_norm, or of the model's GroupNorm module if given."""
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
    w, b = torch.ones(shape[1], requires_grad=True), torch.zeros(shape[1], requires_grad=True)
    grad = torch.randn(shape, dtype=dtype).contiguous(memory_format=layout)
    return lambda: (norm(x) if norm else F.group_norm(x, groups, w, b)).backward(grad)


def inference_group_norm_rows(dtype, channels=128, batch=16) -> list[list[str]]:
    """GroupNorm without gradient on a channels_last input, per feature-map size: PyTorch's channels_last kernel
    against the NCHW kernel on an NCHW copy (what models.modules.GroupNorm picks by CHANNELS_LAST_GROUP_NORM_MIN_PIXELS)."""
    rows = []
    for side in (8, 16, 32, 64):
        x = torch.randn(batch, channels, side, side, dtype=dtype).contiguous(memory_format=CL)
        w, b = torch.ones(channels), torch.zeros(channels)
        ways = {"kernel": lambda: F.group_norm(x, 32, w, b),
                "copy": lambda: F.group_norm(x.contiguous(), 32, w, b).contiguous(memory_format=CL)}
        with torch.inference_mode():
            t = interleaved(ways, 5, warmup=1, min_time=0.02)
        pick = "kernel" if side * side >= CHANNELS_LAST_GROUP_NORM_MIN_PIXELS else "copy"
        rows.append([f"{batch}x{channels}x{side}x{side}", f"{median(t['kernel']) * 1000:.2f}",
                     f"{median(t['copy']) * 1000:.2f}", {"kernel": "channels_last kernel", "copy": "via NCHW"}[pick]])
    return rows


def main(argv=None) -> str:
    args = training_arguments(__doc__).parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = tempfile.mkdtemp(prefix="bench_layout_")
    variants = {"NCHW": (torch.contiguous_format, False), "channels_last, PyTorch's GroupNorm": (CL, True),
                "channels_last, the model's GroupNorm": (CL, False)}
    fns, trainers = {}, {}
    for name, (layout, pytorch_group_norm) in variants.items():
        torch.manual_seed(0)
        trainer = trainers[name] = our_trainer(args, ARCHS[args.arch], "auto", out_dir)
        to_layout(trainer, layout, pytorch_group_norm)
    picked = training_memory_format("cpu", trainers["NCHW"].amp_dtype)
    batches = list(itertools.islice(forever(trainers["NCHW"].loader), 4))
    for name, trainer in trainers.items():
        data = itertools.cycle(batches)
        fns[name] = lambda trainer=trainer, data=data: trainer.train_step(*next(data))
    steps = interleaved(fns, args.reps, warmup=1)
    base = median(steps["NCHW"])
    picked_name = "NCHW" if picked == torch.contiguous_format else "channels_last, the model's GroupNorm"
    rows = [[name, f"{median(t) * 1000:.0f}", f"{args.batch / median(t):.1f}", f"**{base / median(t):.2f}x**",
             "yes" if name == picked_name else ""] for name, t in steps.items()]
    body = table(["training step layout", "step ms", "img/s", "speed vs NCHW", "picked here"], rows)
    sampling = table(["sampling batch", "NCHW ms", "channels_last ms", "channels_last speed", "picked here"],
                     sampling_rows(args))
    body += f"\n\nThe sampler's network call (inference, the sampler's precision; the model's GroupNorm):\n\n{sampling}"

    dtype = torch.bfloat16 if trainers["NCHW"].amp_dtype == torch.bfloat16 else torch.float32
    gn_rows = []
    for shape, groups in group_norm_shapes(trainers["NCHW"], *batches[0]):
        kernels = {f"{str(d).removeprefix('torch.')} {lay}": group_norm_step(shape, groups, d, layout)
                   for d in dict.fromkeys([dtype, torch.float32])
                   for lay, layout in (("NCHW", torch.contiguous_format), ("channels_last", CL))}
        model_norm = GroupNorm(groups, shape[1])
        kernels[f"{str(dtype).removeprefix('torch.')} channels_last, the model's GroupNorm"] = group_norm_step(
            shape, groups, dtype, CL, model_norm)
        t = interleaved(kernels, args.reps, warmup=1, min_time=0.02)
        gn_rows.append(["x".join(map(str, shape)), *(f"{median(v) * 1000:.2f}" for v in t.values())])
    gn_body = table(["GroupNorm input", *(f"{k} ms" for k in kernels)], gn_rows)
    body = f"{body}\n\nGroupNorm forward + backward at the model's shapes (32 groups or fewer):\n\n{gn_body}"
    inference = table([f"{str(dtype).removeprefix('torch.')} channels_last input", "channels_last kernel ms",
                       "via NCHW ms", "the model's GroupNorm takes"], inference_group_norm_rows(dtype))
    body += f"\n\nGroupNorm without gradient (sampling), 32 groups:\n\n{inference}"
    notes = (f"Config: {ARCHS[args.arch].describe()} at {args.size}px, batch {args.batch}, data `{args.data}`, "
             f"the train command's default precision (bf16 autocast {BF16_RULE}); a full optimizer step "
             f"(`Trainer.train_step`), medians of {args.reps} interleaved rounds. \"picked here\": the layout "
             "`Trainer` trains in on this CPU (`models.cpu.training_memory_format`) and `Pipeline.load` samples in "
             "(`models.cpu.sampling_memory_format`).")
    report(args, f"layout-{args.arch}", f"Memory layout: the training step and the sampling call ({args.arch} config)",
           body, notes)
    return body


if __name__ == "__main__":
    main()
