#!/bin/bash
# A certificate authority and the broker's TLS certificate, for deploy/mosquitto.
#
#   usage: make-certs.sh BROKER_HOST [OUT_DIR]
#
# BROKER_HOST is the name or IP address the nodes and the researcher dial (it goes into the
# certificate). OUT_DIR (default ./certs) receives ca.pem (give it to every node and to the
# researcher: their URLs' cafile=), ca.key (keep it offline), broker.pem and broker.key.
set -euo pipefail

host="${1:?usage: make-certs.sh BROKER_HOST [OUT_DIR]}"
out="${2:-certs}"
days=825
mkdir -p "$out"
umask 077
case "$host" in
    *[!0-9.]*) san="DNS:$host" ;;
    *) san="IP:$host" ;;
esac
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
    -subj "/CN=fedcore federation CA" -keyout "$out/ca.key" -out "$out/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$host" \
    -keyout "$out/broker.key" -out "$out/broker.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' \
    "$san" > "$out/broker.ext"
openssl x509 -req -in "$out/broker.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
    -CAcreateserial -days "$days" -extfile "$out/broker.ext" -out "$out/broker.pem" 2>/dev/null
rm -f "$out/broker.csr" "$out/broker.ext" "$out/ca.srl"
chmod 644 "$out/ca.pem" "$out/broker.pem"
echo "Made $out/ca.pem, $out/broker.pem and $out/broker.key for $host ($san)."
