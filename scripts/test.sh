#!/usr/bin/env bash
# Lint and test fedcore in the dev environment: what CI runs (.ci/run).
#
#   ./scripts/test.sh [PYTEST ARGS...]      (or: make test ARGS="-k docs -x")
#
# Sets up .venv (or $FEDCORE_DEV_VENV) with fedcore[dev,sklearn,torch,tf,jax,ray], and .venv-tfdp
# (or $FEDCORE_TFDP_VENV) with fedcore[dev,sklearn,tfdp] (tensorflow-privacy holds numpy at
# 1.26, so TF DP-SGD has its own environment, pinned by constraints-tfdp.txt), re-using them
# when up to date; starts the services the tests need; runs `ruff check .`, `mypy`, `pytest`
# in .venv (the tests marked `tfdp` deselected) and the `tfdp` tests (tests/privacy/test_tf_privacy.py)
# in .venv-tfdp, with the same PYTEST ARGS. Exits non-zero when any fails, and when the main
# pytest collects no tests (its exit code 5; the tfdp run may select none).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${FEDCORE_DEV_VENV:-.venv}"
PY="$VENV/bin/python"
TFDP_VENV="${FEDCORE_TFDP_VENV:-.venv-tfdp}"

bash scripts/setup-env.sh "$VENV" dev,sklearn,torch,tf,jax,ray
FEDCORE_CONSTRAINTS=constraints-tfdp.txt bash scripts/setup-env.sh "$TFDP_VENV" dev,sklearn,tfdp

# --- services the tests need ---------------------------------------------------------------
# None yet: tests start what they use themselves. This is the place for services that
# outlive one test (for the MQTT transport, e.g. a Mosquitto broker on a free port whose
# address is exported for the tests, FEDCORE_TEST_MQTT_URL=mqtt://127.0.0.1:PORT).
# stop_services runs on every exit, including failures and Ctrl-C.
start_services() {
    ensure_chromium
    ensure_mosquitto
}
# The MQTT transport tests start their own Mosquitto brokers (Debian package; never the
# system broker on 1883: each test broker listens on a free loopback port).
ensure_mosquitto() {
    [[ -x /usr/sbin/mosquitto ]] && return 0
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        echo "mosquitto missing and cannot apt-get install it: the MQTT tests fail" >&2
        return 0
    fi
    echo "== installing mosquitto for the MQTT transport tests" >&2
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
          --no-install-recommends mosquitto; } \
        >/tmp/fedcore-mosquitto-install.log 2>&1 \
        || echo "apt-get install mosquitto failed (see /tmp/fedcore-mosquitto-install.log)" >&2
}
# The node GUI tests drive a real headless Chromium (Debian packages; ~2 min, once).
ensure_chromium() {
    [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]] && return 0
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        echo "chromium/chromedriver missing and cannot apt-get install them: GUI tests skip" >&2
        return 0
    fi
    echo "== installing chromium and chromium-driver for the GUI tests" >&2
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
          chromium chromium-driver; } >/tmp/fedcore-chromium-install.log 2>&1 \
        || echo "apt-get install chromium failed (see /tmp/fedcore-chromium-install.log): GUI tests skip" >&2
}
stop_services() {
    :
}
trap stop_services EXIT
start_services

# --- checks ----------------------------------------------------------------------------------
failed=()

echo "== ruff check ." >&2
"$PY" -m ruff check . || failed+=("ruff check (exit $?)")

echo "== mypy" >&2
"$PY" -m mypy || failed+=("mypy (exit $?)")

echo "== pytest --durations=25 $*" >&2
set +e
"$PY" -m pytest --durations=25 "$@"
rc=$?
set -e
case $rc in
    0) ;;
    5) failed+=("pytest collected no tests (exit 5)") ;;
    *) failed+=("pytest (exit $rc)") ;;
esac

echo "== pytest (TF DP-SGD, $TFDP_VENV) tests/privacy/test_tf_privacy.py $*" >&2
set +e
FEDCORE_TFDP=1 "$TFDP_VENV/bin/python" -m pytest tests/privacy/test_tf_privacy.py "$@"
rc=$?
set -e
case $rc in
    0 | 5) ;;
    *) failed+=("pytest TF DP-SGD (exit $rc)") ;;
esac

if ((${#failed[@]})); then
    printf 'FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "OK: ruff, mypy, pytest and the TF DP-SGD tests passed" >&2
