#!/usr/bin/env bash
# The scikit-learn demo: 3 simulated hospitals on the breast-cancer data, FedAvg,
# federated accuracy beside a centralized baseline.
#
#   ./scripts/demo.sh            (or: make demo)
#
# Uses its own virtualenv (.venv-demo, or $FEDCORE_DEMO_VENV) holding fedcore with only
# the sklearn extra; extra arguments go to examples/demo_breast_cancer.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${FEDCORE_DEMO_VENV:-.venv-demo}"

bash scripts/setup-env.sh "$VENV" sklearn
exec "$VENV/bin/python" examples/demo_breast_cancer.py "$@"
