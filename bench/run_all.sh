#!/usr/bin/env bash
# Regenerates every table of docs/benchmarks.md (about 29 minutes on 2 cores, an estimate: the sum of its parts' last runs). Run it on an idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
python bench/unet_latency.py --write                                  # matched config, 32/64 px, batch 1/4/16
python bench/unet_latency.py --arch shipped --sizes 32 --write        # the shipped config until stage 7
python bench/unet_latency.py --arch deep --sizes 32 --batches 2 8 16 --write  # the default since stage 8: the app's 1 and 4 images with guidance, and 16
python bench/unet_latency.py --peer transformer --batches 4 --write   # diffusers' SD-style attention blocks
python bench/unet_latency.py --compile --batches 4 --write            # ours under torch.compile
python bench/generation.py --write                                    # shipped config, 1 and 4 images
python bench/generation.py --arch matched --write
python bench/training.py --write                                      # shipped config, batch 64
python bench/training.py --arch deep --write                          # the default model's config, stages 8 to 12
python bench/training.py --arch deep3 --write                         # the default model's config since stage 13
python bench/training.py --arch matched --batch 16 --write
python bench/layout.py --write                                        # NCHW vs channels_last training step, GroupNorm per layout
python bench/layout.py --arch deep3 --data mix --write               # the same at the default model's config
python bench/profile_step.py --arch deep --data mix --write           # where the deep config's training step goes
python bench/profile_step.py --arch deep3 --data mix --write          # the same at the default model's config
python bench/memory.py --write
python bench/web_latency.py --write                                   # web app: first preview and finished batch, shipped model
python bench/threads.py --write                                       # web app's denoiser call beside a busy core: OpenMP default vs PASSIVE
# on an Intel Xeon with AMX, bench/amx_pair.sh writes the throughput tables with AMX on and off
