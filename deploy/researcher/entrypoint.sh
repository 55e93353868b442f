#!/bin/bash
# The researcher container's entrypoint (deploy/researcher/Dockerfile): `fedcore` in the
# study folder, a volume holding exp.toml, the plan files, the checkpoints and keys/.
#
#   FEDCORE_STUDY      the study folder (default /study)
#   FEDCORE_IDENTITY   the researcher's key (default $FEDCORE_STUDY/keys/researcher.key)
#   FEDCORE_NODES      the enrolled nodes (default $FEDCORE_STUDY/keys/nodes.toml)
#   FEDCORE_MQTT_PASSWORD_FILE   read by the MQTT transport (a Docker secret, say)
#
# Arguments: a fedcore command (default: run exp.toml), e.g.
#   docker compose run --rm researcher identity
#   docker compose run --rm researcher enroll site-a KEY
#   docker compose run --rm researcher plan submit exp.toml
set -euo pipefail

study="${FEDCORE_STUDY:-/study}"
cd "$study"
export FEDCORE_IDENTITY="${FEDCORE_IDENTITY:-$study/keys/researcher.key}"
export FEDCORE_NODES="${FEDCORE_NODES:-$study/keys/nodes.toml}"
mkdir -p "$(dirname "$FEDCORE_IDENTITY")"
if [ "$#" -eq 0 ]; then
    set -- run exp.toml
fi
exec fedcore "$@"
