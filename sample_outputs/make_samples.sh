#!/usr/bin/env bash
# Makes everything in sample_outputs/ from ../shared: mini-gpt2-fiction (pretrained on Dickens, Eliot, Brontë
# and Wilde, never Austen) fine-tuned on the five Austen novels at the text mode's defaults, with QLoRA and,
# as the reference, with 32-bit LoRA on the same tokens; then `qlora-ft eval` (Dickens as the contrast
# style) and `qlora-ft compare`.
# Then the same model instruction-tuned on ../shared/data/instructions (the instruction mode's defaults) and
# evaluated on its held-out records (`qlora-ft eval`: base vs tuned).
# Then SmolLM2-135M-Instruct (a real pretrained model: ../shared/models/smollm2-135m-instruct) on Austen, through
# bench/quality.py's style screen (200 steps of 8 x 128 tokens), then `qlora-ft compare`; and instruction-tuned
# at the instruction mode's defaults (bench/quality.py --mode instructions), evaluated base vs tuned.
# Run from the repository root: bash sample_outputs/make_samples.sh [WORK_DIR] [all|austen|instructions|smollm2]
# About an hour on 2 CPU cores for austen (its two training runs go side by side, one thread each), about 10
# minutes for instructions. A run already finished in WORK_DIR (train_summary.json) is reused.
set -euo pipefail
root=$(pwd)
model=$(realpath ../shared/models/mini-gpt2-fiction)
corpora=$(realpath ../shared/data/corpora)
instructions=$(realpath ../shared/data/instructions/instruction-data.json)
work=${1:-$(mktemp -d)}
part=${2:-all}
out="$root/sample_outputs"
mkdir -p "$work" && cd "$work"

instruction_sample() {
  [[ -f instruct_run/train_summary.json ]] ||
    python "$root/train.py" --qlora True --model "$model" --data "$instructions" --output-dir instruct_run \
      --check-dir instruct_ckpt --log-every 20 2> instruct.log
  python -m qlora_ft eval --model_path instruct_run --n-prompts 20 --max-length 64 2> instruct-eval.log
  local dest="$out/instructions-mini-gpt2-fiction"
  mkdir -p "$dest"
  cp instruct_run/{eval.json,eval.md,eval.png,training.png,report.md,train_summary.json,run_config.json} "$dest/"
  sed -i -e "s#$work/##g" -e "s#$model#../shared/models/mini-gpt2-fiction#g" \
    -e "s#$instructions#../shared/data/instructions/instruction-data.json#g" "$dest"/*.md "$dest"/*.json
  {
    echo "# Before and after: mini-gpt2-fiction instruction-tuned on Alpaca-style records"
    echo
    echo "Made by \`bash sample_outputs/make_samples.sh WORK instructions\`: ../shared/models/mini-gpt2-fiction (16M"
    echo "parameters, pretrained on fiction only) fine-tuned with \`train.py --qlora True --model"
    echo "../shared/models/mini-gpt2-fiction --data ../shared/data/instructions/instruction-data.json\` (the instruction"
    echo "mode's defaults: Alpaca template, loss on responses only, QLoRA r 16 / alpha 32 on every linear layer, lr 1e-3,"
    echo "2 epochs, 90/10 split by record), then \`qlora-ft eval --model_path instruct_run --n-prompts 20 --max-length 64\`:"
    echo "response perplexity over the 100 held-out records, and greedy answers to the first 20 of them, base vs tuned."
    echo "A model this small does not become a useful assistant. What moves, in the table below: response perplexity,"
    echo "and the form of the answers (short, closed by EOS, no template header) where the base rambles to the token"
    python - "$dest/eval.json" <<'PY'
import collections, json, sys
answers = [r["fine_tuned"]["response"] for r in json.load(open(sys.argv[1]))["responses"]]
text, n = collections.Counter(answers).most_common(1)[0]
print(f'limit. What does not: the content. The tuned model gave the same answer ("{text}") to {n} of the {len(answers)}')
print('records, so its ROUGE-L comes mostly from short overlaps with the references ("The ... is ...").')
PY
    echo
    echo "Data: instruction records from rasbt/LLMs-from-scratch (chapter 7), Apache License 2.0"
    echo "(../shared/data/instructions/LICENSE.txt); the held-out records below are quoted from it."
    echo
    sed -e '1,2d' "$dest/eval.md"
  } > "$out/instructions-mini-gpt2-fiction.md"
  echo "wrote $out/instructions-mini-gpt2-fiction.md and $dest/"
}

smollm2_sample() {
  local smol="$work/smollm2-135m-instruct" dest="$out/austen-smollm2-135m-instruct"
  [[ -f $smol/config.json ]] || python "$root/../shared/models/smollm2-135m-instruct/to_hf.py" "$smol"
  (cd "$root" && python bench/quality.py --model "$smol" --mode style --max-steps 200 --seeds 1 \
    --candidates defaults --flags "--max-input-length 128 --gradient-checkpointing False" --label smollm2 \
    --n-generations 50 --work-dir "$work/quality-smollm2")
  local run="$work/quality-smollm2/defaults-seed1"
  python -m qlora_ft compare --model_path "$run" --prompt "It is a truth universally acknowledged" \
    --prompt "She was" --prompt "Mr. Darcy" --prompt "" --out smollm2-compare.md 2> smollm2-compare.log
  mkdir -p "$dest"
  cp "$run"/{eval.json,eval.md,eval.png,training.png,report.md,train_summary.json,run_config.json} "$dest/"
  {
    echo "# Before and after: SmolLM2-135M-Instruct fine-tuned on Jane Austen"
    echo
    echo "Made by \`bash sample_outputs/make_samples.sh WORK smollm2\`: SmolLM2-135M-Instruct (a pretrained"
    echo "135M-parameter Llama-architecture model, ../shared/models/smollm2-135m-instruct written as a model folder"
    echo "by its \`to_hf.py\`) fine-tuned with \`train.py --qlora True --model smollm2-135m-instruct --data"
    echo "../shared/data/corpora/austen --max-steps 200 --max-input-length 128 --gradient-checkpointing False"
    echo "--seed 1\` (the text mode's defaults otherwise: QLoRA r 64 / alpha 16, rsLoRA, on all seven projections;"
    echo "200 steps of 8 x 128 tokens, 205K tokens, a screen: the defaults' three epochs are about 4 hours here),"
    echo "then \`qlora-ft compare\` below: the same prompts, seed and sampling settings for the base and the"
    echo "fine-tuned model. The evaluation (held-out perplexity, style classifier against Dickens, copying) is in"
    echo "austen-smollm2-135m-instruct/eval.md; the full report in austen-smollm2-135m-instruct/report.md."
    python - "$run/eval.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
ppl, judged = r["perplexity"], r["style"]["judged_target"]
print(f"Held-out perplexity {ppl['base']:.1f} -> {ppl['fine_tuned']:.1f} ({100 * ppl['reduction']:.0f}% lower); "
      f"generations judged Austen (against Dickens) {100 * judged['base']['share']:.0f}% -> "
      f"{100 * judged['fine_tuned']['share']:.0f}% of {judged['fine_tuned']['n']}.")
PY
    echo
    sed -e '1d' -e "s#$work/##g" -e "s#$smol#smollm2-135m-instruct#g" smollm2-compare.md
  } > "$out/austen-smollm2-135m-instruct.md"
  sed -i -e "s#$work/##g" -e "s#$smol#smollm2-135m-instruct#g" -e "s#$corpora#../shared/data/corpora#g" \
    -e "s#$root/##g" "$dest"/*.md "$dest"/*.json
  echo "wrote $out/austen-smollm2-135m-instruct.md and $dest/"
  # the instruction mode's defaults (2 epochs of the shared records), base vs tuned on the 100 held-out records
  (cd "$root" && python bench/quality.py --model "$smol" --mode instructions --seeds 1 --candidates defaults \
    --flags "--gradient-checkpointing False" --label smollm2 --work-dir "$work/quality-smollm2-instructions")
  dest="$out/instructions-smollm2-135m-instruct"
  mkdir -p "$dest"
  cp "$work/quality-smollm2-instructions/defaults-seed1"/{eval.json,eval.md,training.png,train_summary.json,run_config.json} "$dest/"
  sed -i -e "s#$work/##g" -e "s#$smol#smollm2-135m-instruct#g" -e "s#$instructions#../shared/data/instructions/instruction-data.json#g" \
    -e "s#$root/##g" "$dest"/*.md "$dest"/*.json
  echo "wrote $dest/"
}

if [[ $part == instructions ]]; then instruction_sample; exit 0; fi
if [[ $part == smollm2 ]]; then smollm2_sample; exit 0; fi
[[ -f austen_dataset.pkl ]] || python -m qlora_ft prepare "$corpora/austen" --out austen_dataset.pkl
common=(--model "$model" --data austen_dataset.pkl --sample-every 100 --log-every 20)
train() {  # train RUN FLAGS...: one run on one thread, skipped when RUN finished before
  [[ -f $1/train_summary.json ]] ||
    OMP_NUM_THREADS=1 python "$root/train.py" "${@:2}" "${common[@]}" --output-dir "$1" --check-dir "$1_ckpt" 2> "$1.log"
}
train qlora_run --qlora True & qlora=$!
train lora_run --qlora False --lora True & lora=$!
wait $qlora
wait $lora
python -m qlora_ft eval --model_path qlora_run --contrast "$corpora/dickens" --lora-reference lora_run 2> eval.log
python -m qlora_ft compare --model_path qlora_run --prompt "It is a truth universally acknowledged" \
  --prompt "She was" --prompt "Mr. Darcy" --prompt "" --out compare.md 2>> eval.log

dest="$out/austen-mini-gpt2-fiction"
mkdir -p "$dest"
cp qlora_run/{eval.json,eval.md,eval.png,training.png,report.md,train_summary.json,run_config.json} "$dest/"
cp lora_run/train_summary.json "$dest/lora_reference_train_summary.json"
{
  echo "# Before and after: mini-gpt2-fiction fine-tuned on Jane Austen"
  echo
  echo "Made by \`bash sample_outputs/make_samples.sh\`: ../shared/models/mini-gpt2-fiction fine-tuned with"
  echo "\`train.py --qlora True --model ../shared/models/mini-gpt2-fiction --data austen_dataset.pkl --sample-every 100"
  echo "--log-every 20\` (the text mode's defaults: three epochs over the Austen paragraphs in"
  echo "../shared/data/corpora/austen, 90/10 split), then \`qlora-ft compare\` below: the same prompts, seed and"
  echo "sampling settings for the base and the fine-tuned model. The evaluation (perplexity, style classifier,"
  echo "merge parity, copying) is in austen-mini-gpt2-fiction/eval.md; the full report in"
  echo "austen-mini-gpt2-fiction/report.md."
  echo
  sed -e '1d' -e "s#$work/##g" -e "s#$model#../shared/models/mini-gpt2-fiction#g" compare.md
} > "$out/austen-mini-gpt2-fiction.md"
sed -i -e "s#$work/##g" -e "s#$model#../shared/models/mini-gpt2-fiction#g" -e "s#$corpora#../shared/data/corpora#g" \
  "$dest"/*.md "$dest"/*.json
echo "wrote $out/austen-mini-gpt2-fiction.md and $dest/ (work dir $work)"
if [[ $part == all ]]; then instruction_sample; smollm2_sample; fi
