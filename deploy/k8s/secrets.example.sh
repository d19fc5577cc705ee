#!/usr/bin/env bash
# Create the Secrets Loom's manifests reference, with fresh random values, in namespace loom.
# Nothing secret is committed: run this (or your own secret manager: External Secrets, Sealed
# Secrets, Vault) once per cluster, from the repository root, before `kubectl apply -k`:
#
#   kubectl create namespace loom          # or apply the overlay once; it makes the namespace
#   bash deploy/k8s/secrets.example.sh
#
# It prints the admin API key once; keep it (loomctl needs it). Re-running replaces every value:
# the NATS servers and services must then restart (kubectl -n loom rollout restart ...).
set -euo pipefail
NS=${NS:-loom}
PY=${PY:-python3}

apply() { kubectl -n "$NS" apply -f -; }

# 1. NATS passwords, one per user of deploy/nats/loom.conf. nats-server parses a value like a config
#    value, so each password starts with a letter.
args=()
for user in admin gateway preprocess inference postprocess fusion monitor publisher; do
  args+=("--from-literal=$user=p$("$PY" -c 'import secrets; print(secrets.token_hex(24))')")
done
kubectl -n "$NS" create secret generic loom-nats-passwords "${args[@]}" --dry-run=client -o yaml | apply

# 2. API keys: the services keep only sha256 records (loom-api-keys, key keys.json); the keys go to
#    their users: an admin key for you, a viewer key for Prometheus, a predict key for span export.
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for spec in "admin admin" "prometheus viewer" "spans predict"; do
  set -- $spec
  "$PY" -m tools.loomctl keys new --id "$1" --role "$2" --json > "$tmp/$1.json"
done
"$PY" - "$tmp" <<'PYEOF'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
records = [json.loads((d / f"{n}.json").read_text())["record"] for n in ("admin", "prometheus", "spans")]
(d / "keys.json").write_text(json.dumps(records, indent=2))
for n in ("admin", "prometheus", "spans"):
    (d / f"{n}.key").write_text(json.loads((d / f"{n}.json").read_text())["key"])
PYEOF
kubectl -n "$NS" create secret generic loom-api-keys --from-file=keys.json="$tmp/keys.json" \
  --dry-run=client -o yaml | apply
# Prometheus Operator reads the viewer key for the ServiceMonitor's bearer token.
kubectl -n "$NS" create secret generic loom-metrics-token --from-file=token="$tmp/prometheus.key" \
  --dry-run=client -o yaml | apply
# The services send their spans to the monitor with this header (OTEL_EXPORTER_OTLP_HEADERS).
kubectl -n "$NS" create secret generic loom-span-key \
  --from-literal=otlp-headers="x-api-key=$(cat "$tmp/spans.key")" --dry-run=client -o yaml | apply

echo "admin API key (shown once; give it to loomctl as LOOM_API_KEY): $(cat "$tmp/admin.key")"
