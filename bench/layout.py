"""Memory layout of the training step: NCHW (what ships) against channels_last, and why.

oneDNN's convolutions are faster in channels_last (on AMX several times, in bf16), but a model is only as
channels_last as its slowest layer. This measures the training step three ways, interleaved:
NCHW; the whole model channels_last; channels_last with each GroupNorm converting to NCHW and back.
Then GroupNorm alone (forward + backward) at each of the model's shapes, in both layouts and dtypes
(CPU autocast runs group_norm in bf16: it is not on autocast's fp32 list).

    python bench/layout.py                 # shipped config, batch 64
    python bench/layout.py --threads 1
"""
import itertools
import tempfile

import torch
import torch.nn.functional as F
from common import interleaved, median, section, table, write_section
from torch import nn
from training import ARCHS, forever, our_trainer, training_arguments

CL = torch.channels_last


class NCHWGroupNorm(nn.GroupNorm):
    """GroupNorm that runs its kernel on an NCHW copy and hands back channels_last."""

    def forward(self, x):
        y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
        return y.contiguous(memory_format=CL)


def to_channels_last(trainer, group_norm_via_nchw: bool) -> None:
    """The trainer's model and its EMA copy in channels_last (a mixed-layout EMA update would be slow), each
    GroupNorm converting around its kernel if asked. The parameters stay the same objects: the optimizer and
    its schedule keep working on them."""
    for model in (trainer.model, trainer.ema.module):
        model.to(memory_format=CL)
        for m in model.modules():
            if group_norm_via_nchw and type(m) is nn.GroupNorm:
                m.__class__ = NCHWGroupNorm


def group_norm_shapes(trainer, images, captions) -> list[tuple]:
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append((tuple(i[0].shape), m.num_groups)))
             for m in trainer.model.modules() if isinstance(m, nn.GroupNorm)]
    trainer.train_step(images, captions)
    for h in hooks:
        h.remove()
    return sorted(set(shapes))


def group_norm_step(shape, groups, dtype, layout):
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
    w, b = torch.ones(shape[1], requires_grad=True), torch.zeros(shape[1], requires_grad=True)
    grad = torch.randn(shape, dtype=dtype).contiguous(memory_format=layout)
    return lambda: F.group_norm(x, groups, w, b).backward(grad)


def main(argv=None) -> str:
    args = training_arguments(__doc__).parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = tempfile.mkdtemp(prefix="bench_layout_")
    variants = {"NCHW": None, "channels_last": False, "channels_last, GroupNorm via NCHW": True}
    fns, trainers = {}, {}
    for name, via_nchw in variants.items():
        torch.manual_seed(0)
        trainer = trainers[name] = our_trainer(args, ARCHS[args.arch], "auto", out_dir)
        if via_nchw is not None:
            to_channels_last(trainer, via_nchw)
    batches = list(itertools.islice(forever(trainers["NCHW"].loader), 4))
    for name, trainer in trainers.items():
        data = itertools.cycle(batches)
        fns[name] = lambda trainer=trainer, data=data: trainer.train_step(*next(data))
    steps = interleaved(fns, args.reps, warmup=1)
    base = median(steps["NCHW"])
    rows = [[name, f"{median(t) * 1000:.0f}", f"{args.batch / median(t):.1f}", f"**{base / median(t):.2f}x**"]
            for name, t in steps.items()]
    body = table(["layout", "step ms", "img/s", "speed vs NCHW"], rows)

    dtype = torch.bfloat16 if trainers["NCHW"].amp_dtype == torch.bfloat16 else torch.float32
    gn_rows = []
    for shape, groups in group_norm_shapes(trainers["NCHW"], *batches[0]):
        kernels = {f"{str(d).removeprefix('torch.')} {lay}": group_norm_step(shape, groups, d, layout)
                   for d in dict.fromkeys([dtype, torch.float32])
                   for lay, layout in (("NCHW", torch.contiguous_format), ("channels_last", CL))}
        t = interleaved(kernels, args.reps, warmup=1, min_time=0.02)
        gn_rows.append(["x".join(map(str, shape)), *(f"{median(v) * 1000:.2f}" for v in t.values())])
    gn_body = table(["GroupNorm input", *(f"{k} ms" for k in kernels)], gn_rows)
    body = f"{body}\n\nGroupNorm forward + backward at the model's shapes (32 groups or fewer):\n\n{gn_body}"
    notes = (f"Config: {ARCHS[args.arch].describe()} at {args.size}px, batch {args.batch}, data `{args.data}`, "
             "the train command's default precision (bf16 autocast on CPUs with native bf16); a full optimizer step "
             f"(`Trainer.train_step`), medians of {args.reps} interleaved rounds.")
    print(body + "\n\n" + notes)
    if args.write:
        write_section(f"layout-{args.arch}", section(f"Memory layout of the training step ({args.arch} config)",
                                                     body, notes), args.doc)
    return body


if __name__ == "__main__":
    main()
