#!/usr/bin/env bash
# Builds the terraform runner image from what is on this machine (no registry needed):
# the terraform binary and a static busybox, in a scratch image.
# Usage: scripts/build-runner-image.sh [TAG]   (default local/terraform:<version>)
set -euo pipefail
tf=$(command -v terraform)
bb=$(command -v busybox)
version=$("$tf" version -json 2>/dev/null | sed -n 's/.*"terraform_version": *"\([^"]*\)".*/\1/p')
tag=${1:-local/terraform:${version}}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin"
cp "$tf" "$bb" "$work/bin/"
[ "$(basename "$bb")" = busybox ] || mv "$work/bin/$(basename "$bb")" "$work/bin/busybox"
for c in sh sleep echo cat ls env mkdir rm touch test date kill; do ln -sf busybox "$work/bin/$c"; done
cat > "$work/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY bin/ /bin/
ENV PATH=/bin CHECKPOINT_DISABLE=1 TF_IN_AUTOMATION=1
WORKDIR /workspace
ENTRYPOINT ["/bin/terraform"]
DOCKERFILE
docker build -q -t "$tag" "$work" >/dev/null
echo "$tag"
