#!/bin/sh
# Registers the compose mesh through the Cloud Map API with the real aws CLI, as a user's pipeline
# would. Idempotent (CreatorRequestId). Environment: ENDPOINT, AWS credentials, <SERVICE>_IP.
set -eu
EP=${ENDPOINT:-http://control-plane:9400}
NAMESPACE=${NAMESPACE:-my-app.local}
INBOUND_PORT=${INBOUND_PORT:-15443}
sd() { aws --endpoint-url "$EP" --region "${AWS_REGION:-us-east-1}" --output text servicediscovery "$@"; }

op=$(sd create-private-dns-namespace --name "$NAMESPACE" --vpc vpc-compose \
  --creator-request-id "compose-$NAMESPACE" --query OperationId)
ns=$(sd get-operation --operation-id "$op" --query Operation.Targets.NAMESPACE)
echo "namespace $NAMESPACE: $ns"
for svc in ${SERVICES:-users api web}; do
  id=$(sd create-service --name "$svc" --namespace-id "$ns" --creator-request-id "compose-$svc" \
    --dns-config 'RoutingPolicy=MULTIVALUE,DnsRecords=[{Type=A,TTL=5},{Type=SRV,TTL=5}]' \
    --health-check-config Type=TCP,FailureThreshold=2 --query Service.Id)
  var=$(echo "$svc" | tr 'a-z-' 'A-Z_')_IP
  ip=$(eval "echo \${$var:-}")
  [ -n "$ip" ] || { echo "register.sh: set $var" >&2; exit 2; }
  sd register-instance --service-id "$id" --instance-id "$svc-1" \
    --attributes "AWS_INSTANCE_IPV4=$ip,AWS_INSTANCE_PORT=$INBOUND_PORT" >/dev/null
  echo "registered $svc-1 at $ip:$INBOUND_PORT in $svc ($id)"
done
