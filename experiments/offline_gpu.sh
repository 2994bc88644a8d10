#!/usr/bin/env bash
# Train on a GPU machine that cannot reach the internet (an air-gapped cluster node, a lent
# device with a time limit): bundle here what it lacks, run a plan of fer.main runs there all at
# once under a deadline, and bring back the small result files in one archive.
#
# Here (online), once; both outputs are git-ignored:
#   FER2013_ARCHIVE=archive.zip bash experiments/offline_gpu.sh bundle
#     .whl/                wheels a CUDA JAX image usually lacks (tensorflow-datasets and its
#                          needs, ml-collections, tensorboardX) for CPython 3.12 on x86-64
#                          (PYTHON_VERSION=3.11 etc. for another one)
#     data/fer2013.tar.xz  the archive's train/ and test/ folders (about 43 MB)
# There, in a copy of this checkout holding .whl/ and data/:
#   DEADLINE_S=560 OUT=/tmp/out bash experiments/offline_gpu.sh run experiments/gpu_plan.txt
#     installs .whl/ into /tmp/site (skipped if it is empty or absent), unpacks the data into
#     /tmp/fer2013, starts every line of the plan at once (each gets 0.9/N of the GPU memory and
#     logs to runs/gpu/<name>.log), sends SIGTERM to the runs still going STOP_S (default 45)
#     seconds before DEADLINE_S after the script's start (each then keeps its last checkpoint),
#     and packs the logs and each run's results.json, config.json, metrics.jsonl and saved
#     probabilities into $OUT/results.tgz (no checkpoints). AFTER='<shell command>' runs once
#     the runs have ended, e.g. AFTER='python3 -m fer.distill --teachers=runs/gpu/strong_resnet_s0
#     --out=runs/gpu/teachers.npz' (the teachers' probabilities on Training come back too; leave
#     it time with a larger STOP_S).
# Back here:
#   mkdir -p runs && tar xzf results.tgz -C runs
#   python experiments/study.py collect runs/gpu/<name> --name=<name> \
#       --command="python -m fer.main <the plan line's args> --workdir=runs/<name>" --machine="..."
#   python experiments/study.py table
#
# A plan file has one run per line, `<name> <fer.main flags>`; blank lines and # comments are
# skipped, e.g.
#   strong_resnet_s0 --config=configs/strong_resnet.py --config.seed=0
set -uo pipefail
cd "$(dirname "$0")/.."

bundle() {
  local archive=${FER2013_ARCHIVE:?set FER2013_ARCHIVE to FER2013 archive.zip (Kaggle layout)}
  local py=${PYTHON_VERSION:-3.12}
  local platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64; do
    platforms+=(--platform "$p")
  done
  mkdir -p .whl data
  # tensorflow-datasets' runtime needs that a CUDA JAX image (numpy, absl, etils, protobuf,
  # requests, ...) usually has; versions as requirements.txt pins them where it does.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
      --implementation cp "${platforms[@]}" -d .whl \
      tensorflow-datasets==4.9.10 array-record==0.8.6 ml-collections==1.1.0 \
      tensorboardX==2.6.5 dm-tree immutabledict simple-parsing tensorflow-metadata termcolor \
      toml googleapis-common-protos docstring-parser || return 1
  python3 -m pip wheel -q --no-deps -w .whl promise || return 1  # sdist only
  local tmp
  tmp=$(mktemp -d) || return 1
  unzip -q "$archive" -d "$tmp" || { rm -rf "$tmp"; return 1; }
  if [[ ! -d $tmp/train || ! -d $tmp/test ]]; then
    echo "$archive: expected train/ and test/ folders at its top (the Kaggle layout)" >&2
    rm -rf "$tmp"; return 1
  fi
  tar cf - -C "$tmp" train test | xz -1 -T2 > data/fer2013.tar.xz.tmp \
      && mv data/fer2013.tar.xz.tmp data/fer2013.tar.xz
  local rc=$?
  rm -rf "$tmp"
  [[ $rc == 0 ]] || return $rc
  du -sh .whl data/fer2013.tar.xz
}

run_plan() {
  local plan=${1:?usage: offline_gpu.sh run PLAN_FILE}
  local deadline=${DEADLINE_S:?set DEADLINE_S: seconds this script may take in all}
  local stop=${STOP_S:-45} out=${OUT:?set OUT: the folder for results.tgz}
  [[ -f $plan ]] || { echo "$plan: no such plan file" >&2; return 2; }
  local names=() args=() name rest
  while read -r name rest || [[ -n $name ]]; do  # the last line may lack its newline
    [[ -z $name || $name == \#* ]] && continue
    if [[ ! $name =~ ^[A-Za-z0-9_.-]+$ || -z $rest ]]; then
      echo "$plan: bad line '$name $rest': expected '<name> <fer.main flags>'" >&2; return 2
    fi
    if [[ " ${names[*]} " == *" $name "* ]]; then
      echo "$plan: the name $name is used twice (each run needs its own workdir)" >&2; return 2
    fi
    names+=("$name"); args+=("$rest")
  done < "$plan"
  (( ${#names[@]} )) || { echo "$plan: no runs in it" >&2; return 2; }
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || return 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if [[ -z ${FER2013_ARCHIVE:-} ]]; then
    [[ -f data/fer2013.tar.xz ]] || { echo "no data/fer2013.tar.xz and no FER2013_ARCHIVE:" \
        "run 'offline_gpu.sh bundle' where the archive is" >&2; return 1; }
    mkdir -p /tmp/fer2013 && tar xJf data/fer2013.tar.xz -C /tmp/fer2013 || return 1
    export FER2013_ARCHIVE=/tmp/fer2013
  fi
  export FER_DATA_DIR=${FER_DATA_DIR:-/tmp/ferdata} PYTHONUNBUFFERED=1
  export XLA_PYTHON_CLIENT_MEM_FRACTION
  XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(f'{0.9 / ${#names[@]}:.3f}')")
  mkdir -p runs/gpu
  # Prepare the data set once, before the runs race to do it.
  python3 -c "from fer import input_pipeline; input_pipeline.prepare()" \
      > runs/gpu/prepare.log 2>&1 || { tail runs/gpu/prepare.log; return 1; }
  local pids=() i
  for i in "${!names[@]}"; do
    # shellcheck disable=SC2086  # the plan's flags split on spaces, as a shell would
    python3 -m fer.main ${args[$i]} --workdir="runs/gpu/${names[$i]}" \
        > "runs/gpu/${names[$i]}.log" 2>&1 &
    pids+=($!)
    echo "started ${names[$i]}: python -m fer.main ${args[$i]}"
  done
  while (( SECONDS < deadline - stop )) && jobs -r | grep -q .; do sleep 5; done
  for i in "${!pids[@]}"; do
    if kill -0 "${pids[$i]}" 2> /dev/null; then
      echo "stopping ${names[$i]} (deadline): $(grep -c '"epoch"' \
          "runs/gpu/${names[$i]}/metrics.jsonl" 2> /dev/null || echo 0) epochs logged"
      kill -TERM "${pids[$i]}"
    fi
  done
  # SIGTERM ends a run at once; its last saved checkpoint stays whole (saves are atomic).
  local grace=$((SECONDS + stop / 2))
  while (( SECONDS < grace )) && jobs -r | grep -q .; do sleep 1; done
  for i in "${!pids[@]}"; do
    kill -0 "${pids[$i]}" 2> /dev/null && echo "killing ${names[$i]}" && kill -KILL "${pids[$i]}"
  done
  wait
  if [[ -n ${AFTER:-} ]]; then  # e.g. fer.distill over the finished runs (its .npz is packed)
    echo "after the runs: $AFTER"
    bash -c "$AFTER" > runs/gpu/after.log 2>&1 || echo "AFTER failed: see runs/gpu/after.log"
  fi
  nvidia-smi --query-gpu=name --format=csv,noheader > runs/gpu/gpu.txt 2> /dev/null
  mkdir -p "$out"
  (cd runs && find gpu -maxdepth 2 \( -name '*.log' -o -name gpu.txt -o -name results.json \
      -o -name config.json -o -name metrics.jsonl -o -name '*_probs.npy' -o -name '*.npz' \) -print0 \
      | tar czf "$out/results.tgz" --null -T -) || return 1
  for i in "${!names[@]}"; do
    local r=runs/gpu/${names[$i]}/results.json
    if [[ -f $r ]]; then
      python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], \
'val %.4f test %.4f best epoch %s, %.0f s' % (r['val/accuracy'], r['test/accuracy'], \
r['best_epoch'], r['train_seconds']))" "$r" "${names[$i]}"
    else
      echo "${names[$i]}: not finished (last lines of its log:)"; tail -3 "runs/gpu/${names[$i]}.log"
    fi
  done
}

case ${1:-} in
  bundle) bundle ;;
  run) shift; run_plan "$@" ;;
  *) echo "usage: $0 bundle | run PLAN_FILE (see the top of this file)" >&2; exit 2 ;;
esac
