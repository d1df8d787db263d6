#!/usr/bin/env bash
# A change measured before and after in the same runs: builds svcd (release) at REV in a
# temporary git worktree (sharing this checkout's target directory, so only svcd's own crates
# are rebuilt), then runs the HTTP, L4 and DNS benchmarks with that build beside the current
# one (SVCD_BEFORE) and the peers. Each script prints a "svcd / svcd-before" ratio.
#
#   benches/before_after.sh REV [seconds] [rounds]      (defaults: 10 s, 3 rounds)
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:?usage: benches/before_after.sh REV [seconds] [rounds]}
SECS=${2:-10}
ROUNDS=${3:-3}

before=$(mktemp -d)
tree="$before/tree"
cleanup() { git worktree remove --force "$tree" >/dev/null 2>&1 || true; rm -rf "$before"; }
trap cleanup EXIT
git worktree add --detach "$tree" "$REV" >/dev/null
target=$(pwd)/target
(cd "$tree" && CARGO_TARGET_DIR="$target" cargo build --release --locked --bin svcd)
cp "$target/release/svcd" "$before/svcd"
# The current build last, so target/release/svcd is this checkout's again; both are copied, so
# the scripts (SVCD_BIN) build nothing while they measure.
cargo build --release --locked --bin svcd
cp "$target/release/svcd" "$before/svcd-after"

echo "before: $(git rev-parse --short "$REV"), after: $(git rev-parse --short HEAD)$(git diff --quiet || echo ' + uncommitted changes')"
for bench in benches/http/throughput.sh benches/l4/throughput.sh benches/dns/qps.sh; do
  echo
  echo "== $bench"
  SVCD_BIN="$before/svcd-after" SVCD_BEFORE="$before/svcd" "$bench" "$SECS" "$ROUNDS"
done
