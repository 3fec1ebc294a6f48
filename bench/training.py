"""Training throughput: the step of `python train.py` vs a plain diffusers training step.

Ours is the real thing: a `Trainer` built from the same TrainConfig the CLI builds, timed over
`Trainer.train_step` on batches from its own DataLoader (data loading, prompt dropout, autocast,
backward, gradient clipping, AdamW, LR schedule, EMA: everything but the per-epoch validation,
checkpoints and sample grids). The diffusers step is what its train_text_to_image example does per
batch (DDPMScheduler.add_noise, MSE on the noise, clip, AdamW, LR schedule, EMAModel), on the same
batches, prepared outside the timing. Variants run interleaved (A B C ...), one optimizer step each;
medians over the rounds. The fraction of the matmul peak uses FLOPs counted with FlopCounterMode
over our forward + backward, and the peak of a 2048^3 matrix product measured here.

    python bench/training.py                          # shipped config, batch 64
    python bench/training.py --arch matched --batch 16
"""
import argparse
import itertools
import tempfile

import torch
import torch.nn.functional as F
from common import (
    ARCHS,
    BF16_RULE,
    DiffusersDenoiser,
    add_output_args,
    autocast,
    count_flops,
    interleaved,
    matmul_peak,
    median,
    n_params,
    ratio_of_medians,
    section,
    table,
    write_section,
)

from models.cpu import native_bf16
from train_config import TrainConfig, autocast_dtype, lr_lambda
from trainer import Trainer


def our_trainer(args, arch, precision: str, out_dir: str) -> Trainer:
    res = args.size // arch.patch_size
    cfg = TrainConfig(data=args.data, image_size=args.size, batch_size=args.batch, base_channels=arch.widths[0],
                      channel_mult=tuple(w // arch.widths[0] for w in arch.widths), num_res_blocks=arch.blocks,
                      attention_resolutions=tuple(res >> i for i in arch.attn_levels), num_heads=arch.heads,
                      patch_size=arch.patch_size, dropout=0.0, precision=precision, device="cpu",
                      out_dir=out_dir, sample_every=0, cache_dir=args.cache_dir)
    trainer = Trainer(cfg)
    trainer.model.train()
    return trainer


def forever(loader):
    while True:
        yield from loader


class DiffusersStep:
    """One optimizer step of diffusers' train_text_to_image.py loop (pixel space, no VAE)."""

    def __init__(self, arch, size, cfg: TrainConfig, batches, dtype):
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_cosine_schedule_with_warmup
        from diffusers.training_utils import EMAModel
        self.model = DiffusersDenoiser(arch, size).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.lr_sched = get_cosine_schedule_with_warmup(self.opt, cfg.warmup_steps, 100_000)
        self.ema = EMAModel(self.model.parameters(), decay=cfg.ema_decay)
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
        self.batches, self.dtype, self.clip = itertools.cycle(batches), dtype, cfg.grad_clip

    def __call__(self) -> float:
        x0, cond = next(self.batches)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (len(x0),))
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        with autocast(self.dtype):
            pred = self.model(x_t, t, cond)
        loss = F.mse_loss(pred.float(), noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.lr_sched.step()
        self.ema.step(self.model.parameters())
        return loss.item()


def training_arguments(doc: str) -> argparse.ArgumentParser:
    """The options of a benchmark of our training step: model, data, batch, rounds, threads."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="shipped")
    p.add_argument("--data", default="emoji", help="training data, as for `train.py --data`")
    p.add_argument("--cache-dir", default="data")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=6, help="timed rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_output_args(p)
    return p


def main(argv=None) -> str:
    p = training_arguments(__doc__)
    p.add_argument("--precisions", nargs="+", default=["auto", "fp32"], choices=["auto", "fp32", "bf16"],
                   help="precisions to run both sides at ('auto' is the train command's default)")
    p.add_argument("--peak-seconds", type=float, default=3.0, help="time spent measuring each matmul peak")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = ARCHS[args.arch]
    out_dir = tempfile.mkdtemp(prefix="bench_training_")
    fns, trainers = {}, {}
    for prec in args.precisions:
        torch.manual_seed(0)
        trainer = trainers[prec] = our_trainer(args, arch, prec, out_dir)
        dtype = autocast_dtype(prec, torch.device("cpu"))
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        data = forever(trainer.loader)
        fns[f"ours {name}"] = lambda trainer=trainer, data=data: trainer.train_step(*next(data))
        unfused = our_trainer(args, arch, prec, out_dir)  # the same step with PyTorch's default AdamW
        unfused.opt = torch.optim.AdamW(unfused.model.parameters(), lr=unfused.cfg.lr,
                                       weight_decay=unfused.cfg.weight_decay, foreach=True)
        unfused.lr_sched = torch.optim.lr_scheduler.LambdaLR(unfused.opt, lr_lambda(unfused.cfg, unfused.total_steps))
        fns[f"unfused {name}"] = lambda trainer=unfused, data=forever(unfused.loader): trainer.train_step(*next(data))
        batches = [(images, trainer._condition(captions, torch.zeros(len(captions), dtype=torch.bool)))
                   for images, captions in itertools.islice(trainer.loader, 4)]
        fns[f"diffusers {name}"] = DiffusersStep(arch, args.size, trainer.cfg, batches, dtype)
    r = interleaved(fns, args.reps, warmup=1)

    # FLOPs of one forward + backward of our model on one batch
    trainer = next(iter(trainers.values()))
    images, captions = next(iter(trainer.loader))
    cond = trainer._condition(captions, torch.zeros(len(captions), dtype=torch.bool))
    t = torch.randint(0, 1000, (len(images),))

    def fwd_bwd():
        trainer.diffusion.training_loss(lambda x, tt: trainer.model(x, tt, cond), images, t,
                                        torch.randn_like(images)).mean().backward()
    flops = count_flops(fwd_bwd)
    trainer.opt.zero_grad(set_to_none=True)
    # without native bf16 a 2048^3 bf16 product is emulated (about 1 GFLOP/s: minutes of warm-up), and its
    # "peak" would be no ceiling of anything the train command runs (it trains in fp32 there)
    peak = {"fp32": matmul_peak(torch.float32, seconds=args.peak_seconds),
            "bf16": matmul_peak(torch.bfloat16, seconds=args.peak_seconds) if native_bf16("cpu") else None}

    rows = []
    for name in dict.fromkeys(k.split()[1] for k in fns):
        ours, theirs = r[f"ours {name}"], r[f"diffusers {name}"]
        achieved = flops / median(ours)
        rows.append([name, f"{args.batch / median(ours):.1f}", f"{args.batch / median(theirs):.1f}",
                     f"**{ratio_of_medians(theirs, ours):.2f}x**", f"{achieved / 1e9:.0f}",
                     f"{achieved / peak['fp32']:.0%}", f"{achieved / peak['bf16']:.0%}" if peak["bf16"] else "n/a",
                     f"{ratio_of_medians(r[f'unfused {name}'], ours):.2f}x"])
        print(rows[-1])
    header = ["precision", "ours img/s", "diffusers img/s", "ours / diffusers", "ours GFLOP/s",
              "of fp32 peak", "of bf16 peak", "fused AdamW gain"]
    body = table(header, rows)
    bf16_peak = f"{peak['bf16'] / 1e9:.0f} GFLOP/s bf16" if peak["bf16"] else "bf16 not measured (no native bf16)"
    theirs_params = n_params(next(f for k, f in fns.items() if k.startswith("diffusers")).model)
    notes = (f"Config: {arch.describe()} at {args.size}px, batch {args.batch}, data `{args.data}`, dropout 0; "
             f"{n_params(trainer.model) / 1e6:.2f}M parameters ours, {theirs_params / 1e6:.2f}M diffusers. "
             f"Our forward + backward: {flops / args.batch / 1e9:.2f} GFLOP per image (FlopCounterMode). "
             f"Matmul peak measured now: {peak['fp32'] / 1e9:.0f} GFLOP/s fp32, {bf16_peak}. "
             f"Images/s are batch / median step time over {args.reps} interleaved rounds; the ratio is the median "
             f"of the per-round ratios. \"bf16\" is autocast, which `--precision auto` picks {BF16_RULE}; "
             "diffusers' training examples default to fp32 (`--mixed_precision no`). \"fused AdamW gain\": our step "
             "with PyTorch's default (foreach) AdamW over ours with the fused one (`train_config.adamw`), interleaved "
             "in the same rounds.")
    print(body + "\n\n" + notes)
    if args.write:
        write_section(f"training-{args.arch}", section(f"Training throughput ({args.arch} config)", body, notes),
                      args.doc)
    return body


if __name__ == "__main__":
    main()
