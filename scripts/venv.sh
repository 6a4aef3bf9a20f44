# Sourced by scripts/up and scripts/test: makes .venv with the locked dependencies, once.
# The stamp holds the lock file's hash, so a changed lock reinstalls.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "tfdeploy needs Python 3.11+" >&2; exit 1; }
venv="$root/.venv"
stamp="$venv/.tfdeploy-lock"
want=$(cat "$root/requirements.lock" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$root/requirements.lock"
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps -e "$root"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
