#!/usr/bin/env bash
# `make demo`: the whole story on this machine, with the local provider (no cloud account):
# bring up the example fleet (fleet.yaml), run commands everywhere, prove the shared
# directory is shared, run the text-embed job over a real corpus while workers are
# preempted, read the overhead report, and tear everything down.
set -euo pipefail
cd "$(dirname "$0")/.."
SPEC=${SPEC:-fleet.yaml}
export CORPUS_SIZE=${CORPUS_SIZE:-2000}
REPORT_DIR=${REPORT_DIR:-demo-report}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() { step "fleet down"; fleet down -f "$SPEC" --yes; }
trap cleanup EXIT

step "fleet validate"
fleet validate -f "$SPEC"

step "fleet up (head + workers, each a real sshd: isolated nodes as root, else on 127.0.0.1; workers mount the head over sshfs)"
fleet up -f "$SPEC"

step "fleet exec: a command on every node, in parallel"
fleet exec -f "$SPEC" -- 'echo "$FLEET_NODE_NAME rank $FLEET_NODE_RANK of $FLEET_NUM_NODES, shared dir $FLEET_SHARED"'

step "fleet status"
fleet status -f "$SPEC"

step "the shared directory is shared: the head writes, every worker reads and answers"
fleet exec -f "$SPEC" --nodes head -- 'date > "$FLEET_SHARED/from-head.txt"'
fleet exec -f "$SPEC" --nodes workers -- 'cat "$FLEET_SHARED/from-head.txt" && echo "$FLEET_NODE_NAME was here" > "$FLEET_SHARED/from-$FLEET_NODE_NAME.txt"'
fleet exec -f "$SPEC" --nodes head -- 'cat "$FLEET_SHARED"/from-*-w*.txt'

step "fleet run: text-embed over $CORPUS_SIZE stdlib docstrings; two workers get preempted on the way"
first_worker=$(fleet status -f "$SPEC" --json --no-probe | python3 -c 'import json,sys; print([n["name"] for n in json.load(sys.stdin)["nodes"] if n["role"]=="worker"][0])')
second_worker=$(fleet status -f "$SPEC" --json --no-probe | python3 -c 'import json,sys; print([n["name"] for n in json.load(sys.stdin)["nodes"] if n["role"]=="worker"][1])')
(
  sleep 25; echo ">>> preempting $first_worker (no notice)"; fleet preempt -f "$SPEC" "$first_worker" || true
  sleep 10; echo ">>> preempting $second_worker (5 s notice)"; fleet preempt -f "$SPEC" --notice 5 "$second_worker" || true
) &
chaos=$!
fleet run -f "$SPEC" templates/jobs/embed.yaml
wait "$chaos" || true

step "fleet status and fleet events: the preempted workers were replaced"
fleet status -f "$SPEC"
fleet events -f "$SPEC" | grep -E 'preempted|replaced|working' || true

step "fleet report: where the time went"
fleet report -f "$SPEC" embed --html "$REPORT_DIR/embed.html"
echo "HTML report: $REPORT_DIR/embed.html"
