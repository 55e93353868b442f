#!/usr/bin/env bash
# Create or refresh a virtualenv holding fedcore (editable) with the given extras.
#
#   scripts/setup-env.sh VENV EXTRAS        e.g. scripts/setup-env.sh .venv dev,sklearn,torch
#
# Fast path (~0.2 s): the venv's stamp matches and a health check passes, so nothing runs.
# Otherwise:
#   - a venv whose python is missing or broken (partial creation, moved folder, removed
#     interpreter), or one stamped for other extras, is deleted and created afresh;
#   - a working venv with no stamp or a stale one (pyproject's [project] / [build-system]
#     tables or constraints.txt changed) is updated in place with pip; if that fails or the
#     health check still fails, it is deleted and created afresh.
# The stamp is written last, so an interrupted run is detected and repaired by the next one.
#
# Environment: PYTHON (interpreter to build with; default python3.11, then python3),
#              FEDCORE_CONSTRAINTS (pip constraints file; default constraints.txt; the TF DP
#              environment uses constraints-tfdp.txt: tensorflow-privacy holds numpy at 1.26),
#              FEDCORE_REBUILD=1 (always delete and recreate the venv).
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 VENV EXTRAS   (e.g. $0 .venv dev,sklearn,torch)" >&2
    exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV_ARG="$1"
EXTRAS="$2"
case "$VENV_ARG" in
    /*) VENV="$VENV_ARG" ;;
    *) VENV="$ROOT/$VENV_ARG" ;;
esac
VPY="$VENV/bin/python"
CONSTRAINTS="${FEDCORE_CONSTRAINTS:-constraints.txt}"
STAMP="$VENV/.fedcore-env-stamp"
SETUP_VERSION=1

say() { echo "[setup-env] $*" >&2; }

# --- the interpreter to build with -------------------------------------------------------
find_python() {
    local candidates=()
    if [[ -n "${PYTHON:-}" ]]; then candidates=("$PYTHON"); else candidates=(python3.11 python3); fi
    local c
    for c in "${candidates[@]}"; do
        if command -v "$c" >/dev/null 2>&1 &&
            "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$c"
            return 0
        fi
    done
    say "no Python >= 3.11 found (tried: ${candidates[*]}). Set PYTHON=/path/to/python3.11."
    return 1
}
BASE_PY="$(find_python)"

# --- one venv build at a time (two `make` runs may race) ---------------------------------
LOCK="${TMPDIR:-/tmp}/fedcore-venv-$(printf '%s' "$VENV" | sha256sum | cut -c1-16).lock"
exec 9>"$LOCK"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

# --- what the venv must match ------------------------------------------------------------
# Only the tables that decide what gets installed: editing [tool.ruff] must not reinstall torch.
KEY="$("$BASE_PY" - "$ROOT" "$EXTRAS" "$VENV" "$SETUP_VERSION" "$CONSTRAINTS" <<'EOF'
import hashlib, json, sys, tomllib
from pathlib import Path

root, extras, venv, version, constraints_file = sys.argv[1:]
with open(Path(root, "pyproject.toml"), "rb") as f:
    pyproject = tomllib.load(f)
constraints = Path(root, constraints_file)
h = hashlib.sha256()
h.update(json.dumps({k: pyproject.get(k) for k in ("build-system", "project")},
                    sort_keys=True).encode())
h.update(constraints.read_bytes() if constraints.exists() else b"")
h.update(f"\0{extras}\0{venv}\0{version}\0{sys.version_info[:2]}".encode())
print(h.hexdigest())
EOF
)"
WANTED_STAMP="extras=$EXTRAS key=$KEY"

# Health check: fedcore resolves to this checkout's src/, and every requirement of
# fedcore[EXTRAS] is installed at a version that satisfies it.
# The reason of the last failure is kept in HEALTH for the error message.
HEALTH=""
healthy() {
    HEALTH="$("$VPY" - "$ROOT" "$EXTRAS" 2>&1 <<'EOF'
import importlib.util, os, sys
from importlib import metadata

root, extras = sys.argv[1], {e for e in sys.argv[2].split(",") if e}
spec = importlib.util.find_spec("fedcore")
want = os.path.realpath(os.path.join(root, "src", "fedcore", "__init__.py"))
if spec is None or os.path.realpath(spec.origin or "") != want:
    sys.exit(f"fedcore is not installed from {root}")
from pip._vendor.packaging.requirements import Requirement

for line in metadata.requires("fedcore") or []:
    req = Requirement(line)
    if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
        continue
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        sys.exit(f"missing {req.name}")
    if not req.specifier.contains(version, prereleases=True):
        sys.exit(f"{req.name} {version} does not satisfy {req}")
EOF
)"
}

python_works() {
    [[ -f "$VENV/pyvenv.cfg" && -x "$VPY" ]] &&
        "$VPY" -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

pip_install() {
    say "installing fedcore[$EXTRAS] into ${VENV#"$ROOT"/} (from scratch: a minute or two)..."
    PIP_NO_INPUT=1 "$VPY" -m pip install --disable-pip-version-check --progress-bar off -q \
        -c "$CONSTRAINTS" -e ".[$EXTRAS]"
}

create() {
    say "creating ${VENV#"$ROOT"/} with $("$BASE_PY" -c 'import sys; print(sys.executable)')"
    rm -rf "$VENV"
    "$BASE_PY" -m venv "$VENV"
}

current_stamp="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "${FEDCORE_REBUILD:-0}" != "1" && "$current_stamp" == "$WANTED_STAMP" ]] && healthy; then
    exit 0
fi

rm -f "$STAMP"
if [[ "${FEDCORE_REBUILD:-0}" == "1" ]] || ! python_works; then
    create
elif [[ -n "$current_stamp" && "${current_stamp%% *}" != "extras=$EXTRAS" ]]; then
    say "${VENV#"$ROOT"/} was built for other extras (${current_stamp%% *}): rebuilding"
    create
elif [[ "$current_stamp" == "$WANTED_STAMP" ]]; then
    say "${VENV#"$ROOT"/} is incomplete ($HEALTH): repairing it in place"
else
    say "${VENV#"$ROOT"/} is not stamped for this pyproject.toml / constraints.txt: updating it in place"
fi

if ! { pip_install && healthy; }; then
    say "the install did not give a working environment: recreating ${VENV#"$ROOT"/}"
    create
    pip_install
    if ! healthy; then
        say "a clean install of fedcore[$EXTRAS] is still broken: $HEALTH"
        exit 1
    fi
fi
echo "$WANTED_STAMP" >"$STAMP"
say "${VENV#"$ROOT"/} is ready"
