#!/usr/bin/env bash
# Two H200s of one host, about 8 minutes: `torchrun --nproc-per-node 2 -m train` against one GPU (issue 12).
#   bash bench/gpu_check_train_2gpu.sh   # details under $OUT when it is set, else under a temporary directory
# Table: tiny's tokens/s on 1 GPU and on 2 (DDP and FSDP) at the same global batch of 256 x 1024 (goal: >= 1.8x),
# small on 2 GPUs with FSDP, and the 1- vs 2-GPU loss curves (goal: within bf16 noise, i.e. about the gap between
# two identical 1-GPU runs, the last row); then the two-GPU test of tests/test_train_gpu.py.
exec bash "$(dirname "$0")/gpu_check_train.sh" two-gpu
