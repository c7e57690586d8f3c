#!/usr/bin/env bash
# ONNX Runtime for the C++ runner, without touching the system or the repository's tracked files:
# - the C/C++ headers from Debian trixie's libonnxruntime-dev (bookworm has no package), fetched with
#   `apt-get download` under a temporary apt configuration (nothing in /etc is changed);
# - the library itself from the Python wheel (onnxruntime/capi/libonnxruntime.so.1.*), linked, not copied.
# Result: DEST/include/*.h and DEST/lib/libonnxruntime.so{,.1}; DEST defaults to .third_party/onnxruntime
# (git-ignored). Then: cmake -S . -B build -DONNXRUNTIME_ROOT=DEST (the default when it exists).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dest=${1:-$root/.third_party/onnxruntime}
python=${PYTHON:-$root/.venv/bin/python}
suite=${DEBIAN_SUITE:-trixie}

wheel_lib=$("$python" -c 'import glob, os, onnxruntime as o
libs = sorted(glob.glob(os.path.join(os.path.dirname(o.__file__), "capi", "libonnxruntime.so.1*")))
print(libs[-1] if libs else "")')
if [ -z "$wheel_lib" ]; then
    echo "no libonnxruntime.so.1.* in $python's onnxruntime wheel" >&2
    exit 1
fi

if [ ! -f "$dest/include/onnxruntime_cxx_api.h" ]; then
    command -v apt-get >/dev/null && command -v dpkg >/dev/null || { echo "need apt-get and dpkg for the headers" >&2; exit 1; }
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/sources.list.d" "$tmp/preferences.d" "$tmp/pkg"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    echo "deb [signed-by=$keyring] http://deb.debian.org/debian $suite main" > "$tmp/sources.list"
    cat > "$tmp/apt.conf" <<CONF
Dir::Etc::SourceList "$tmp/sources.list";
Dir::Etc::SourceParts "$tmp/sources.list.d";
Dir::Etc::Preferences "$tmp/preferences";
Dir::Etc::PreferencesParts "$tmp/preferences.d";
Dir::State::Lists "$tmp/lists";
Dir::Cache "$tmp/cache";
APT::Sandbox::User "$(id -un)";
CONF
    export APT_CONFIG="$tmp/apt.conf"
    echo "fetching libonnxruntime-dev headers from Debian $suite (temporary apt configuration in $tmp)"
    apt-get -qq update
    (cd "$tmp/pkg" && apt-get -qq download libonnxruntime-dev)
    dpkg -x "$tmp"/pkg/libonnxruntime-dev_*.deb "$tmp/x"
    header=$(find "$tmp/x" -name onnxruntime_cxx_api.h | head -n 1)
    [ -n "$header" ] || { echo "libonnxruntime-dev carries no onnxruntime_cxx_api.h" >&2; exit 1; }
    mkdir -p "$dest/include"
    cp "$(dirname "$header")"/*.h "$dest/include/"
    dpkg-deb -f "$tmp"/pkg/libonnxruntime-dev_*.deb Version > "$dest/include/DEBIAN_VERSION"
fi

mkdir -p "$dest/lib"
ln -sf "$wheel_lib" "$dest/lib/libonnxruntime.so.1"
ln -sf "$wheel_lib" "$dest/lib/libonnxruntime.so"
echo "ONNX Runtime ready in $dest: headers $(cat "$dest/include/DEBIAN_VERSION" 2>/dev/null || echo '?') (Debian $suite), library $wheel_lib"
