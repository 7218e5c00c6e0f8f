# Sourced by demo.sh and test.sh from the repository root: makes sure .venv exists and holds
# this package with its test extras, installing again only when pyproject.toml changed.
# Needs Python 3.10+ with venv and pip (PYTHON=/path/to/python3.x picks another interpreter).

PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ ! -x .venv/bin/python ]]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "error: $PYTHON must be Python 3.10 or newer (set PYTHON=/path/to/python3.x)" >&2
        exit 1
    fi
    echo "creating .venv with $("$PYTHON" --version)" >&2
    "$PYTHON" -m venv .venv
fi

# Install (again) when pyproject.toml changed since the last install, or nothing is installed.
# (-I keeps the repository directory off sys.path, so only an installed package is found.)
stamp=.venv/.taskiq-beat-install
read -r wanted installed < <(.venv/bin/python -I - <<'PY'
import hashlib
import importlib.util

with open("pyproject.toml", "rb") as file:
    digest = hashlib.sha256(file.read()).hexdigest()
print(digest, "yes" if importlib.util.find_spec("taskiq_beat") else "no")
PY
) || true
if [[ "$installed" != yes || ! -f "$stamp" || "$(cat "$stamp")" != "$wanted" ]]; then
    echo "installing taskiq-beat and its test dependencies into .venv" >&2
    .venv/bin/python -m pip install -q -e '.[test]'
    echo "$wanted" > "$stamp"
fi
