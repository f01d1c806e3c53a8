#!/bin/bash
# Issue 5's measurement on a GPU host, from the repo root, detached (the device tool's calls poll it):
#   setsid nohup bash scripts/gpu_vla_campaign.sh > /tmp/campaign.out 2>&1 < /dev/null &
# 1. demonstrations: COLLECTORS `gsrl collect` processes at once (different --seed, one per core slice, spread over
#    the GPUs), DEMOS_EACH successful expert episodes each (DART noise, clean labels);
# 2. `gsrl sft` on all of them, data-parallel on every GPU (SFT_GPUS), compiled when the compiled VLA matches eager;
# 3. `gsrl eval` of the SFT checkpoint, then PPO from it on POOL fixed layouts (RLinf's fixed reset states; 0 = a
#    new layout every episode): variant A (the committed recipe, plus RL_A) on GPU 0 and, with 2 GPUs, variant B
#    (RL_B) on GPU 1 at the same time, each on half the cores, RL_SECONDS long; with RL_GPUS=N (2 or 4), variant A
#    alone on N GPUs and every core (RL_CONFIG_MULTI: data-parallel learner ranks, N times the env servers);
# 4. `gsrl eval` of each PPO's last checkpoint (videos) on held-out layouts and, like the SFT checkpoint's, on the
#    pool (each pool layout equally often), then a learning curve per variant and `gsrl compare` against SFT.
# Everything lands in $RESULTS (default /tmp/results); DONE marks the end.
set -u
# Run from a private copy (REPO_COPY): later device calls re-sync the working tree under the repo root.
REPO_COPY=${REPO_COPY:-/tmp/repo}
[ -n "${SFT_DIR:-}" ] && SFT_DIR=$(realpath "$SFT_DIR")  # named from where the campaign was started
rm -rf "$REPO_COPY" && mkdir -p "$REPO_COPY" && tar cf - --exclude=./.device --exclude=./.venv --exclude=./runs . \
  | tar xf - -C "$REPO_COPY" && cd "$REPO_COPY" || exit 1
R=${RESULTS:-/tmp/results}; mkdir -p $R
[ -f /tmp/gsrl-device.env ] && source /tmp/gsrl-device.env  # the device tool's setup (../shared/device)
export PYTHONUNBUFFERED=1
T0=$SECONDS
log() { echo "$(date +%T) +$((SECONDS - T0))s $*" | tee -a $R/campaign.log; }
CONFIG=${CONFIG:-gs_vla_ppo}
COLLECTORS=${COLLECTORS:-4}
DEMOS_EACH=${DEMOS_EACH:-100}
COLLECT_NOISE=${COLLECT_NOISE:-0.05}
SFT_STEPS=${SFT_STEPS:-3000}
SFT_BATCH=${SFT_BATCH:-64}
SFT_LR=${SFT_LR:-1e-4}
SFT_SHIFT=${SFT_SHIFT:-8}
SFT_SECONDS=${SFT_SECONDS:-0}  # wall-clock budget of SFT's training loop (gsrl sft --max-seconds); 0 = SFT_STEPS decide
EVAL_EPISODES=${EVAL_EPISODES:-100}
RL_SECONDS=${RL_SECONDS:-540}
# > 0: PPO ends by RL_END seconds after the campaign's start instead; RL_SECONDS is then what SFT left of that, less
# 60 s for PPO's start-up and shutdown (at least 60). A device session's budget is fixed while collect and SFT vary.
RL_END=${RL_END:-0}
POOL=${POOL:-64}              # fixed layouts PPO trains on (task.layout_pool; RLinf: one per env, 64); 0 = new ones
POOL_EPISODES=${POOL_EPISODES:-$(( POOL > 0 ? (EVAL_EPISODES + POOL - 1) / POOL * POOL : 0 ))}  # each layout as often
RL_A=${RL_A:-}                # overrides of PPO variant A (GPU 0); empty = the config as committed
# N > 1: variant A alone on GPUs 0..N-1 and every core, with RL_CONFIG_MULTI (${CONFIG}_2gpu: learner ranks on both
# GPUs, 16 env servers; _4gpu: 4 ranks, 2 policy servers, 32 env servers): on half the host, the ninth session's PPO
# waited on its env servers. No variant B then. More than the host has: all of its GPUs.
RL_GPUS=${RL_GPUS:-1}
# variant B (GPU 1): half the recipe's Flow-SDE noise level. With a = 0.5 the seventh session's SFT succeeded in 23 %
# of deterministic evaluations but in about 8 % of its noisy training episodes, so PPO learned on a much weaker
# policy than it was judged by. $R/rl_b_overrides, if written by then, wins. The whole VLA trainable instead
# (512-sample minibatches ran out of an H200's memory in one pass, hence micro-batches):
#   RL_B="policy.train_expert_only=false algo.micro_batch_size=128"
RL_B=${RL_B:-policy.noise_level=0.25}
KEEP_CHECKPOINTS=${KEEP_CHECKPOINTS:-50}  # PPO checkpoints kept (every 10 updates), for evaluations after the run
MID_EVERY=${MID_EVERY:-20}    # also evaluate every MID_EVERY-th update's checkpoint (0: only the last), on the pool if any
# 1: SFT and each PPO's last checkpoint also with sampled actions (gsrl eval --stochastic, held-out layouts): what PPO
# optimizes. The seventh session's SFT succeeded in 23 % of deterministic evaluations, about 8 % of noisy episodes.
EVAL_STOCHASTIC=${EVAL_STOCHASTIC:-1}
OVERRIDES=${OVERRIDES:-}      # section.key=value ... for every gsrl step (a CPU dry run: tiny preset, small images)
COMPILE_PROBE=${COMPILE_PROBE:-1}  # 0: SFT eager, no probe
# A device machine goes back after 30 minutes held. SFT on one machine and PPO on the next (the relay):
#   machine 1: STOP_AFTER_SFT=1 SFT_EXPORT_MIB=15: collect and SFT, then a bfloat16 copy of the SFT checkpoint in
#              shards of 15 MiB ($R/sft-export, `gsrl export`), small enough to fetch back and carry again;
#   machine 2: SFT_DIR=<that copy>: no collect, no SFT; evaluations and PPO from it.
SFT_DIR=${SFT_DIR:-}
STOP_AFTER_SFT=${STOP_AFTER_SFT:-0}
SFT_EXPORT_MIB=${SFT_EXPORT_MIB:-0}
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
(( RL_GPUS > NGPU )) && RL_GPUS=$NGPU
RL_CONFIG_MULTI=${RL_CONFIG_MULTI:-${CONFIG}_${RL_GPUS}gpu}
RL_CONFIG=$CONFIG; (( RL_GPUS > 1 )) && RL_CONFIG=$RL_CONFIG_MULTI || RL_GPUS=1
NCPU=$(OMP_NUM_THREADS= nproc)  # nproc reports OMP_NUM_THREADS when set, not the cores
HALF=$((NCPU > 1 ? NCPU / 2 : 1))
CPUS=(0-$((HALF - 1)) $((HALF % NCPU))-$((NCPU - 1)))  # PPO A's cores, B's cores
PYTHON=${PYTHON:-python3}
GSRL="$PYTHON -m gsrl.cli"
POOLED=(); (( POOL > 0 )) && POOLED=(task.layout_pool=$POOL)
log "gpus=$NGPU cpus=$NCPU collectors=$COLLECTORS x $DEMOS_EACH sft=$SFT_STEPS x $SFT_BATCH (${SFT_SECONDS}s) rl=${RL_SECONDS}s on $RL_GPUS GPU(s) ($RL_CONFIG) pool=$POOL A='$RL_A' B='$RL_B'"
nvidia-smi > $R/nvidia-smi.txt 2>&1
for _ in $(seq ${GSPLAT_WAIT:-240}); do grep -q "kernels ready" /tmp/gsplat-build.log 2>/dev/null && break; sleep 1; done
log "gsplat: $(tail -1 /tmp/gsplat-build.log 2>/dev/null)"

finish() { log "$*"; log "DONE"; touch $R/DONE; exit 1; }  # a stage left nothing to go on with
SFT=${SFT_DIR:-$R/sft}
if [ -z "$SFT_DIR" ]; then
# 1. demonstrations, and meanwhile the compile probe on GPU 0
( [ "$COMPILE_PROBE" = 1 ] && CUDA_VISIBLE_DEVICES=0 timeout -k 10 300 $PYTHON -m pytest -p no:hydra_pytest -q tests/gpu/test_vla_compile_cuda.py \
    -k default > $R/compile-test.log 2>&1 && echo "policy.compile_mode=default" > $R/sft_overrides || : > $R/sft_overrides
  log "compile probe -> SFT overrides '$(cat $R/sft_overrides)' $(tail -1 $R/compile-test.log)" ) &
slice=$((NCPU >= COLLECTORS ? NCPU / COLLECTORS : 1)); data=()
for i in $(seq 0 $((COLLECTORS - 1))); do
  data+=($R/demos-$i)
  first=$((i * slice % NCPU))
  CUDA_VISIBLE_DEVICES=$((i % NGPU)) taskset -c $first-$((first + slice - 1)) timeout -k 10 600 \
    $GSRL collect -c $CONFIG $OVERRIDES --episodes $DEMOS_EACH --num-envs 8 --noise $COLLECT_NOISE --seed $((1000 * i)) \
    --out $R/demos-$i > $R/collect-$i.log 2>&1 &
done
wait
log "collect: $(for i in $(seq 0 $((COLLECTORS - 1))); do tail -1 $R/collect-$i.log | cut -c1-160; done | tr '\n' '|')"

for d in "${data[@]}"; do [ -f $d/meta/info.json ] || finish "collect wrote no dataset $d: stopping"; done

# 2. SFT on every dataset: data-parallel over SFT_GPUS GPUs (torchrun), and on GPU 0 alone if that fails
SFT_GPUS=${SFT_GPUS:-$NGPU}
sft() {  # sft GPUS SECONDS: gsrl sft on GPUs 0..GPUS-1, SECONDS its training loop's budget (0 = none)
  local gpus=$1 budget=$2 launch=($GSRL)
  (( gpus > 1 )) && launch=($PYTHON -m torch.distributed.run --nproc-per-node=$gpus -m gsrl.cli)
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((gpus - 1))) timeout -k 10 $((budget > 0 ? budget + 600 : 1200)) "${launch[@]}" \
    sft -c $CONFIG $OVERRIDES --data "${data[@]}" --out $R/sft --steps $SFT_STEPS --batch-size $SFT_BATCH \
    --lr $SFT_LR --augment-shift $SFT_SHIFT --max-seconds $budget $(cat $R/sft_overrides) > $R/sft-${gpus}gpu.log 2>&1
}
start=$SECONDS
sft $SFT_GPUS $SFT_SECONDS
log "sft on $SFT_GPUS GPU(s) rc=$? $((SECONDS - start))s $(tail -1 $R/sft-${SFT_GPUS}gpu.log | cut -c1-200)"
if [ ! -f $R/sft/model.safetensors ] && (( SFT_GPUS > 1 )); then
  # One GPU with what is left of the budget (at least 2 minutes), so a late failure does not double SFT's time.
  left=$((SFT_SECONDS > 0 ? SFT_SECONDS - (SECONDS - start) : 0)); (( SFT_SECONDS > 0 && left < 120 )) && left=120
  start=$SECONDS; sft 1 $left; log "sft on 1 GPU rc=$? $((SECONDS - start))s $(tail -1 $R/sft-1gpu.log | cut -c1-200)"
fi
else
  log "SFT_DIR=$SFT_DIR: no collect, no SFT"
fi
[ -f $SFT/model.safetensors ] || [ -f $SFT/model.safetensors.index.json ] || finish "no SFT checkpoint in $SFT: stopping"
if (( SFT_EXPORT_MIB > 0 )); then
  $GSRL export $SFT --out $R/sft-export --dtype bfloat16 --max-shard-mib $SFT_EXPORT_MIB > $R/export.log 2>&1
  log "export rc=$? $(tail -1 $R/export.log)"
fi
if (( STOP_AFTER_SFT )); then log "STOP_AFTER_SFT=1: no evaluations, no PPO"; log "DONE"; touch $R/DONE; exit 0; fi
if (( RL_END > 0 )); then
  RL_SECONDS=$((RL_END - (SECONDS - T0) - 60)); (( RL_SECONDS < 60 )) && RL_SECONDS=60
  log "RL_END=${RL_END}s: PPO runs ${RL_SECONDS}s"
fi

evaluate() {  # evaluate NAME CHECKPOINT GPU CPUS [more options]: gsrl eval of EVAL_EPISODES held-out episodes
  local name=$1 ckpt=$2 gpu=$3 cpus=$4 start=$SECONDS; shift 4
  CUDA_VISIBLE_DEVICES=$gpu taskset -c $cpus timeout -k 10 600 $GSRL eval -c $CONFIG $OVERRIDES --checkpoint $ckpt \
    --episodes $EVAL_EPISODES --num-envs 25 --json $R/eval-$name.json "$@" > $R/eval-$name.log 2>&1
  log "eval $name rc=$? $((SECONDS - start))s $(grep -E 'success_once' $R/eval-$name.log | tail -1 | cut -c1-200)"
}

ppo() {  # ppo NAME GPUS CPUS METRICS_PORT_OFFSET OVERRIDES...: PPO from the SFT checkpoint, then its evaluations
  # (the launcher picks free gRPC, Redis and rendezvous ports; metrics ports are fixed, env server i on base + i).
  # GPUS "0,1,...": the run sees them all; its evaluations then go to the first (held-out), the last (pool) and,
  # round the list, the rest (mid-run checkpoints).
  local name=$1 gpus=$2 cpus=$3 off=$4 start=$SECONDS; shift 4
  local gpu=${gpus%%,*} pool_gpu=${gpus##*,} all k=0
  IFS=, read -ra all <<< "$gpus"
  CUDA_VISIBLE_DEVICES=$gpus taskset -c $cpus timeout -k 10 $((RL_SECONDS + 300)) $GSRL train -c $RL_CONFIG \
    --run-dir $R/rl-$name policy.checkpoint=$SFT run.duration_s=$RL_SECONDS learner.keep_checkpoints=$KEEP_CHECKPOINTS \
    policy_server.metrics_port=$((9101 + off)) env_server.metrics_port=$((9201 + off)) learner.metrics_port=$((9301 + off)) \
    $OVERRIDES "${POOLED[@]}" "$@" > $R/rl-$name.log 2>&1
  log "rl $name rc=$? $((SECONDS - start))s $(grep -E '^iter' $R/rl-$name.log | tail -1)"
  local last; last=$(ls -d $R/rl-$name/checkpoints/update_* 2>/dev/null | sort | tail -1)
  [ -n "$last" ] || { log "rl $name: no checkpoint"; return; }
  evaluate rl-$name $last $gpu $cpus --videos 2 &
  (( EVAL_STOCHASTIC )) && evaluate rl-$name-stochastic $last ${all[$((1 % ${#all[@]}))]} $cpus --stochastic &
  (( POOL > 0 )) && evaluate_pool rl-$name $last $pool_gpu $cpus &
  # Checkpoints along the way, deterministic: the seventh session's PPO peaked at update 40 and fell after it.
  for ckpt in $(ls -d $R/rl-$name/checkpoints/update_* | sort); do
    local n=$((10#${ckpt##*update_}))
    (( MID_EVERY > 0 && n % MID_EVERY == 0 )) && [ "$ckpt" != "$last" ] || continue
    local on=${all[$(( (k += 1) % ${#all[@]} ))]}
    if (( POOL > 0 )); then evaluate_pool rl-$name-u$n $ckpt $on $cpus & else evaluate rl-$name-u$n $ckpt $on $cpus & fi
  done
  wait
}

evaluate_pool() {  # evaluate_pool NAME CHECKPOINT GPU CPUS: on the POOL layouts PPO trains on, each equally often
  evaluate $1-pool $2 $3 $4 --layouts pool --episodes $POOL_EPISODES "${POOLED[@]}"
}

monitor() {  # a progress line per PPO run every 60 s, for the poll calls
  # Killed, it takes its sleep along: an orphaned sleep would hold the campaign's stdout open for up to a minute.
  local sleeper=; trap 'kill $sleeper 2>/dev/null; exit 0' TERM
  while [ ! -f $R/DONE ]; do sleep 60 & sleeper=$!; wait $sleeper
    for f in $R/rl-*.log; do [ -f $f ] && log "$(basename $f): $(grep -E '^iter' $f | tail -1 | cut -c1-150)"; done
  done
}

# 3-4. SFT evaluation beside PPO: A on GPU 0 / first half of the cores, B on GPU 1 / second half; with RL_GPUS=N,
# A alone on N GPUs and every core
monitor &
mon=$!
evaluate sft $SFT 0 ${CPUS[0]} &
(( POOL > 0 )) && evaluate_pool sft $SFT $((NGPU - 1)) ${CPUS[1]} &
(( EVAL_STOCHASTIC )) && evaluate sft-stochastic $SFT $((1 % NGPU)) ${CPUS[0]} --stochastic &
if (( RL_GPUS > 1 )); then
  log "PPO A overrides '$RL_A' on GPUs 0-$((RL_GPUS - 1)), no B"
  ( start=$SECONDS
    ppo A $(seq -s, 0 $((RL_GPUS - 1))) 0-$((NCPU - 1)) 0 $RL_A
    # A device session allows one campaign: if the whole-host run made no checkpoint, spend what is left of its time
    # on the one-GPU config rather than on nothing.
    if ! compgen -G "$R/rl-A/checkpoints/update_*" > /dev/null; then
      RL_SECONDS=$((RL_SECONDS - (SECONDS - start))) RL_CONFIG=$CONFIG
      log "PPO on $RL_GPUS GPUs made no checkpoint: A1 on GPU 0 with $CONFIG for the ${RL_SECONDS}s left"
      (( RL_SECONDS >= 60 )) && ppo A1 0 0-$((NCPU - 1)) 0 $RL_A
    fi ) &
else
  ppo A 0 ${CPUS[0]} 0 $RL_A &
  [ -f $R/rl_b_overrides ] && RL_B=$(cat $R/rl_b_overrides)
  log "PPO A overrides '$RL_A', B overrides '$RL_B'"
  (( NGPU > 1 )) && ppo B 1 ${CPUS[1]} 50 $RL_B &
fi
wait $(jobs -p | grep -v "^$mon$")
kill $mon 2>/dev/null
for name in A A1 B; do  # a learning curve per variant (A1: A's one-GPU fallback), with the evaluations it has
  [ -d $R/rl-$name ] || continue
  # Training success is on the pool: the curve marks the pool evaluations, where there are some.
  pool=; [ -f $R/eval-rl-$name-pool.json ] && pool=-pool
  evals=(); labels=; for e in "SFT=$R/eval-sft$pool.json" $(ls $R/eval-rl-$name-u*$pool.json 2>/dev/null | sort -V | \
    sed -E 's/.*-u([0-9]+)[^/]*$/u\1=&/') "RL=$R/eval-rl-$name$pool.json"; do  # each at its checkpoint's update
    [ -f ${e#*=} ] && evals+=(--eval "$e") && labels+="${e%%=*} "
  done
  $GSRL curve $R/rl-$name --out $R/curve-$name.png "${evals[@]}" --title "$RL_CONFIG: SFT, then PPO ($name)" \
    > $R/curve-$name.log 2>&1
  log "curve $name rc=$? marks ${labels:-nothing}$(tail -1 $R/curve-$name.log | cut -c1-160)"
done
for name in A A1 B; do  # each PPO checkpoint against SFT, episode by episode on the same layouts (gsrl compare)
  for protocol in "" -pool -stochastic; do
    [ -f $R/eval-sft$protocol.json ] && [ -f $R/eval-rl-$name$protocol.json ] || continue
    $GSRL compare --base $R/eval-sft$protocol.json --new $R/eval-rl-$name$protocol.json \
      > $R/compare-$name$protocol.txt 2>&1
    label=held-out; [ -n "$protocol" ] && label=${protocol#-}
    log "compare SFT -> $name $label: $(tail -1 $R/compare-$name$protocol.txt)"
  done
done
log "DONE"; touch $R/DONE
