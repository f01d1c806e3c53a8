#!/usr/bin/env bash
# The VLA pipeline of docs/vla.md end to end, on one machine: scripted-expert demonstrations -> SFT -> evaluation ->
# PPO from the SFT checkpoint -> evaluation -> learning curve. Every figure lands in $OUT (timings.tsv, eval-*.json,
# curve.png, a sample episode video). Sizes come from the environment, so the same script runs a CPU smoke
# (tiny preset) and the GPU run of docs/benchmarks.md:
#   scripts/vla_sft_rl.sh                                  # configs/gs_vla_ppo.yaml, sizes below
#   DEMOS=4 SFT_STEPS=2 EVAL_EPISODES=2 RL_SECONDS=60 OVERRIDES="policy.vla_preset=tiny ..." scripts/vla_sft_rl.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-gs_vla_ppo}
OUT=${OUT:-runs/vla-pipeline}
DEMOS=${DEMOS:-200}                 # successful expert episodes to record
COLLECT_ENVS=${COLLECT_ENVS:-16}
COLLECT_NOISE=${COLLECT_NOISE:-0}   # DART: the expert's executed actions get this Gaussian noise; labels stay clean
SFT_STEPS=${SFT_STEPS:-3000}
SFT_BATCH=${SFT_BATCH:-32}
SFT_LR=${SFT_LR:-1e-4}
SFT_AUGMENT_SHIFT=${SFT_AUGMENT_SHIFT:-0}  # random-shift augmentation of the images, pixels (DrQ)
EVAL_EPISODES=${EVAL_EPISODES:-100}
EVAL_ENVS=${EVAL_ENVS:-25}
RL_SECONDS=${RL_SECONDS:-1800}
OVERRIDES=${OVERRIDES:-}            # section.key=value ... applied to every step
# Files of more overrides for the SFT and the PPO step, read when that step starts (another job may still be
# deciding them, e.g. whether torch.compile works on this GPU): waited for up to STEP_OVERRIDES_WAIT_S seconds.
SFT_OVERRIDES_FILE=${SFT_OVERRIDES_FILE:-}
RL_OVERRIDES_FILE=${RL_OVERRIDES_FILE:-}
STEP_OVERRIDES_WAIT_S=${STEP_OVERRIDES_WAIT_S:-300}
GSRL=${GSRL:-python3 -m gsrl.cli}
read -r -a overrides <<<"$OVERRIDES"
mkdir -p "$OUT"
timings="$OUT/timings.tsv"
[ -f "$timings" ] || printf 'step\tseconds\n' >"$timings"

read_overrides() {  # read_overrides FILE: its words, one per line, once it exists (nothing if unset or never written)
  local file=$1 waited=0
  [ -n "$file" ] || return 0
  while [ ! -e "$file" ] && ((waited < STEP_OVERRIDES_WAIT_S)); do sleep 1; waited=$((waited + 1)); done
  [ -e "$file" ] && tr -s ' \t' '\n' <"$file" | grep -v '^$' || true
}

step() {  # step NAME command...: run it, log its output, record its wall time
  local name=$1 start=$SECONDS; shift
  echo "[vla_sft_rl] $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  printf '%s\t%d\n' "$name" $((SECONDS - start)) >>"$timings"
}

[ -d "$OUT/demos" ] || step collect $GSRL collect -c "$CONFIG" --episodes "$DEMOS" --num-envs "$COLLECT_ENVS" \
  --noise "$COLLECT_NOISE" --out "$OUT/demos" "${overrides[@]}"
mapfile -t sft_overrides < <(read_overrides "$SFT_OVERRIDES_FILE")
[ -f "$OUT/sft/model.safetensors" ] || step sft $GSRL sft -c "$CONFIG" --data "$OUT/demos" --out "$OUT/sft" \
  --steps "$SFT_STEPS" --batch-size "$SFT_BATCH" --lr "$SFT_LR" --augment-shift "$SFT_AUGMENT_SHIFT" \
  "${overrides[@]}" "${sft_overrides[@]}"
step eval-sft $GSRL eval -c "$CONFIG" --checkpoint "$OUT/sft" --episodes "$EVAL_EPISODES" --num-envs "$EVAL_ENVS" \
  --json "$OUT/eval-sft.json" "${overrides[@]}"
mapfile -t rl_overrides < <(read_overrides "$RL_OVERRIDES_FILE")
step rl $GSRL train -c "$CONFIG" --run-dir "$OUT/rl" "policy.checkpoint=$OUT/sft" "run.duration_s=$RL_SECONDS" \
  "${overrides[@]}" "${rl_overrides[@]}"
last=$(ls -d "$OUT"/rl/checkpoints/update_* | sort | tail -1)
step eval-rl $GSRL eval -c "$CONFIG" --checkpoint "$last" --episodes "$EVAL_EPISODES" --num-envs "$EVAL_ENVS" \
  --json "$OUT/eval-rl.json" --videos 2 "${overrides[@]}"
step curve $GSRL curve "$OUT/rl" --out "$OUT/curve.png" --eval "SFT=$OUT/eval-sft.json" --eval "RL=$OUT/eval-rl.json" \
  --title "$CONFIG: SFT, then PPO"
cat "$timings"
