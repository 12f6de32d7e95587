#!/usr/bin/env bash
# Build a pinned, unmodified llama.cpp for checking and benchmarking GGUF exports.
#
# The source is the llama.cpp tree vendored by the llama-cpp-python sdist on PyPI (the only
# llama.cpp release the package registries serve), pinned by version and checksum below. It is
# built once with CMake and the C++ compiler already on the machine, and cached under
# $SEAP_CACHE_DIR/llama.cpp/<version> (default ~/.cache/seap):
#
#   build/bin/libllama.so ...   the shared libraries
#   build/bin/llama-bench       llama.cpp's own benchmark (prompt processing and generation tokens/s)
#   build/bin/llama-quantize    quantisation of an exported float16/float32 GGUF (Q8_0, Q4_K_M, ...)
#   python/                     the llama_cpp Python binding of the same release (ctypes, no build)
#   ENV                         the variables that point seap at this build (sourced by the tests)
#
# Usage:   bash scripts/build_llama_cpp.sh          (about 10 minutes on 2 cores, once)
# Then:    the llama.cpp tests and `seap bench --llama-cpp` find the build by itself
#          (or set SEAP_LLAMA_CPP to another build folder laid out the same way).
#
#   SEAP_LLAMA_CPP_JOBS   parallel compile jobs (default: number of cores)
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.3.36  # llama-cpp-python; its vendor/llama.cpp is llama.cpp commit 0c1e570 (2026-10-01)
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
CACHE="${SEAP_CACHE_DIR:-$HOME/.cache/seap}/llama.cpp/$VERSION"
JOBS="${SEAP_LLAMA_CPP_JOBS:-$(nproc)}"
PY="${SEAP_PYTHON_BIN:-.venv/bin/python}"

if [ -f "$CACHE/ENV" ] && [ -x "$CACHE/build/bin/llama-bench" ]; then
  echo "[llama.cpp] already built: $CACHE"
  exit 0
fi
command -v cmake >/dev/null || { echo "[llama.cpp] cmake not found: install CMake (>= 3.14)" >&2; exit 2; }
command -v c++ >/dev/null || { echo "[llama.cpp] no C++ compiler (c++) found: install g++ or clang++" >&2; exit 2; }
[ -x "$PY" ] || { echo "[llama.cpp] $PY not found: run bash scripts/setup.sh first" >&2; exit 2; }

mkdir -p "$(dirname "$CACHE")"
WORK="$(mktemp -d "$(dirname "$CACHE")/.build-$VERSION.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "[llama.cpp] downloading the llama-cpp-python $VERSION sdist (source only, no dependencies)"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
  "llama-cpp-python==$VERSION" -d "$WORK/dl"
SDIST="$(ls "$WORK"/dl/llama_cpp_python-*.tar.gz)"
echo "$SHA256  $SDIST" | sha256sum -c --quiet - || { echo "[llama.cpp] checksum mismatch for $SDIST" >&2; exit 3; }
tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION"

echo "[llama.cpp] configuring (CPU, shared libraries, native instructions)"
cmake -S "$SRC/vendor/llama.cpp" -B "$WORK/out/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON > "$WORK/configure.log" 2>&1 \
  || { tail -30 "$WORK/configure.log" >&2; exit 4; }
echo "[llama.cpp] compiling with $JOBS jobs (log: build.log in the cache folder)"
cmake --build "$WORK/out/build" --config Release -j "$JOBS" --target llama llama-bench llama-quantize \
  > "$WORK/out/build.log" 2>&1 || { tail -40 "$WORK/out/build.log" >&2; exit 5; }

# the Python binding of the same release: pure ctypes, pointed at the libraries built above
mkdir -p "$WORK/out/python"
cp -r "$SRC/llama_cpp" "$WORK/out/python/"
"$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$WORK/out/python" "diskcache==5.6.3"
git -C "$SRC/vendor/llama.cpp" log -1 --format=%H 2>/dev/null > "$WORK/out/COMMIT" || echo "0c1e570" > "$WORK/out/COMMIT"
LIBDIR="$(dirname "$(find "$WORK/out/build" -name 'libllama.so' | head -1)")"
LIBDIR_FINAL="${LIBDIR/$WORK\/out/$CACHE}"
cat > "$WORK/out/ENV" <<EOF
LLAMA_CPP_VERSION=$VERSION
LLAMA_CPP_LIB_PATH=$LIBDIR_FINAL
LLAMA_CPP_BIN=$CACHE/build/bin
LLAMA_CPP_PYTHON=$CACHE/python
EOF
rm -rf "$CACHE"
mv "$WORK/out" "$CACHE"
echo "[llama.cpp] built: $CACHE"
cat "$CACHE/ENV"
