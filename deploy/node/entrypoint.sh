#!/bin/bash
# The node container's entrypoint (deploy/node/Dockerfile): on the first start, make the
# node home with `fedcore-node init` from the environment below; then serve with
# `fedcore-node start` (extra arguments go to `start`, e.g. -v).
#
#   FEDCORE_NODE_HOME     the node home, a volume (default /var/lib/fedcore-node)
#   FEDCORE_NODE_ID       the node id (required on the first start)
#   FEDCORE_NODE_NAME     a human-readable name, e.g. the hospital's
#   FEDCORE_FEDERATION    the researcher's or the broker's URL (required on the first start)
#   FEDCORE_TRUST         NAME=KEY: the researcher to trust (KEY: `fedcore identity`)
#   FEDCORE_DATA          a data file or folder to register, with FEDCORE_TAGS (a,b)
#   FEDCORE_DATASET_NAME  the dataset's name (default: the file's stem)
#   FEDCORE_POLICY        policy settings, space-separated KEY=VALUE
#   FEDCORE_MQTT_PASSWORD_FILE   read by the MQTT transport (a Docker secret, say)
#
# Later starts reuse the home as it is: change it with `docker compose exec node-a
# fedcore-node ...` (plan approve, trust add, dataset add...).
set -euo pipefail

home="${FEDCORE_NODE_HOME:-/var/lib/fedcore-node}"
export FEDCORE_NODE_HOME="$home"

if [ ! -f "$home/config.toml" ]; then
    missing=()
    [ -n "${FEDCORE_NODE_ID:-}" ] || missing+=(FEDCORE_NODE_ID)
    [ -n "${FEDCORE_FEDERATION:-}" ] || missing+=(FEDCORE_FEDERATION)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "fedcore-node entrypoint: error: no node home at $home yet, and ${missing[*]}" \
             "not set: set them (see deploy/compose.yaml) to create it." >&2
        exit 2
    fi
    args=(--home "$home" init --id "$FEDCORE_NODE_ID" --federation "$FEDCORE_FEDERATION")
    [ -z "${FEDCORE_NODE_NAME:-}" ] || args+=(--name "$FEDCORE_NODE_NAME")
    [ -z "${FEDCORE_TRUST:-}" ] || args+=(--trust "$FEDCORE_TRUST")
    if [ -n "${FEDCORE_DATA:-}" ]; then
        args+=(--data "$FEDCORE_DATA" --tags "${FEDCORE_TAGS:-}")
        [ -z "${FEDCORE_DATASET_NAME:-}" ] || args+=(--dataset-name "$FEDCORE_DATASET_NAME")
    fi
    for setting in ${FEDCORE_POLICY:-}; do
        args+=(--policy "$setting")
    done
    fedcore-node "${args[@]}"
fi

exec fedcore-node --home "$home" start "$@"
