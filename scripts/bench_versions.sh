#!/usr/bin/env bash
# Before and after in one run: scripts/bench.py from an earlier commit and from this tree, alternately.
#
#   bash scripts/bench_versions.sh REV [--rounds N] -- [bench.py arguments]
#   bash scripts/bench_versions.sh HEAD~1 -- --model m.gguf --no-hf --prompt-lens 128 --contexts 128
#
# The earlier commit is checked out once in a temporary worktree. Each round runs bench.py there,
# then here, each in a fresh process; the table gives each figure's median over the rounds, then
# after/before. Both trees run in the same Python environment.
set -euo pipefail
rev=${1:?usage: bench_versions.sh REV [--rounds N] -- [bench.py arguments]}
shift
rounds=2
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ "${1:-}" = "--" ] && shift
here=$(cd "$(dirname "$0")/.." && pwd)
out=$(mktemp -d)
old="$out/tree"
git -C "$here" worktree add --detach --quiet "$old" "$rev"
trap 'git -C "$here" worktree remove --force "$old"; rm -rf "$out"' EXIT
for round in $(seq "$rounds"); do
  for which in before after; do
    tree=$here; [ $which = before ] && tree=$old
    echo "== round $round: $which ($([ $which = before ] && echo "$rev" || echo "this tree"))" >&2
    (cd "$tree" && python scripts/bench.py "$@" --json "$out/$which-$round.json" >&2)
  done
done
python - "$out" "$rev" <<'EOF'
import json, pathlib, statistics, sys
out, rev = pathlib.Path(sys.argv[1]), sys.argv[2]
def figures(which):
    runs = [json.loads(p.read_text()) for p in sorted(out.glob(f"{which}-*.json"))]
    merged = {}
    for run in runs:
        for r in run["results"]:
            for k, v in r["figures"].items():
                if isinstance(v, (int, float)):
                    merged.setdefault((r["engine"], k), []).append(v)
    return {key: statistics.median(v) for key, v in merged.items()}, runs[0]["header"]
before, header = figures("before")
after, _ = figures("after")
print(header)
print(f"\n| engine | figure | before ({rev}) | after | after/before |\n|---|---|---|---|---|")
for key in before:
    if key in after and before[key]:
        print(f"| {key[0]} | {key[1]} | {before[key]:.4g} | {after[key]:.4g} | {after[key] / before[key]:.2f}x |")
EOF
