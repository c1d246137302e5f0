#!/usr/bin/env bash
# Lints and renders the Helm charts under charts/ (scripts/lint_charts.py says what exactly;
# e2e/tests/examples.rs checks examples/ against the CRDs). Needs python3 (3.10+) with venv, and the
# Python package index the first time: the pinned packages of scripts/requirements-ci.txt
# go into a venv under target/chart-lint-venv, which later runs reuse as long as that file
# is unchanged. No cluster, Docker or helm binary is needed.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/chart-lint-venv
requirements=scripts/requirements-ci.txt
python=${PYTHON:-python3}

die() {
    echo "lint-charts: $*" >&2
    exit 1
}

command -v "$python" >/dev/null 2>&1 || die "$python not found; install Python 3.10 or newer"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$python is $("$python" -V 2>&1); Python 3.10 or newer is needed"

want="$(sha256sum "$requirements" | cut -d' ' -f1)"
stamp="$venv/.requirements.sha256"
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] \
    && "$venv/bin/python" -c 'import helm_python, yaml, jsonschema' >/dev/null 2>&1; then
    echo "--- reusing $venv"
else
    echo "--- creating $venv from $requirements"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv" \
        || die "could not create a venv with $python (on Debian/Ubuntu: apt-get install python3-venv)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        -r "$requirements" \
        || { rm -rf "$venv"; die "pip could not install $requirements (is the package index reachable?)"; }
    echo "$want" >"$stamp"
fi

"$venv/bin/python" scripts/lint_charts.py "$@" || die "chart checks failed (see above)"
