#!/bin/sh
# Pushes a Stack from a CI pipeline with a Generator's key (no Kubernetes credentials),
# then waits until every targeted agent runs it healthy. Exits non-zero, saying why,
# when the hub refuses the content, an agent reports a failure, or the wait runs out.
#
#   BROKKR_URL=https://brokkr.example.com BROKKR_GENERATOR_KEY=brokkr_... \
#       examples/ci-push.sh <stack name> <manifests.yaml> [timeout seconds, default 300]
#
# The key is in the Secret brokkr-generator-<generator> in the Generator's namespace.
# Needs only sh and curl.
set -eu

stack=${1:?usage: ci-push.sh <stack name> <manifests.yaml> [timeout seconds]}
manifests=${2:?usage: ci-push.sh <stack name> <manifests.yaml> [timeout seconds]}
timeout=${3:-300}
: "${BROKKR_URL:?set BROKKR_URL to the hub's API, e.g. https://brokkr.example.com}"
: "${BROKKR_GENERATOR_KEY:?set BROKKR_GENERATOR_KEY to the Generator's key}"

api="${BROKKR_URL%/}/api/v1/generator/stacks/$stack"
header_file=$(mktemp)
trap 'rm -f "$header_file"' EXIT
# The key goes to curl in a file, not on its command line, where ps would show it.
printf 'Authorization: Bearer %s\n' "$BROKKR_GENERATOR_KEY" >"$header_file"

# call METHOD URL [curl args...]: sets $code and $body.
call() {
    method=$1 url=$2
    shift 2
    answer=$(curl -sS -X "$method" -H "@$header_file" -w '\n%{http_code}' "$@" "$url") || {
        echo "ci-push: cannot reach $BROKKR_URL" >&2
        exit 2
    }
    code=$(printf '%s\n' "$answer" | tail -n 1)
    body=$(printf '%s\n' "$answer" | sed '$d')
}

field() { # the first value of JSON field $1 in $body (a string or a number)
    value=$(printf '%s' "$body" | grep -oE "\"$1\":\"([^\"\\\\]|\\\\.)*\"" | head -n 1 |
        sed -e "s/^\"$1\":\"//" -e 's/"$//' -e 's/\\"/"/g')
    [ -n "$value" ] || value=$(printf '%s' "$body" | grep -oE "\"$1\":-?[0-9]+" | head -n 1 | sed "s/^\"$1\"://")
    printf '%s' "$value"
}

echo "ci-push: pushing $manifests as Stack $stack"
call PUT "$api?wait=60" -H 'Content-Type: application/yaml' --data-binary "@$manifests"
case $code in
200) echo "ci-push: recorded as revision $(field sequence) (checksum $(field checksum))" ;;
202) echo "ci-push: accepted; the hub has not recorded it yet" ;;
*)
    echo "ci-push: the hub refused the push ($code): $(field message)" >&2
    exit 1
    ;;
esac

echo "ci-push: waiting up to ${timeout}s for every targeted agent to run it healthy"
call GET "$api?wait=$timeout&until=ready"
case $code in
200) ;;
422)
    echo "ci-push: delivery failed: $(field message)" >&2
    exit 1
    ;;
*)
    echo "ci-push: cannot read the Stack's status ($code): $(field message)" >&2
    exit 1
    ;;
esac
case $(field outcome) in
ready) echo "ci-push: ready on $(field ready) agents" ;;
*)
    echo "ci-push: not ready after ${timeout}s ($(field ready) agents healthy)" >&2
    exit 1
    ;;
esac
