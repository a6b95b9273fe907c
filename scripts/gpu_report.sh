#!/usr/bin/env bash
# The GPU report: the figures a lent GPU should give, in one run of under 7 minutes on one H100.
#
#   bash scripts/gpu_report.sh OUT_DIR                        # CUDA machine, from the repository root
#   bash scripts/gpu_report.sh OUT_DIR --device cpu --quick   # the same parts on a CPU, small settings, < 5 min
#
# Options: --parts LIST (comma-separated subset, run in the usual order), --cap PART=SECONDS (repeatable),
# --no-warm / --warm (compile ahead in parallel; default on for CUDA), --tiny (tests: tiny shapes).
#
# The parts, in order. Each is its own process under `timeout`, so one slow part cannot eat the
# others' time; a part cut off by its cap keeps what it printed, and the report says it was cut.
#   prepare  random checkpoints at the 270M and 1B shapes, saved once in the temp dir
#   check    python -m gemmalite.cli check --device D
#            (on CUDA, meanwhile: `warm` compiles the later parts' graphs, one process per graph
#            group, into inductor's on-disk cache; later parts then load them instead of compiling)
#   compare  270M shape, bf16, batch 1: gemmalite compiled against transformers eager and
#            transformers static cache + compile, in one process
#   decode   greedy and sampled (top_k 64, top_p 0.95) decode, time to first token at 128 and 4096
#            prompt tokens, kernels per decode step (profiler on CUDA; generated code and aten ops anywhere)
#   1b       the 1B shape at batch 1 and 8, eager first
#   memory   peak memory and KV-cache bytes of one compiled engine in a fresh process
# Every figure is printed, and appended to OUT_DIR/report.md and OUT_DIR/figures.jsonl, when it is
# measured. Slow engines get fewer tokens (a short probe sets each engine's count). See
# scripts/gpu_report.py for how each figure is measured.
set -u

usage() { echo "usage: bash scripts/gpu_report.sh OUT_DIR [--device cuda|cpu] [--quick] [--parts LIST] [--cap PART=S] [--no-warm]" >&2; exit 2; }
[ $# -ge 1 ] || usage
case $1 in -*) usage ;; esac
OUT=$1
shift
COMMAND_LINE="$OUT $*"
DEVICE=cuda SIZE="" PARTS=prepare,check,compare,decode,1b,memory WARM=""
declare -A CAP
while [ $# -gt 0 ]; do
    case $1 in
        --device) DEVICE=${2:?}; shift 2 ;;
        --quick) SIZE=--quick; shift ;;
        --tiny) SIZE=--tiny; shift ;;
        --parts) PARTS=${2:?}; shift 2 ;;
        --cap) CAP[${2%%=*}]=${2#*=}; shift 2 ;;
        --warm) WARM=1; shift ;;
        --no-warm) WARM=0; shift ;;
        *) usage ;;
    esac
done
# Caps in seconds (a part also gets what earlier parts left unused). CUDA: 405 s in all, the
# warm-up beside the check. CPU, --quick: 290 s in all.
if [ "$DEVICE" = cuda ] && [ -z "$SIZE" ]; then
    DEFAULTS=(header=15 prepare=35 check=90 warm=140 compare=75 decode=60 1b=60 memory=20)
    : "${WARM:=1}"
else
    DEFAULTS=(header=15 prepare=30 check=70 warm=0 compare=65 decode=50 1b=40 memory=20)
    : "${WARM:=0}"
fi
for pair in "${DEFAULTS[@]}"; do
    [ -n "${CAP[${pair%%=*}]:-}" ] || CAP[${pair%%=*}]=${pair#*=}
done

mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
REPORT=(python scripts/gpu_report.py --out "$OUT" --device "$DEVICE" $SIZE)
STARTED=$SECONDS

wanted() { case ",$PARTS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# The line that closes a part: written here, so that it is written when the part was killed too.
end_part() {  # NAME RC CAP SECONDS
    local how cut=false
    case $2 in
        0) how="finished in $4 s of its $3 s cap" ;;
        124|137) how="**cut off by its cap of $3 s**: the figures above are what it measured before"; cut=true ;;
        *) how="**failed** (exit status $2) after $4 s: see the output above" ;;
    esac
    printf '\n_part %s: %s_\n' "$1" "$how" | tee -a "$OUT/report.md"
    printf '{"part": "%s", "figure": "part_s", "value": %s, "unit": "s", "rc": %s, "cap_s": %s, "cut_off": %s}\n' \
        "$1" "$4" "$2" "$3" "$cut" >> "$OUT/figures.jsonl"
}

# Each part may run until the sum of its cap and the earlier parts' caps: what a part leaves
# unused goes to the next, and the whole run never exceeds the sum of the caps.
DEADLINE=$SECONDS
cap_for() {  # NAME: moves the deadline on by the part's cap; PART_CAP is the seconds left until it
    DEADLINE=$((DEADLINE + CAP[$1]))
    PART_CAP=$((DEADLINE - SECONDS > 1 ? DEADLINE - SECONDS : 1))
}

run_part() {  # NAME CAP [ARGS...]
    local name=$1 cap=$2 started=$SECONDS rc
    shift 2
    timeout -k 5 "$cap" "${REPORT[@]}" "$name" "$@"
    rc=$?
    end_part "$name" "$rc" "$cap" $((SECONDS - started))
}

cap_for header
timeout -k 5 "$PART_CAP" "${REPORT[@]}" header --command-line "$COMMAND_LINE" || echo "header failed" >&2
wanted prepare && cap_for prepare && run_part prepare "$PART_CAP"

WARM_PIDS=()
trap '[ ${#WARM_PIDS[@]} -eq 0 ] || kill "${WARM_PIDS[@]}" 2>/dev/null' EXIT
if [ "$WARM" = 1 ] && [ "${CAP[warm]}" -gt 0 ]; then
    # The warm-up and the check run side by side; the check keeps its own cap within the warm-up's.
    WARM_STARTED=$SECONDS
    CHECK_CAP=$((DEADLINE + CAP[check] - SECONDS))
    cap_for warm
    WARM_CAP=$PART_CAP
    for task in 270m-greedy 270m-sampled 270m-long transformers-static 1b-b1 1b-b8; do
        # Few compile workers each: six compiling processes share the machine's cores.
        TORCHINDUCTOR_COMPILE_THREADS=2 timeout -k 5 "$WARM_CAP" "${REPORT[@]}" warm --task "$task" \
            > "$OUT/warm-$task.log" 2>&1 &
        WARM_PIDS+=($!)
    done
    wanted check && run_part check $((CHECK_CAP < WARM_CAP ? CHECK_CAP : WARM_CAP))
    wait "${WARM_PIDS[@]}"
    WARM_PIDS=()
    timeout -k 5 30 "${REPORT[@]}" warm-summary
    end_part warm 0 "$WARM_CAP" $((SECONDS - WARM_STARTED))
else
    wanted check && cap_for check && run_part check "$PART_CAP"
fi

for part in compare decode 1b memory; do
    wanted "$part" && cap_for "$part" && run_part "$part" "$PART_CAP"
done
printf '\n_report done in %s s_\n' $((SECONDS - STARTED)) | tee -a "$OUT/report.md"
