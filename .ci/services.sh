#!/usr/bin/env bash
# Services for the integration tests: a one-node Slurm (markers `slurm`) and PostgreSQL
# (`postgres`) on localhost, from Debian's packages. Idempotent and quick when already up;
# installs packages only when missing (one apt-get update). Needs root (or sudo).
# The Python side needs: pip install -e '.[dev,ray,postgres]'
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then sudo_="sudo -E"; else
        echo "services.sh: not root and no sudo: Slurm/PostgreSQL tests will skip" >&2; exit 0
    fi
fi

missing=()
for pair in slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client munged:munge \
            pg_ctlcluster:postgresql; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair##*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

$sudo_ slurm/local-cluster.sh start >/dev/null
$sudo_ slurm/local-postgres.sh start >/dev/null
sinfo --noheader
echo "postgresql: $(slurm/local-postgres.sh url)"
