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
#     reads the plan (experiments/run_study.py --plan: a bad line stops it before anything
#     else), installs .whl/ into /tmp/site (skipped if it is empty or absent), unpacks the data
#     into /tmp/fer2013, prepares it once, and runs the plan with run_study: every run at once
#     (each gets 0.9/N of the GPU memory and logs to runs/gpu/<name>.log); STOP_S (default 45)
#     seconds before DEADLINE_S after the script's start the runs still going get SIGTERM, save
#     the epoch they are in and stop (SIGKILL STOP_S/2 later); each finished run is collected into
#     runs/gpu/collected/<name>/ (results, config, figures, probabilities, its command and this
#     machine: GPU name, cores, jax version, or $MACHINE). AFTER='<shell command>' runs then, e.g.
#     AFTER="python3 -m fer.distill --teachers=runs/gpu/strong_resnet_s0 --out=runs/gpu/t.npz"
#     (leave it time with a larger STOP_S). $OUT/results.tgz gets the logs, collected/, each run's
#     results.json, config.json, metrics.jsonl and probabilities, and AFTER's .npz files; no
#     checkpoints. Running it again resumes the stopped runs from their checkpoints.
# Back here:
#   mkdir -p runs && tar xzf results.tgz -C runs
#   cp -r runs/gpu/collected/* experiments/results/ && python experiments/study.py table
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
  local study=(python3 experiments/run_study.py --root=runs/gpu --plan="$plan")
  # The plan is read (and refused, naming its bad line) before anything is installed.
  local runs
  runs=$("${study[@]}" --count) || return 2
  (( runs > 0 )) || runs=1  # all complete: run_study only collects them again
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
  mkdir -p runs/gpu
  # Prepare the data set once, before the runs race to do it.
  python3 -c "from fer import input_pipeline; input_pipeline.prepare()" \
      > runs/gpu/prepare.log 2>&1 || { tail runs/gpu/prepare.log; return 1; }
  local gpu machine left
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -1)
  machine="${gpu:-GPU} machine, $(nproc) cores, jax $(python3 -c 'import jax
print(jax.__version__)'), GPU shared by $runs concurrent runs"
  left=$((deadline - stop - SECONDS))
  (( left > 0 )) || left=1
  # Every run of the plan at once (each logs to runs/gpu/<name>.log with 0.9/N of the GPU's
  # memory); at the deadline they get SIGTERM, save their epoch and stop (SIGKILL STOP_S/2 later).
  # Each finished run is collected into runs/gpu/collected/<name>/ with its command and machine.
  "${study[@]}" --parallel="$runs" --deadline_s="$left" --grace_s=$((stop / 2)) \
      --results=runs/gpu/collected --machine="${MACHINE:-$machine}"
  echo "run_study ended with status $? (124: stopped at the deadline)"
  if [[ -n ${AFTER:-} ]]; then  # e.g. fer.distill over the finished runs (its .npz is packed)
    echo "after the runs: $AFTER"
    bash -c "$AFTER" > runs/gpu/after.log 2>&1 || echo "AFTER failed: see runs/gpu/after.log"
  fi
  mkdir -p "$out"
  (cd runs && { find gpu -maxdepth 2 \( -name '*.log' -o -name results.json -o -name config.json \
      -o -name metrics.jsonl -o -name '*_probs.npy' -o -name '*.npz' \) -print0
      find gpu/collected -type f -print0 2> /dev/null; } | tar czf "$out/results.tgz" --null -T -) \
      || return 1
  python3 -c "import glob, json
for f in sorted(glob.glob('runs/gpu/collected/*/results.json')):
  r = json.load(open(f))
  print(f.split('/')[-2], 'val %.4f test %.4f, best epoch %s, %.0f s' % (
      r['val/accuracy'], r['test/accuracy'], r['best_epoch'], r['train_seconds']))"
}

case ${1:-} in
  bundle) bundle ;;
  run) shift; run_plan "$@" ;;
  *) echo "usage: $0 bundle | run PLAN_FILE (see the top of this file)" >&2; exit 2 ;;
esac
