"""python train.py: train a text-conditioned diffusion model (every flag is a field of trainer.TrainConfig).

    python train.py --data emoji --epochs 50
    torchrun --nproc_per_node 4 train.py --data path/to/tiny-imagenet-200 --image-size 64
"""
import argparse
from dataclasses import fields

from diffusion import PREDICTIONS
from trainer import TrainConfig, Trainer

CHOICES = {"schedule": ["cosine", "linear"], "precision": ["auto", "fp32", "bf16", "fp16"],
           "prediction": list(PREDICTIONS), "lr_decay": ["cosine", "constant"]}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a text-conditioned diffusion model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        flag, kw = "--" + f.name.replace("_", "-"), {"help": f.metadata["help"], "default": f.default}
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(f.default, tuple):
            p.add_argument(flag, nargs="*", type=str if f.name == "sample_prompts" else int, **kw)
        else:
            p.add_argument(flag, type=type(f.default), choices=CHOICES.get(f.name), **kw)
    return p


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    try:
        cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()})
    except ValueError as error:
        p.error(str(error))  # usage and the message, exit status 2
    Trainer(cfg).train()


if __name__ == "__main__":
    main()
