#!/usr/bin/env bash
# On an Intel Xeon with AMX: the throughput tables of the training-speed issue twice, with AMX and with it switched
# off (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16), each kind in its own sections of docs/benchmarks.md (bench/common.py
# isa_tag). About 13 minutes on 2 cores (2026-12-06, an estimate: the sum of its parts' last runs); run it on an idle
# machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
if ! grep -qw amx_bf16 /proc/cpuinfo; then
    echo "this CPU has no AMX (no amx_bf16 in /proc/cpuinfo): run bench/run_all.sh instead" >&2
    exit 1
fi
for cap in "" AVX512_CORE_BF16; do
    export ONEDNN_MAX_CPU_ISA=$cap
    [ -n "$cap" ] || unset ONEDNN_MAX_CPU_ISA
    python bench/training.py --write                              # shipped config, batch 64, against diffusers
    python bench/training.py --arch deep --write                  # the default model's config, stages 8 to 12
    python bench/training.py --arch deep3 --write                 # the default model's config since stage 13
    python bench/training.py --arch matched --batch 16 --write    # the matched config, and % of the bf16 peak
    python bench/unet_latency.py --batches 4 16 --write           # denoiser step against diffusers
    python bench/layout.py --write                                # NCHW vs channels_last
done
