#!/usr/bin/env bash
# Run HERE (the CPU machine) before a device call: puts what the lent GPU machine lacks into
# git-ignored folders that the call carries (see ../shared/gpu-box.md):
#   .whl/          wheels missing there, for Python 3.12 x86_64: gguf; pytest-xdist + execnet
#                  (the GPU suite compiles a kernel per case, ~4-8 s a test: `-n 12` runs the
#                  compiles on the box's 16 cores, so the suite fits the device budget)
#   .cache/gguf/   the embedded SmolLM2 GGUF split into two pieces (one call carries <= 64 MiB)
# Then: run(command="bash scripts/gpu_run.sh ...", carry=[".whl", ".cache/gguf/part-aa"]) and,
# while the machine is still warm, the same with ".cache/gguf/part-ab".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ORBIT_VENV:-$PWD/.venv}"
mkdir -p "$(git rev-parse --git-dir)/info"
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.cache/' .git/info/exclude 2>/dev/null || echo '/.cache/' >> .git/info/exclude
mkdir -p .whl .cache/gguf
for pkg in gguf==0.19.0 pytest-xdist==3.8.0 execnet==2.1.1; do
  "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$pkg"
done
GGUF="$("$VENV/bin/python" -c 'from orbit.assets import default_gguf_path; print(default_gguf_path())')"
if [ ! -f .cache/gguf/part-aa ]; then
  split -b 50M "$GGUF" .cache/gguf/part-
fi
sha256sum "$GGUF" | awk '{print $1}' > .cache/gguf/SHA256
cp .cache/gguf/SHA256 .whl/SMOLLM2_SHA256
ls -la .whl .cache/gguf
