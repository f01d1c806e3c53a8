#!/bin/bash
# The GPU figures of docs/benchmarks.md on a host with 2 GPUs, from the repo root, detached:
#   setsid nohup bash scripts/gpu_campaign.sh > /tmp/campaign.out 2>&1 < /dev/null &
# Track A (GPU 0, first half of the cores): the compile probe (SFT compiles if it passes), the PPO ratio probe
# (it picks the PPO runs' precision), GPU tests, then
# `python -m bench --full` stage by stage until a deadline, then `bench.vla_profile` eager and compiled.
# Track B (GPU 1, second half): scripts/vla_sft_rl.sh (collect, SFT, eval, PPO 1-GPU, eval, curve) + GPU use per role.
# First, alone on both GPUs: the NCCL weight-broadcast bench. Last: the 2-GPU run (gs_vla_ppo_2gpu) on track B's cores.
set -u
# Run from a private copy: later device calls re-sync the working tree under the repo root.
rm -rf /tmp/repo && mkdir -p /tmp/repo && tar cf - --exclude=./.device --exclude=./.venv --exclude=./runs . | tar xf - -C /tmp/repo && cd /tmp/repo
R=${RESULTS:-/tmp/results}; mkdir -p $R/bench
[ -f /tmp/gsrl-device.env ] && source /tmp/gsrl-device.env  # the device tool's setup (../shared/device)
export PYTHONUNBUFFERED=1
T0=$SECONDS
log() { echo "$(date +%T) +$((SECONDS - T0))s $*" | tee -a $R/campaign.log; }
NGPU=$(nvidia-smi -L | wc -l); NCPU=$(nproc); HALF=$((NCPU / 2))
A_CPUS=0-$((HALF - 1)); B_CPUS=$HALF-$((NCPU - 1))
A_DEADLINE=${A_DEADLINE:-660}
RL_SECONDS=${RL_SECONDS:-480}
RUN2_SECONDS=${RUN2_SECONDS:-150}  # 0: skip the 2-GPU run
# more overrides for every gsrl step of both tracks and the 2-GPU run
RUN_OVERRIDES=${RUN_OVERRIDES:-}
log "gpus=$NGPU cpus=$NCPU A=$A_CPUS B=$B_CPUS"
nvidia-smi > $R/nvidia-smi.txt 2>&1; nvidia-smi topo -m > $R/topo.txt 2>&1
# The NCCL weight-broadcast bench first, alone on both GPUs (NVLink figures unshared with the tracks' kernels);
# gsplat's kernels build meanwhile
CUDA_VISIBLE_DEVICES=0,1 timeout -k 10 240 python3 -m bench --full --only weights --out $R/bench/weights \
  > $R/bench/weights.log 2>&1
log "weights rc=$? $(grep -iE 'broadcast|GB/s' $R/bench/weights.log | tail -3 | tr -s ' ' | tr '\n' '|')"
for _ in $(seq 240); do grep -q "kernels ready" /tmp/gsplat-build.log 2>/dev/null && break; sleep 1; done
log "gsplat: $(tail -1 /tmp/gsplat-build.log)"

sample_roles() {  # sample_roles RUN_DIR GPUS OUT: GPU use per role, 75 s after the run's first env steps
  for _ in $(seq 1500); do [ -f "$1/config.yaml" ] && break; sleep 1; done
  sleep 60; python3 -m bench.gpu_roles --seconds 60 --gpus "$2" --out "$3" > /dev/null 2>&1
  log "roles sampled -> $3"
}

choose_precision() {  # the PPO runs' precision: the first set-up whose ratio at unchanged weights clips < 2 %
  timeout -k 10 300 taskset -c $A_CPUS python3 -m bench.vla_ratio --preset small --json $R/ratio.json > $R/ratio.log 2>&1
  python3 - $R/ratio.json > $R/rl_overrides <<'PY' || : > $R/rl_overrides
import json, sys
overrides = {"bf16 learner": "", "bf16 autocast": "learner.bf16=false",
             "fp32": "policy.bf16_autocast=false learner.bf16=false"}
rows = json.load(open(sys.argv[1]))
print(next((overrides[r["setup"]] for r in rows if r["clipped_fraction"] < 0.02), overrides["fp32"]))
PY
  log "A: ratio probe -> RL overrides '$(cat $R/rl_overrides)' $(tr '\n' ' ' < $R/ratio.log | tail -c 600)"
}

choose_compile() {  # SFT compiled (2.3x per step on an H100) only if the compiled VLA matches eager on this GPU
  if timeout -k 10 300 taskset -c $A_CPUS python3 -m pytest -p no:hydra_pytest -q tests/gpu/test_vla_compile_cuda.py \
    -k default > $R/compile-test.log 2>&1; then echo "policy.compile_mode=default" > $R/sft_overrides
  else : > $R/sft_overrides; fi
  log "A: compile probe -> SFT overrides '$(cat $R/sft_overrides)' $(tail -1 $R/compile-test.log)"
}

trackA() {
  CUDA_VISIBLE_DEVICES=0 choose_compile
  CUDA_VISIBLE_DEVICES=0 choose_precision
  export CUDA_VISIBLE_DEVICES=0
  for st in ${A_FIRST_STAGES:-whole_loop}; do  # issue 8's missing row, before the GPU tests
    timeout -k 10 420 taskset -c $A_CPUS python3 -m bench --full --only $st --out $R/bench/$st > $R/bench/$st.log 2>&1
    log "A: $st rc=$?"
  done
  [ -n "${SKIP_PYTEST:-}" ] || timeout -k 10 360 taskset -c $A_CPUS python3 -m pytest -p no:hydra_pytest -q -rs tests/gpu \
    tests/integration/test_gs_env.py > $R/pytest-gpu.log 2>&1
  log "A: pytest gpu rc=$? $(tail -1 $R/pytest-gpu.log)"
  for st in ${A_STAGES:-transport codec gs_render}; do
    if (( SECONDS - T0 > A_DEADLINE )); then log "A: $st skipped (deadline)"; continue; fi
    timeout -k 10 420 taskset -c $A_CPUS python3 -m bench --full --only $st --out $R/bench/$st > $R/bench/$st.log 2>&1
    log "A: $st rc=$?"
  done
  for mode in eager default reduce-overhead; do  # what graph capture would buy the launch-bound VLA forward
    if (( SECONDS - T0 > A_DEADLINE + 240 )); then log "A: vla_profile $mode skipped (deadline)"; continue; fi
    flag=(); [ $mode = eager ] || flag=(--compile $mode)
    timeout -k 10 400 taskset -c $A_CPUS python3 -m bench.vla_profile --preset small --calls 5 "${flag[@]}" \
      --json $R/bench/vla_profile-$mode.json > $R/bench/vla_profile-$mode.log 2>&1
    log "A: vla_profile $mode rc=$? $(grep -E '^(act|sft)' $R/bench/vla_profile-$mode.log | tr -s ' ' | tr '\n' '|')"
  done
}

trackB() {
  export CUDA_VISIBLE_DEVICES=1
  sample_roles $R/vla/rl 1 $R/gpu-roles-1gpu.json &
  OUT=$R/vla DEMOS=${DEMOS:-200} COLLECT_ENVS=16 COLLECT_NOISE=${COLLECT_NOISE:-0.05} \
    SFT_AUGMENT_SHIFT=${SFT_AUGMENT_SHIFT:-8} SFT_STEPS=${SFT_STEPS:-2000} SFT_BATCH=${SFT_BATCH:-64} \
    EVAL_EPISODES=100 EVAL_ENVS=25 RL_SECONDS=$RL_SECONDS GSRL="python3 -m gsrl.cli" OVERRIDES="$RUN_OVERRIDES" \
    SFT_OVERRIDES_FILE=$R/sft_overrides RL_OVERRIDES_FILE=$R/rl_overrides \
    timeout -k 10 1500 taskset -c $B_CPUS bash scripts/vla_sft_rl.sh > $R/vla.log 2>&1
  log "B: vla pipeline rc=$? $(tr '\n' ' ' < $R/vla/timings.tsv)"
  wait
}

trackA & trackB & wait
export CUDA_VISIBLE_DEVICES=0,1
if (( RUN2_SECONDS == 0 )); then log "2-GPU run skipped (RUN2_SECONDS=0)"; log "DONE"; touch $R/DONE; exit 0; fi
ckpt=(); [ -f $R/vla/sft/model.safetensors ] && ckpt=(policy.checkpoint=$R/vla/sft)
sample_roles $R/run2gpu 0,1 $R/gpu-roles-2gpu.json &
timeout -k 10 $((RUN2_SECONDS + 240)) taskset -c $B_CPUS python3 -m gsrl.cli train -c gs_vla_ppo_2gpu \
  --run-dir $R/run2gpu "${ckpt[@]}" run.duration_s=$RUN2_SECONDS $RUN_OVERRIDES $(cat $R/rl_overrides 2>/dev/null) \
  > $R/run2gpu.log 2>&1
log "2-GPU run rc=$?"
wait
log "DONE"; touch $R/DONE
