#!/usr/bin/env bash
# Makes sample_outputs/austen-mini-gpt2-fiction.md: base vs fine-tuned generations for the same prompts and
# seeds, from ../shared/models/mini-gpt2-fiction fine-tuned with QLoRA on the five Austen novels.
# Run from the repository root: bash sample_outputs/make_samples.sh   (about 20 minutes on 2 CPU cores)
set -euo pipefail
root=$(pwd)
model=$(realpath ../shared/models/mini-gpt2-fiction)
work=$(mktemp -d)
out="$root/sample_outputs/austen-mini-gpt2-fiction.md"
cd "$work"
python "$root/train.py" --help >/dev/null
python -m qlora_ft prepare "$(realpath "$root/../shared/data/corpora/austen")" --out austen_dataset.pkl
train=(python "$root/train.py" --qlora True --model "$model" --data austen_dataset.pkl --epochs 1 --lr 1e-3
       --warmup-steps 20 --sample-every 100 --log-every 20)
"${train[@]}" 2> train.log
prompts=("It is a truth universally acknowledged" "She was" "Mr. Darcy" "")
gen() {  # $1: model path
  args=()
  for p in "${prompts[@]}"; do args+=(--prompt "$p"); done
  python "$root/inference.py" --model_path "$1" "${args[@]}" --n_return_seqs 2 --max_length 60 --seed 7
}
{
  echo "# Before and after: mini-gpt2-fiction fine-tuned on Jane Austen"
  echo
  shown="${train[*]/$model/../shared/models/mini-gpt2-fiction}"
  echo "Made by \`bash sample_outputs/make_samples.sh\`: \`${shown/$root\//}\`"
  echo "(one epoch over the Austen paragraphs in ../shared/data/corpora/austen, 90/10 split), then"
  echo "\`inference.py --n_return_seqs 2 --max_length 60 --seed 7\` with the same prompts on the base model and"
  echo "on the fine-tuned adapter (merged into the float32 base). The base model was pretrained on Dickens,"
  echo "Eliot, Brontë and Wilde only. The empty prompt starts from <|endoftext|> alone."
  echo
  echo "Training summary (train_summary.json):"
  echo
  echo '```json'
  cat GPT2_fine_tuned_Austen/train_summary.json
  echo '```'
  echo
  echo "## Base model (../shared/models/mini-gpt2-fiction)"
  echo
  echo '```'
  gen "$model"
  echo '```'
  echo
  echo "## Fine-tuned (GPT2_fine_tuned_Austen)"
  echo
  echo '```'
  gen GPT2_fine_tuned_Austen
  echo '```'
} > "$out" 2>> train.log
echo "wrote $out (work dir $work)"
