#!/usr/bin/env bash
# Write postgres.env, redis.env and ray-auth.env next to this script with fresh random values (an existing
# file is kept: rerunning never rotates a credential behind your back). Then:
#   kubectl apply -k k8s/secrets
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
umask 077
rand() {  # $1 bytes of randomness as hex: URL-safe, fine in a postgresql:// URL
  od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'
}
if [[ ! -e "$DIR/postgres.env" ]]; then
  printf 'POSTGRES_USER=mlflow\nPOSTGRES_PASSWORD=%s\nPOSTGRES_DB=mlflow\n' "$(rand 24)" > "$DIR/postgres.env"
  echo "wrote $DIR/postgres.env"
else
  echo "kept $DIR/postgres.env"
fi
if [[ ! -e "$DIR/redis.env" ]]; then  # Redis of k8s/overlays/gcs-ft (GCS fault tolerance)
  printf 'password=%s\n' "$(rand 32)" > "$DIR/redis.env"
  echo "wrote $DIR/redis.env"
else
  echo "kept $DIR/redis.env"
fi
if [[ ! -e "$DIR/ray-auth.env" ]]; then
  printf 'auth_token=%s\n' "$(rand 32)" > "$DIR/ray-auth.env"
  echo "wrote $DIR/ray-auth.env"
else
  echo "kept $DIR/ray-auth.env"
fi
