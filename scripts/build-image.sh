#!/usr/bin/env bash
# Builds the tfdeploy service image; the build itself needs no network (`--network none`):
#  1. the base: $TFDEPLOY_IMAGE_BASE if set; else python:3.11-slim, if present or pullable; else
#     local/python:3.11-bookworm-min, made here with debootstrap if missing (root, and Debian's
#     mirror: $TFDEPLOY_DEBIAN_MIRROR, else the one apt uses);
#  2. wheels/: the service section of requirements.lock and the build tools, as wheels for the
#     image's Python (CPython 3.11, glibc ≤ 2.36, this machine's architecture), fetched on the
#     host; kept while requirements.lock is unchanged;
#  3. docker build.
# Usage: scripts/build-image.sh [TAG]   (default tfdeploy:latest). Prints the image name last.
set -euo pipefail
PATH=$PATH:/usr/sbin:/sbin  # debootstrap
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tag=${1:-tfdeploy:latest}
default_base=python:3.11-slim
local_base=local/python:3.11-bookworm-min
log() { echo "build-image: $*" >&2; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

debian_mirror() {
  if [ -n "${TFDEPLOY_DEBIAN_MIRROR:-}" ]; then echo "$TFDEPLOY_DEBIAN_MIRROR"; return; fi
  local m=""
  # The host's own mirror, when the host is Debian (an Ubuntu mirror has no bookworm).
  if grep -qs '^ID=debian' /etc/os-release; then
    m=$(sed -n 's|^URIs: *\([^ ]*\).*|\1|p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1 || true)
    [ -n "$m" ] || m=$(sed -n 's|^deb *\(\[[^]]*\] *\)\?\(http[^ ]*\).*|\2|p' /etc/apt/sources.list 2>/dev/null | grep -v security | head -1 || true)
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

make_local_base() {
  command -v debootstrap >/dev/null || { log "no registry answers and debootstrap is missing (apt-get install debootstrap), or set TFDEPLOY_IMAGE_BASE"; exit 1; }
  [ "$(id -u)" = 0 ] || { log "debootstrap needs root"; exit 1; }
  local mirror rootfs
  mirror=$(debian_mirror)
  rootfs=$(mktemp -d /tmp/tfdeploy-rootfs.XXXXXX)
  log "making $local_base with debootstrap from $mirror (about a minute)"
  if ! debootstrap --variant=minbase --include=python3 bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
    tail -20 "$rootfs.log" >&2; rm -rf "$rootfs" "$rootfs.log"; exit 1
  fi
  # What a runtime needs not: apt's downloads and lists, documentation, translations, and
  # glibc's iconv modules (8 MB; Python's codecs are its own, UTF-8 is built into glibc).
  rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/{doc,man,locale,info}/* \
    "$rootfs"/usr/lib/*-linux-gnu/gconv
  tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$local_base" >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
}

# 1. The base.
if [ -n "${TFDEPLOY_IMAGE_BASE:-}" ]; then
  base=$TFDEPLOY_IMAGE_BASE
elif have_image "$default_base" || timeout 120 docker pull -q "$default_base" >/dev/null 2>&1; then
  base=$default_base
else
  base=$local_base
  if ! have_image "$base"; then
    # One maker at a time on this host (several checkouts may build at once).
    exec 9>/tmp/tfdeploy-image-base.lock
    flock 9
    have_image "$base" || make_local_base
    flock -u 9
  fi
fi
log "base: $base"

# 2. The wheelhouse.
wheels="$root/wheels"
arch=$(uname -m)
platforms=(--platform "manylinux2014_$arch")
for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_$arch"); done
want=$(mktemp)
trap 'rm -f "$want"' EXIT
# The service section (from its heading to the blank line), then the build tools.
{
  sed -n '/^# The service/,/^$/p' "$root/requirements.lock" | grep '=='
  sed -n '/^# Build tools/,/^$/p' "$root/requirements.lock" | grep '=='
} | sed 's/ *#.*//' > "$want"
stamp=$(cat "$want" <(echo "${platforms[*]}") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$wheels/.stamp" 2>/dev/null)" != "$stamp" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py=${PYTHON:-python3}; fi
  log "wheelhouse: fetching $(wc -l < "$want") wheels for CPython 3.11 $arch"
  rm -rf "$wheels"
  fetch() {
    "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary :all: \
      --python-version 3.11 --implementation cp --abi cp311 "${platforms[@]}" -d "$wheels" "$@"
  }
  if ! fetch -r "$want" 2>/dev/null; then
    # One at a time: a package published only as a source distribution is built into a wheel
    # here, which suits the image only if it is pure Python.
    while read -r pin; do
      fetch "$pin" 2>/dev/null && continue
      "$py" -m pip wheel -q --disable-pip-version-check --no-deps --no-binary :all: -w "$wheels" "$pin"
      name=$(echo "${pin%%==*}" | tr 'A-Z.-' 'a-z__')
      ls "$wheels" | tr 'A-Z' 'a-z' | grep -q "^${name}-.*-none-any\.whl$" \
        || { log "$pin has no wheel for CPython 3.11 $arch and is not pure Python"; exit 1; }
    done < "$want"
  fi
  # Compiled extensions ship their debug symbols (uvloop's is 13 MB, 1.6 MB without): strip
  # them as Debian strips its own shared libraries, and write each wheel's RECORD anew.
  if command -v strip >/dev/null; then
    "$py" - "$wheels" <<'PY'
import base64, hashlib, subprocess, sys, tempfile, zipfile
from pathlib import Path

def digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        infos = z.infolist()
        data = {i.filename: z.read(i) for i in infos}
    elf = [n for n, d in data.items() if d[:4] == b"\x7fELF"]
    if not elf:
        continue
    with tempfile.TemporaryDirectory() as tmp:
        for n in elf:
            f = Path(tmp, "x.so")
            f.write_bytes(data[n])
            subprocess.run(["strip", "--strip-unneeded", str(f)], check=True)
            data[n] = f.read_bytes()
    record = next(n for n in data if n.endswith(".dist-info/RECORD"))
    lines = [f"{n},{digest(d)},{len(d)}" for n, d in data.items() if n != record]
    data[record] = ("\n".join([*lines, f"{record},,"]) + "\n").encode()
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as z:
        for i in infos:
            z.writestr(i, data[i.filename], compress_type=zipfile.ZIP_DEFLATED)
PY
  else
    log "no strip on this host: extensions keep their debug symbols (the image is ~20 MB larger)"
  fi
  # What the image installs: the service section alone (the build tools stay in the wheelhouse).
  sed -n '/^# The service/,/^$/p' "$root/requirements.lock" | grep '==' | sed 's/ *#.*//' > "$wheels/requirements.txt"
  echo "$stamp" > "$wheels/.stamp"
fi

# 3. The image.
log "docker build $tag"
build_log=$(mktemp)
trap 'rm -f "$want" "$build_log"' EXIT
if ! docker build --network none --build-arg "BASE=$base" -t "$tag" "$root" >"$build_log" 2>&1; then
  tail -40 "$build_log" >&2
  exit 1
fi
echo "$tag"
