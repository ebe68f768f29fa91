#!/usr/bin/env bash
# The pipeline as separate Ray jobs chained through their output directories:
#   synth -> tiny-model -> prepare -> eval
# Each stage is one `ray job submit` of `python -m effsft <job> jobs/<job>.yaml key=value...`;
# `ray job submit` waits for the job and exits 1 if it FAILED, so the chain stops at the first
# failure. Every output is atomic (`<out>.partial/` until `_SUCCESS`), and a stage whose output
# is already complete is skipped, so re-running the script resumes.
#
# Usage:   jobs/pipeline.sh ROOT [ROWS]
#   ROOT   a directory every node sees at the same path (NFS / PVC mount; a local path on a
#          one-machine cluster such as cluster/local_cluster.sh)
#   ROWS   synthetic rows (default 4000)
# Cluster: RAY_ADDRESS=http://HEAD:8265 (Jobs API), plus RAY_AUTH_MODE=token and
#          RAY_AUTH_TOKEN_PATH for a token-protected cluster (`source $DIR/env.sh` for the local
#          one). Extra `ray job submit` options: EFFSFT_SUBMIT_ARGS, e.g.
#          EFFSFT_SUBMIT_ARGS='--runtime-env-json {"env_vars":{"HF_HUB_OFFLINE":"1"}}'
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${1:?usage: jobs/pipeline.sh ROOT [ROWS]}"
ROWS="${2:-4000}"
RAY="${RAY:-ray}"
read -r -a EXTRA <<<"${EFFSFT_SUBMIT_ARGS:-}"

stage() {  # stage JOB OUTPUT [key=value ...]
    local job=$1 out=$2; shift 2
    if [[ -f "$out/_SUCCESS" ]]; then
        echo "pipeline: $job: $out is complete, skipping"; return 0
    fi
    echo "pipeline: $job -> $out"
    "$RAY" job submit --working-dir . "${EXTRA[@]}" -- \
        python -m effsft "$job" "jobs/${job//-/_}.yaml" "output=$out" "$@"
}

stage synth "$ROOT/corpus" rows="$ROWS" eval_rows=100 grpo_rows=100
stage tiny-model "$ROOT/model" corpus="$ROOT/corpus"
stage prepare "$ROOT/prepared" input.path="$ROOT/corpus/train"
stage eval "$ROOT/eval" model.path="$ROOT/model" data.path="$ROOT/prepared/data" \
    eval_split="$ROOT/corpus/eval.parquet" limit=100 max_new_tokens=32
echo "pipeline: done: $ROOT/eval/manifest.json"
