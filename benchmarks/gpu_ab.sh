#!/usr/bin/env bash
# A change to the kernel, kept only if the benchmark shows it: `kaggle-runner bench` from another tree (before)
# and from this one (after), alternating so machine drift hits both alike, on the same machine.
#
#   mkdir .before && git archive REF | tar -x -C .before    # REF: the commit to compare against
#   bash benchmarks/gpu_ab.sh .before [bench options...]     # default: --preset seed --device cuda --steps 20
#
# ROUNDS (default 2) rounds of before then after; each side's tokens/s lands in $OUT/ab.txt (or ./gpu-check),
# then the ratio of medians, after / before. Wheels in .whl are installed first, as in gpu_check.sh.
set -euo pipefail
BEFORE=$(realpath "$1")
shift
OPTIONS=("$@")
if [ ${#OPTIONS[@]} -eq 0 ]; then OPTIONS=(--preset seed --device cuda --steps 20); fi
ROOT=$(pwd)
OUT=$(realpath -m "${OUT:-$ROOT/gpu-check}")
ROUNDS=${ROUNDS:-2}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
for side in before after; do
    site=$(mktemp -d)
    tree=$([ "$side" = before ] && echo "$BEFORE" || echo "$ROOT")
    if [ -d "$ROOT/.whl" ]; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$ROOT"/.whl/*.whl
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$site" "$tree" \
        >/dev/null
    declare "SITE_$side=$site"
done
: > "$OUT/ab.txt"
for round in $(seq "$ROUNDS"); do
    for side in before after; do
        site_var="SITE_$side"
        # From inside the installed copy's folder, so neither source tree shadows it.
        result=$(cd "${!site_var}" && PYTHONPATH="${!site_var}" "$PYTHON" -m kaggle_runner.cli bench "${OPTIONS[@]}" \
            --json 2>/dev/null | tail -n 1)
        echo "$side $round $result" | tee -a "$OUT/ab.txt"
    done
done
"$PYTHON" - "$OUT/ab.txt" <<'EOF' | tee -a "$OUT/ab.txt"
import json, statistics, sys
sides = {"before": [], "after": []}
for line in open(sys.argv[1]):
    side, _, report = line.split(" ", 2)
    sides[side].append(json.loads(report)["tokens_per_second"])
before, after = statistics.median(sides["before"]), statistics.median(sides["after"])
print(json.dumps({"before_tokens_per_second": before, "after_tokens_per_second": after, "ratio": after / before,
                  "rounds": len(sides["after"])}))
EOF
