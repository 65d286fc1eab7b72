#!/bin/bash
# One sitting on the lent GPU machine (docs/gpu.md says how to get there), in phases that each
# fit one device call (10 minutes): run from the checkout after the last staged part is
# unpacked; everything worth keeping goes under $OUT.
#
#   bash tests/gpu_session.sh tests     the GPU tests, and the first minute with and without
#                                       the CUDA warm-up of every batch size
#   bash tests/gpu_session.sh bench     trtserve bench fastpath, the full sweep, on resnet50
#   bash tests/gpu_session.sh ingress   HTTP through Serve's Python proxy against its HAProxy
#                                       (the default), and one Router against the default (auto)
#   bash tests/gpu_session.sh load      the GPU tests; then handle calls at 256 callers from 4
#                                       and from 8 generator processes (is the generator the
#                                       limit?), and with 8 Routers
#   bash tests/gpu_session.sh profile   where the CPU goes at saturation: per-process and
#                                       per-thread CPU (top) and py-spy's stacks of a Router,
#                                       an EngineReplica and a load generator under 256
#                                       handle callers
#   bash tests/gpu_session.sh layouts   handle calls at 256 callers: 2 replicas sharing the GPU
#                                       against 1 replica holding it, fewer Routers, and a
#                                       queue delay that lets batches fill
#   bash tests/gpu_session.sh gpus      issue 12, on every GPU of the host: the GPU tests (one
#                                       replica per GPU among them), the replica sweep 1..N
#                                       with its scaling ratio, and where Serve places the
#                                       replacement of a replica broken by a real CUDA fault
#   bash tests/gpu_session.sh kills     recovery from replicas killed under batches: 200
#                                       affected requests from at least 5 kills, 64 callers
#   bash tests/gpu_session.sh notice    how long Ray takes to report an actor's death, by what
#                                       it holds (a session, an engine replica's engine on 4 KiB or
#                                       huge pages), idle and loaded
#                                       (tests/gpu_death_notice.py)
#   bash tests/gpu_session.sh modes     Serve's throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED)
#                                       and its two ingresses, HAProxy and the Python proxy: handle
#                                       and HTTP binary at 64 and 256 callers
#   bash tests/gpu_session.sh slots     HTTP binary at 64 and 256 callers with each Router keeping
#                                       8 (the old rule), 4 and 2 batches in flight, and 8
#                                       Routers at 2 each; the GPU's utilization sampled
#   bash tests/gpu_session.sh defaults  the shipped defaults (HAProxy, batching on) by handle
#                                       and HTTP binary at 1, 64 and 256 callers, the peer,
#                                       and recovery from context faults, written as docs
#   bash tests/gpu_session.sh inflight  HTTP binary at 64 and 256 callers with more batches in
#                                       flight than the defaults: 2 per Router, 8 contexts per
#                                       replica, both
#   bash tests/gpu_session.sh hops      256 callers: the attempt as the Router timed it against
#                                       the replica's share, under the defaults and variants
#                                       that each shorten one hop
#   bash tests/gpu_session.sh replicas [rounds]
#                                       HTTP binary and handle calls at 256 callers with the
#                                       GPU's contexts spread over more engine replica processes
#                                       (2 x 4 contexts, the default, against 4 x 2, 4 x 4, 8 x 1)
#   bash tests/gpu_session.sh pages kills|load
#                                       replica_huge_pages on against off (the default), one run
#                                       each: replicas killed under batches (64 callers), or
#                                       HTTP binary and handle calls at 256 callers
#   BEFORE=dir bash tests/gpu_session.sh ab [rounds]
#                                       an earlier checkout in dir (e.g. `git archive` of the
#                                       last commit, carried) against this one, alternating:
#                                       HTTP binary and handle calls at 64 and 256 callers
#                                       (AB_CONCURRENCY="256": at 256 only)
#   bash tests/gpu_session.sh byvalue [rounds]
#                                       handle calls by reference (Serve's default) against
#                                       by value (Serve's gRPC, `_by_reference=False`) at 64
#                                       and 256 callers, in one run each round, the order
#                                       alternating
#   bash tests/gpu_session.sh variants ROUNDS VARIANT...
#                                       HTTP binary and handle calls at 64 and 256 callers, one
#                                       run per variant per round, alternating; a variant is
#                                       environment settings then flags ("" the defaults,
#                                       "RAY_x=1 --flag 2")
set -o pipefail
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
BENCH="python3 -m deployments.cli bench fastpath --model resnet50 --backend onnxruntime"
MACHINE="one $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) ($(nproc) cores), ONNX Runtime 1.31.1 CUDA provider"

case "${1:-tests}" in
tests)
  nvidia-smi -L | tee "$OUT/nvidia-smi.txt"
  timeout -k 10 200 python3 -m pytest -m gpu -q -rs tests/ 2>&1 | tee "$OUT/gpu-tests.log"
  echo "gpu tests rc=$?"
  # The first minute after a deploy, 64 callers, batching on: with one session per batch
  # bucket, and with one session that sees every batch size.
  for warm in "" "--no-cuda-buckets"; do
    timeout -k 10 150 $BENCH --concurrency 64 --seconds 60 --warmup-s 0 --batching on \
      --modes handle --no-peer --recovery-faults --ceiling-batch-sizes 32 \
      --ceiling-threads 4 --ceiling-seconds 2 $warm 2>&1 | tee -a "$OUT/first-minute.txt"
    echo "first minute $warm rc=$?"
  done
  ;;
bench)
  timeout -k 10 570 $BENCH --full --seconds 6 --plot-dir "$OUT" --write-docs "$OUT/benchmarks.md" \
    --machine "$MACHINE" 2>&1 | tee "$OUT/fastpath-gpu.txt"
  echo "bench rc=$?"
  ;;
ingress)
  for variant in "--ingress proxy" "--router-replicas 1"; do
    timeout -k 10 270 $BENCH --concurrency 64 256 --seconds 6 --batching on \
      --modes handle "http binary" --no-peer --recovery-faults --ceiling-batch-sizes 32 \
      --ceiling-threads 4 --ceiling-seconds 2 $variant 2>&1 | tee -a "$OUT/ingress.txt"
    echo "variant $variant rc=$?"
  done
  ;;
load)
  nvidia-smi -L | tee "$OUT/nvidia-smi.txt"
  timeout -k 10 200 python3 -m pytest -m gpu -q -rs tests/ 2>&1 | tee "$OUT/gpu-tests.log"
  echo "gpu tests rc=$?"
  for variant in "--generators 4" "--generators 8" "--generators 8 --router-replicas 8"; do
    timeout -k 10 110 $BENCH --concurrency 256 --seconds 6 --batching on --modes handle \
      --no-peer --recovery-faults --ceiling-batch-sizes 32 --ceiling-threads 4 \
      --ceiling-seconds 2 $variant 2>&1 | tee -a "$OUT/load.txt"
    echo "variant $variant rc=$?"
  done
  ;;
layouts)
  for variant in "" "--replicas 1" "--replicas 1 --router-replicas 2" \
                 "--max-queue-delay-us 2000 --preferred-batch-sizes 8 16 32"; do
    timeout -k 10 130 $BENCH --concurrency 256 --seconds 6 --warmup-s 3 --batching on \
      --modes handle --no-peer --recovery-faults --ceiling-batch-sizes 32 --ceiling-threads 4 \
      --ceiling-seconds 1 --generators 4 $variant 2>&1 | grep -E "^  trtserve|^ceiling:|rc=" \
      | tee -a "$OUT/layouts.txt"
    echo "variant '$variant' rc=$?" | tee -a "$OUT/layouts.txt"
  done
  ;;
byvalue)
  for round in $(seq "${2:-2}"); do
    if [ $((round % 2)) = 1 ]; then order=(handle "handle by value"); else order=("handle by value" handle); fi
    echo "== round $round: ${order[*]} $(date +%T)" | tee -a "$OUT/byvalue.txt"
    timeout -k 10 200 $BENCH --concurrency 64 256 --seconds 8 --warmup-s 3 --batching on \
      --modes "${order[@]}" --no-peer --recovery-faults --ceiling-batch-sizes 32 \
      --ceiling-threads 4 --ceiling-seconds 1 --generators 4 2>&1 \
      | grep -E "trtserve|ceiling:|Error" | tee -a "$OUT/byvalue.txt"
  done
  ;;
profile)
  timeout -k 10 200 $BENCH --concurrency 256 --seconds 60 --warmup-s 5 --batching on \
    --modes handle --no-peer --recovery-faults --ceiling-batch-sizes 32 --ceiling-threads 4 \
    --ceiling-seconds 1 --generators 4 > "$OUT/profile-bench.txt" 2>&1 &
  bench=$!
  for _ in $(seq 120); do grep -q "deploying" "$OUT/profile-bench.txt" && break; sleep 1; done
  sleep 40  # the deploy (about 25 s here) and the warm-up: the load point is running
  top -b -n 2 -d 8 -w 400 -c > "$OUT/top.txt"
  for role in EngineReplica Router generator; do
    if [ "$role" = generator ]; then pid=$(pgrep -f "multiprocessing.spawn" | head -1)
    else pid=$(pgrep -f "ServeReplica:trtserve:$role" | head -1); fi
    top -b -n 2 -d 3 -H -w 400 -p "$pid" > "$OUT/threads-$role.txt"
    timeout 30 py-spy record -p "$pid" -d 10 -r 100 -f raw --nonblocking -o "$OUT/$role.txt" \
      > "$OUT/py-spy-$role.log" 2>&1 || echo "py-spy on $role failed: $(tail -1 "$OUT/py-spy-$role.log")"
  done
  wait $bench
  tail -5 "$OUT/profile-bench.txt"
  ;;
gpus)
  nvidia-smi -L | tee "$OUT/nvidia-smi.txt"
  n=$(nvidia-smi -L | wc -l)
  timeout -k 10 200 python3 -m pytest -m gpu -q -rs tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log"
  echo "gpu tests rc=$?"
  timeout -k 10 150 python3 -m tests.gpu_placement 2>&1 | grep "^{" | tee "$OUT/placement.json"
  echo "placement rc=$?"
  timeout -k 10 200 $BENCH --replica-sweep $(seq 1 "$n") --batching on --modes handle \
    --concurrency 64 256 --seconds 6 --warmup-s 3 --generators 4 --no-peer --recovery-faults \
    --ceiling-batch-sizes 32 --ceiling-threads 4 --ceiling-seconds 2 2>&1 | tee "$OUT/sweep.txt"
  echo "sweep rc=$?"
  ;;
kills)
  timeout -k 10 560 $BENCH --concurrency 64 --seconds 4 --batching on --modes handle \
    --no-peer --recovery-faults crash --recovery-concurrency 64 --crash-requests 200 \
    --crash-kills 5 --recovery-limit-s 300 --generators 4 --ceiling-batch-sizes 32 \
    --ceiling-threads 4 --ceiling-seconds 2 2>&1 | tee "$OUT/kills.txt"
  echo "kills rc=$?"
  ;;
notice)
  timeout -k 10 570 python3 -m tests.gpu_death_notice "${@:2}" 2>&1 | grep "^{" | tee "$OUT/notice.json"
  echo "notice rc=$?"
  ;;
slots)
  nvidia-smi -L | tee "$OUT/nvidia-smi.txt"
  for variant in "--router-batches-in-flight 8" "--router-batches-in-flight 4" \
                 "--router-batches-in-flight 2" "--router-replicas 8 --router-batches-in-flight 2"; do
    name=$(echo "$variant" | tr -c 'a-z0-9\n' '_')
    nvidia-smi --query-gpu=timestamp,utilization.gpu --format=csv,noheader -lms 250 \
      > "$OUT/util$name.csv" &
    util=$!
    echo "== variant '$variant' $(date +%T)" | tee -a "$OUT/slots.txt"
    timeout -k 10 140 $BENCH --concurrency 64 256 --seconds 8 --warmup-s 3 --batching on \
      --modes "http binary" --no-peer --recovery-faults --ceiling-batch-sizes 32 \
      --ceiling-threads 4 --ceiling-seconds 1 --generators 4 $variant 2>&1 \
      | while IFS= read -r line; do echo "$(date +%T) $line"; done \
      | grep -E "trtserve|ceiling:|Error" | tee -a "$OUT/slots.txt"
    kill $util
  done
  ;;
defaults)
  timeout -k 10 540 $BENCH --concurrency 1 64 256 --seconds 4 --warmup-s 2 --generators 4 \
    --batching on --modes handle "http binary" --recovery-concurrency 64 --recovery-faults context --context-requests 200 \
    --recovery-limit-s 30 --ceiling-batch-sizes 1 32 --ceiling-threads 1 4 --ceiling-seconds 2 \
    --plot-dir "$OUT" --write-docs "$OUT/benchmarks.md" --machine "$MACHINE" 2>&1 \
    | tee "$OUT/defaults.txt"
  echo "defaults rc=$?"
  ;;
modes)
  # Ray reads these where it starts (the bench starts it): each variant is a run of its own.
  for variant in " --ingress proxy" "" "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 --ingress proxy" \
                 "RAY_SERVE_THROUGHPUT_OPTIMIZED=1"; do
    echo "== variant '$variant'" | tee -a "$OUT/modes.txt"
    env=${variant%% --*}; flag=${variant#"$env"}
    env $env timeout -k 10 140 $BENCH --concurrency 64 256 --seconds 6 --warmup-s 3 \
      --batching on --modes handle "http binary" --no-peer --recovery-faults $flag \
      --ceiling-batch-sizes 32 --ceiling-threads 4 --ceiling-seconds 1 --generators 4 2>&1 \
      | grep -E "^  trtserve|^ceiling:|Error" | tee -a "$OUT/modes.txt"
  done
  ;;
inflight)
  for variant in "" "--router-batches-in-flight 2" "--pool-size 8" \
                 "--pool-size 8 --router-batches-in-flight 2"; do
    echo "== variant '$variant' $(date +%T)" | tee -a "$OUT/inflight.txt"
    timeout -k 10 140 $BENCH --concurrency 64 256 --seconds 8 --warmup-s 3 --batching on \
      --modes "http binary" --no-peer --recovery-faults --ceiling-batch-sizes 32 \
      --ceiling-threads 4 --ceiling-seconds 1 --generators 4 $variant 2>&1 \
      | grep -E "^  trtserve|^ceiling:|Error" | tee -a "$OUT/inflight.txt"
  done
  ;;
hops)
  # Where a request's time goes at 256 callers (each load point prints the attempt as the
  # Router timed it and the replica's share of it), under the defaults and under variants
  # that each shorten one hop: Serve's replica loop for the EngineReplicas too, Ray's inline
  # arguments instead of its object store, and more batches in flight.
  for variant in "" "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0" \
                 "RAY_max_direct_call_object_size=67108864 RAY_task_rpc_inlined_bytes_limit=134217728" \
                 " --router-batches-in-flight 2" " --pool-size 8"; do
    echo "== variant '$variant' $(date +%T)" | tee -a "$OUT/hops.txt"
    env=${variant%% --*}; flag=${variant#"$env"}
    env $env timeout -k 10 110 $BENCH --concurrency 256 --seconds 8 --warmup-s 3 \
      --batching on --modes "http binary" handle --no-peer --recovery-faults $flag \
      --ceiling-batch-sizes 32 --ceiling-threads 4 --ceiling-seconds 1 --generators 4 2>&1 \
      | grep -E "^  trtserve|^ceiling:|Error" | tee -a "$OUT/hops.txt"
  done
  ;;
replicas)
  for round in $(seq "${2:-1}"); do
    for variant in "" "--replicas 4 --pool-size 2" "--replicas 4" "--replicas 8 --pool-size 1"; do
      echo "== variant '$variant', round $round $(date +%T)" | tee -a "$OUT/replicas.txt"
      timeout -k 10 140 $BENCH --concurrency 256 --seconds 8 --warmup-s 3 --batching on \
        --modes "http binary" handle --no-peer --recovery-faults --ceiling-batch-sizes 32 \
        --ceiling-threads 4 --ceiling-seconds 1 --generators 4 $variant 2>&1 \
        | grep -E "^  trtserve|^ceiling:|Error" | tee -a "$OUT/replicas.txt"
    done
  done
  ;;
pages)
  for variant in "--replica-huge-pages" ""; do
    echo "== $2, variant '$variant' $(date +%T)" | tee -a "$OUT/pages-$2.txt"
    if [ "$2" = kills ]; then
      timeout -k 10 250 $BENCH --concurrency 64 --seconds 4 --batching on --modes handle \
        --no-peer --recovery-faults crash --recovery-concurrency 64 --crash-requests 200 \
        --crash-kills 5 --recovery-limit-s 120 --generators 4 --ceiling-batch-sizes 32 \
        --ceiling-threads 4 --ceiling-seconds 1 $variant 2>&1 | tee -a "$OUT/pages-kills-raw.txt" \
        | grep -E "^  trtserve|^  recovery|^\| crash|^ceiling:|Error" | tee -a "$OUT/pages-$2.txt"
    else
      timeout -k 10 140 $BENCH --concurrency 256 --seconds 8 --warmup-s 3 --batching on \
        --modes "http binary" handle --no-peer --recovery-faults --ceiling-batch-sizes 32 \
        --ceiling-threads 4 --ceiling-seconds 1 --generators 4 $variant 2>&1 \
        | grep -E "^  trtserve|^ceiling:|Error" | tee -a "$OUT/pages-$2.txt"
    fi
  done
  ;;
ab)
  here=$PWD
  for round in $(seq "${2:-1}"); do
    for side in before after; do
      dir=$here; [ $side = before ] && dir=$BEFORE
      echo "== $side, round $round $(date +%T)" | tee -a "$OUT/ab.txt"
      (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout -k 10 200 $BENCH --concurrency ${AB_CONCURRENCY:-64 256} \
        --seconds 8 --warmup-s 3 --batching on --modes "http binary" handle --no-peer \
        --recovery-faults --ceiling-batch-sizes 32 --ceiling-threads 4 --ceiling-seconds 1 \
        --generators 4 2>&1) | grep -E "^  trtserve|^ceiling:|Error" | tee -a "$OUT/ab.txt"
    done
  done
  ;;
variants)
  rounds=$2; shift 2
  for round in $(seq "$rounds"); do
    for variant in "$@"; do
      echo "== variant '$variant', round $round $(date +%T)" | tee -a "$OUT/variants.txt"
      env=${variant%% --*}; flag=${variant#"$env"}
      env $env timeout -k 10 150 $BENCH --concurrency 64 256 --seconds 8 --warmup-s 3 \
        --batching on --modes "http binary" handle --no-peer --recovery-faults $flag \
        --ceiling-batch-sizes 32 --ceiling-threads 4 --ceiling-seconds 1 --generators 4 2>&1 \
        | grep -E "^  trtserve|^ceiling:|Error" | tee -a "$OUT/variants.txt"
    done
  done
  ;;
esac
