#!/bin/sh
# One-shot: create the CA (root + intermediate) in the control plane's data dir, one scoped join
# token file per workload (mode 0600) and a copy of the root certificate beside them. Idempotent:
# an existing CA and existing tokens are kept.
set -eu
DATA=${DATA:-/data}
TOKENS=${TOKENS:-/tokens}
NAMESPACE=${NAMESPACE:-my-app.local}
if [ ! -e "$DATA/ca" ]; then
  trellis-ca init --dir "$DATA/ca" --trust-domain "${TRUST_DOMAIN:-mesh.local}"
fi
mkdir -p "$TOKENS"
# The mesh's root certificate (public): sidecars, the aws CLI and Prometheus verify the control
# plane's HTTPS API against it.
cp "$DATA/ca/root.crt" "$TOKENS/root.crt"
chmod 0644 "$TOKENS/root.crt"
for svc in ${SERVICES:-users api web lb}; do
  if [ ! -e "$TOKENS/$svc.token" ]; then
    trellis-ca token create --dir "$DATA/ca" --namespace "$NAMESPACE" --service "$svc" \
      --out "$TOKENS/$svc.token" >/dev/null
    echo "token for $svc written to $TOKENS/$svc.token"
  fi
done
