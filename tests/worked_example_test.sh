#!/usr/bin/env bash
# Runs the worked example of rules/README.md (the block between the worked-example markers),
# command for command, against a real cds-server in a scratch copy of the repository's rules,
# then checks where it left the server: 1.0.1 published and signed by the new key, canary on
# 1.0.1, stable rolled back to 1.0.0.
# Usage: worked_example_test.sh SOURCE_DIR CDS_SERVER CDSCTL
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../bench/wait_for_port.sh"
SRC=$1
SERVER_BIN=$2
CDSCTL=$3

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cds_worked_example_XXXXXX")
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$WORK/rules/ipex" "$WORK/client" "$WORK/bin"
cp -r "$SRC/rules/ipex/1.0.0" "$WORK/rules/ipex/"
cp -r "$SRC/rules/keys" "$WORK/rules/"
ln -s "$SRC/rules/ontology" "$WORK/rules/ontology"
cp -r "$SRC/client/examples" "$WORK/client/"
ln -s "$CDSCTL" "$WORK/bin/cdsctl"
export PATH="$WORK/bin:$PATH"
export HOME="$WORK/home"
cd "$WORK"

"$SERVER_BIN" --listen 127.0.0.1:0 --insecure_dev --rules_dir rules --state_dir state --poll_interval 0s \
  --drain 0s 2> server.log &
SERVER_PID=$!
wait_for_port server.log "$SERVER_PID" || exit 1
export SERVER="127.0.0.1:$PORT"

# The README's block, exactly.
sed -n '/<!-- worked-example:begin -->/,/<!-- worked-example:end -->/p' "$SRC/rules/README.md" \
  | grep -v '^<!--' | grep -v '^```' > example.sh
[ "$(grep -c cdsctl example.sh)" -ge 10 ] || { echo "worked example block not found"; exit 1; }
bash -euo pipefail -x example.sh > example.out 2>&1 || { cat example.out; cat server.log; exit 1; }

fail() { echo "FAIL: $*"; cat example.out; exit 1; }
grep -q "TOP DIAGNOSIS CHANGED" example.out && fail "the diff should change no top diagnosis"
grep -q "case triad_boy.json" example.out || fail "diff did not cover the example patients"
grep -q "published ipex@1.0.1" example.out || fail "1.0.1 was not published"
grep -q "Rule set: ipex@1.0.1 .* via label canary" example.out || fail "canary did not answer with 1.0.1"
KEY_ID=$(sed -n 's/^key id //p' example.out)
cdsctl rulesets --server "$SERVER" > final.out
grep -E "^ipex +1\.0\.1 +AVAILABLE +canary +$KEY_ID " final.out >/dev/null || { cat final.out; fail "1.0.1 not canary / not signed by $KEY_ID"; }
grep -E "^ipex +1\.0\.0 +AVAILABLE +\* +stable " final.out >/dev/null || { cat final.out; fail "stable not rolled back to 1.0.0"; }
tail -n 5 example.out | grep -q "Rule set: ipex@1.0.0 .* via label stable" || fail "default is not 1.0.0 after rollback"
[ -f "$HOME/.cds/alice.key" ] && [ "$(stat -c %a "$HOME/.cds/alice.key")" = "600" ] || fail "private key mode"
echo "worked example OK"
