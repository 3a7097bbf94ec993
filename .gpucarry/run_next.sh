#!/bin/bash
# session 25, call 2: every test file with GPU tests (the activation epilogue now on by default); decode with and
# without it, int4 and nf4, same run
cd "$(dirname "$0")/.."
export PYTHONPATH=src
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 330 python -m pytest -q -p no:cacheprovider tests/inference/test_fusion.py tests/inference/test_static_decode.py tests/inference/test_static_kv.py tests/inference/test_speculative.py tests/inference/test_generate_command.py tests/nn/test_triton_gemv.py tests/nn/test_mma_gemv.py \
  tests/nn/test_mma_layout.py tests/nn/test_ops.py tests/nn/test_dynamic_fp8.py tests/nn/test_dynamic.py \
  tests/nn/test_quant_embedding.py tests/prune/test_sparse_gpu.py tests/eval/test_speed.py tests/algorithms/test_smoothquant.py 2>&1 | grep -E "passed|failed|FAILED|ERROR" | tail -12
timeout 170 python bench/decode.py --user-path --shape llama2-7b --formats int4/g128 nf4/g64 --paths auto auto+noact \
  --prompt 512 --steps 128 --json $OUT/decode_user_llama2_noact.json 2>&1 | tail -6
