#!/usr/bin/env bash
# Services for the integration tests: a one-node Slurm (markers `slurm`) and PostgreSQL
# (`postgres`) on localhost, and headless Chromium (the HTML report's test), from Debian's
# packages. Idempotent and quick when already up;
# installs packages only when missing (one apt-get update). Needs root (or sudo).
# The Python side needs: pip install -e '.[dev,ray,postgres]'
#
# Never stops the run: each step's output is shown; a service that cannot be started gets
# one clear line (after the output of the step that failed), and the tests marked for it
# skip with their reason. A Slurm cluster already running here is reused, not replaced.
set -uo pipefail
cd "$(dirname "$0")/.."

say() { echo "services.sh: $*" >&2; }

step() {  # step COMMAND...: run it, show its output indented; its exit status is returned
    local out rc
    out=$("$@" 2>&1)
    rc=$?
    if [ -n "$out" ]; then printf '%s\n' "$out" | sed 's/^/    /' >&2; fi
    if [ "$rc" -ne 0 ]; then say "failed (exit $rc): $*"; fi
    return "$rc"
}

sudo_=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then sudo_=(sudo -E); else
        say "not root and no sudo: Slurm and PostgreSQL not started; the tests marked slurm" \
            "and postgres will skip"
        exit 0
    fi
fi

missing=()
for pair in slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client munged:munge \
            pg_ctlcluster:postgresql chromium:chromium; do  # chromium: bench report's test
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair##*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    step "${sudo_[@]}" apt-get update -qq \
        && step "${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${missing[@]}" \
        || say "could not install ${missing[*]}; the services that need them will not start"
fi

slurm_usable() {  # as the tests decide (tests/test_slurm.py: slurm_up)
    command -v sbatch >/dev/null \
        && sinfo --noheader -o %T 2>/dev/null | grep -qE "idle|mixed|alloc"
}

say "Slurm: slurm/local-cluster.sh start"
if ! step "${sudo_[@]}" slurm/local-cluster.sh start; then
    say "Slurm could not be started (see above): the tests marked slurm will skip"
elif ! slurm_usable; then
    say "Slurm started, but sinfo shows no usable node to $(id -un): the tests marked slurm" \
        "will skip"
else
    say "Slurm: up"
fi

say "PostgreSQL: slurm/local-postgres.sh start"
if step "${sudo_[@]}" slurm/local-postgres.sh start; then
    say "PostgreSQL: up at $(slurm/local-postgres.sh url)"
else
    say "PostgreSQL could not be started (see above): the tests marked postgres will skip"
fi
exit 0
