# Sourced by scripts/up and scripts/test: makes .venv from the lock files, once.
#   source scripts/venv.sh        the runtime lock (requirements.lock): scripts/up
#   source scripts/venv.sh test   and the test lock (requirements-test.lock) on top: scripts/test
# The stamp holds a hash of each lock installed. A changed lock makes the venv anew (a package
# dropped from a lock must not linger); a venv made for up gains the test lock when test runs,
# and one made for test serves up as it is.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "tfdeploy needs Python 3.11+" >&2; exit 1; }
venv="$root/.venv"
stamp="$venv/.tfdeploy-lock"
want_test=${1:-}
runtime_hash=$(cat "$root/requirements.lock" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)
test_hash=$(sha256sum < "$root/requirements-test.lock" | cut -d' ' -f1)
have_runtime=$(sed -n 1p "$stamp" 2>/dev/null || true)
have_test=$(sed -n 2p "$stamp" 2>/dev/null || true)
# The locks are complete (scripts/lock): --no-deps, so nothing outside them comes in.
install=("$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps)
if [ ! -x "$venv/bin/python" ] || [ "$have_runtime" != "$runtime_hash" ] \
   || { [ -n "$want_test" ] && [ -n "$have_test" ] && [ "$have_test" != "$test_hash" ]; }; then
  "$py" -m venv --clear "$venv"
  "${install[@]}" -r "$root/requirements.lock"
  # The build backend is the locked one, already in the venv. (Its warning that a folder named
  # like the package may shadow it is moot here: the folder is the package.)
  PYTHONWARNINGS=ignore "${install[@]}" --no-build-isolation -e "$root"
  echo "$runtime_hash" > "$stamp"
  have_test=""
fi
if [ -n "$want_test" ] && [ "$have_test" != "$test_hash" ]; then
  "${install[@]}" -r "$root/requirements-test.lock"
  printf '%s\n%s\n' "$runtime_hash" "$test_hash" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
