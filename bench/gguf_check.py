"""GGUF export check: files written from a QLoRA style run, instruction run and chat run, read by transformers and
by llama.cpp (llama-cpp-python), against the merged model they came from. Thresholds fixed before measuring:

- f16 in transformers: max |delta logit| against the merged model <= 0.05 over the held-out tokens;
- held-out perplexity: q8_0 within 1% of f16's, q4_0 within 10%, in transformers and in llama.cpp;
- the prompt's token ids from transformers' and llama.cpp's readings of the file equal the package's;
- greedy continuations of 32 tokens from five prompts, llama.cpp on the f16 file vs transformers on the f16 file,
  equal token for token except from a near-tie on: at the first position where they differ, transformers' top-2
  logits there are less than NEAR_TIE apart (then rounding may pick either, and the texts part ways after it).

Beside each q8_0 and q4_0 export, llama.cpp's own quantizer (`llama_model_quantize`, its default mix for that
type) writes the f16 export as that type: the reference a quantised export's perplexity is read against.

    python bench/gguf_check.py --model ../shared/models/mini-gpt2-fiction --max-steps 30
    python bench/gguf_check.py --model /tmp/smollm2-hf --max-steps 5   # SmolLM2 (to_hf.py's folder): Llama

Style run: `--data` Pride and Prejudice, held out: the first paragraphs of Emma (never trained on). Instruction
run: the instruction records but the last 50, which are its `--validation-data` and its held-out text. Chat
run: the same records as one-turn conversations (`{"messages": [...]}`, every other one opened by a system
prompt), through the tokenizer's chat template.
Writes bench/results/gguf-check.json and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_ft.cli import main as cli_main  # noqa: E402
from qlora_ft.cli import train_main  # noqa: E402
from qlora_ft.data.encode import encode, leading_token_id, render  # noqa: E402
from qlora_ft.data.prepare import read_template  # noqa: E402
from qlora_ft.data.records import Chat, Instruction, as_chat, iter_paragraphs  # noqa: E402
from qlora_ft.data.sources import resolve  # noqa: E402
from qlora_ft.generate import encode_prompt, instruction_prompt  # noqa: E402
from qlora_ft.model import load_for_inference  # noqa: E402

SHARED = ROOT.parent / "shared"
TYPES = ("f16", "q8_0", "q4_0")
F16_MAX_DLOGIT, Q8_PPL, Q4_PPL, NEAR_TIE = 0.05, 0.01, 0.10, 0.1
STYLE_PROMPTS = ["She was", "The morning", "It is a truth universally acknowledged", "Mr. Darcy", ""]
INSTRUCTIONS = ["Name a colour.", "What is the capital of France?", "Rewrite: the cat sat on the mat.",
                "Give a synonym for 'happy'.", "Translate 'thank you' into Spanish."]  # fmt: skip
CPU = torch.device("cpu")
RECORDS = SHARED / "data" / "instructions" / "instruction-data.json"


# ----------------------------------------------------------------------------------------------------------
# Runs, exports and held-out ids


def train(argv: list[str], root: Path, name: str) -> Path:
    train_main([*argv, "--sample-every", "0", "--save-interval", "0", "--eval-max-tokens", "2048",
                "--check-dir", str(root / f"ckpt-{name}"), "--output-dir", str(root / name)])  # fmt: skip
    return root / name


def style_run(args, root: Path) -> tuple[Path, list[list[int]]]:
    data = SHARED / "data" / "corpora" / "austen"
    run = train(["--model", args.model, "--data", str(data / "pride_and_prejudice.txt"), "--max-steps",
                 str(args.max_steps), "--batch-size", "8", "--max-input-length", "128"], root, "style")  # fmt: skip
    _, tokenizer = load_for_inference(str(run), None, False, CPU)
    paragraphs = iter_paragraphs(resolve(str(data / "emma.txt")))
    lead = leading_token_id(tokenizer)
    return run, held_out(
        tokenizer, ([lead, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p in paragraphs), args
    )


def instruction_run(args, root: Path) -> tuple[Path, list[list[int]]]:
    records = json.loads(RECORDS.read_text())
    (root / "train.json").write_text(json.dumps(records[:-50]))
    (root / "val.json").write_text(json.dumps(records[-50:]))
    run = train(["--model", args.model, "--data", str(root / "train.json"), "--validation-data", str(root / "val.json"),
                 "--max-steps", str(args.max_steps), "--batch-size", "8", "--max-input-length", "256"],
                root, "instruction")  # fmt: skip
    _, tokenizer = load_for_inference(str(run), None, False, CPU)
    template = read_template(run)
    rows = (Instruction(r["instruction"], r["output"], r["input"]) for r in records[-50:])
    return run, held_out(tokenizer, (encode(tokenizer, render(r, template, tokenizer))[0] for r in rows), args)


def chat_run(args, root: Path) -> tuple[Path, list[list[int]]]:
    chats = [conversation(r, i) for i, r in enumerate(json.loads(RECORDS.read_text()))]
    (root / "chat-train.json").write_text(json.dumps(chats[:-50]))
    (root / "chat-val.json").write_text(json.dumps(chats[-50:]))
    run = train(["--model", args.model, "--data", str(root / "chat-train.json"), "--validation-data",
                 str(root / "chat-val.json"), "--max-steps", str(args.max_steps), "--batch-size", "8",
                 "--max-input-length", "256"], root, "chat")  # fmt: skip
    _, tokenizer = load_for_inference(str(run), None, False, CPU)
    template = read_template(run)
    rows = (Chat(tuple((m["role"], m["content"]) for m in c["messages"])) for c in chats[-50:])
    return run, held_out(tokenizer, (encode(tokenizer, render(r, template, tokenizer))[0] for r in rows), args)


def conversation(record: dict, i: int) -> dict:
    """An instruction record as a one-turn conversation, every other one opened by a system prompt."""
    chat = as_chat(Instruction(record["instruction"], record["output"], record["input"]))
    system = [("system", "You are a helpful assistant.")] if i % 2 else []
    return {"messages": [{"role": role, "content": content} for role, content in [*system, *chat.messages]]}


def held_out(tokenizer, sequences, args) -> list[list[int]]:
    """Sequences (each starting with training's leading token, at most 256 tokens) until `--tokens` in all."""
    out, total = [], 0
    for ids in sequences:
        if total >= args.tokens:
            break
        out.append(ids[:256])
        total += len(out[-1])
    return out


def export_all(run: Path, root: Path) -> dict[str, Path]:
    """The run exported in every type, and llama.cpp's own quantisation of the f16 export (`llama-<type>`)."""
    files = {}
    for kind in TYPES:
        files[kind] = root / f"{run.name}-{kind}.gguf"
        start = time.perf_counter()
        cli_main(["export", "--model_path", str(run), "--out", str(files[kind]), "--format", "gguf",
                  "--gguf-type", kind, "--overwrite"])  # fmt: skip
        print(f"{files[kind].name}: {files[kind].stat().st_size / 1e6:.1f} MB in {time.perf_counter() - start:.0f} s")
    for kind in TYPES[1:]:
        files[f"llama-{kind}"] = llama_quantize(files["f16"], root / f"{run.name}-llama-{kind}.gguf", kind)
    return files


def llama_quantize(source: Path, out: Path, kind: str) -> Path:
    """`source` written as `kind` by llama.cpp's quantizer, with its default choice of per-tensor types."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not quantise {source}")
    return out


# ----------------------------------------------------------------------------------------------------------
# Readers: one interface, `logits(ids) -> (T, V)` numpy


class HF:
    def __init__(self, model):
        self.model = model.eval()

    def logits(self, ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.tensor([ids])).logits[0].float().numpy()


class Llama:
    def __init__(self, path: Path, n_ctx: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)])


def hf_from_gguf(path: Path, config_dir: str):
    """transformers' reading of the file; `config=` because its GGUF mapping leaves GPT-2 at 1,024 positions."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(config_dir)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config)
    return HF(model), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def perplexity(reader, sequences: list[list[int]]) -> float:
    """Token-weighted perplexity of every next token after each sequence's first."""
    nll, count = 0.0, 0
    for ids in sequences:
        logits = torch.from_numpy(reader.logits(ids)[:-1]).double()
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    return float(np.exp(nll / count))


def max_gap(reader, reference, sequences: list[list[int]]) -> float:
    return max(float(np.abs(reader.logits(ids) - reference.logits(ids)).max()) for ids in sequences)


def greedy(reader, ids: list[int], n: int) -> list[int]:
    new: list[int] = []
    for _ in range(n):  # the whole sequence each step: two readers, one rule, no cache differences
        new.append(int(reader.logits(ids + new)[-1].argmax()))
    return new


def compare_greedy(llama, hf, prompt_ids: list[int], n: int = 32) -> dict:
    """llama.cpp's and transformers' greedy tokens; where they first differ, transformers' top-2 gap there."""
    a, b = greedy(llama, prompt_ids, n), greedy(hf, prompt_ids, n)
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
    row = {"equal": at is None, "first_difference": at, "llama_cpp": a, "transformers": b}
    if at is not None:
        top2 = np.sort(hf.logits(prompt_ids + b[:at])[-1])[-2:]
        row["top2_gap"] = float(top2[1] - top2[0])
        row["near_tie"] = row["top2_gap"] < NEAR_TIE
    return row


# ----------------------------------------------------------------------------------------------------------
# Prompt ids and the measurement of one run


def prompt_ids(run: Path, tokenizer, gguf_tokenizer, llama, text: str) -> dict[str, list[int]]:
    """The prompt's ids as the package, transformers' reading of the file and llama.cpp make them: a raw prompt
    for a style run; for an instruction run, the instruction through the file's chat template (transformers'
    `apply_chat_template`, llama-cpp-python's chat formatter)."""
    from llama_cpp import llama_chat_format

    template = read_template(run)
    if template is None:
        return {"package": encode_prompt(tokenizer, text, CPU)[0].tolist(),
                "transformers": gguf_tokenizer(text)["input_ids"],
                "llama_cpp": llama.llm.tokenize(text.encode(), add_bos=True, special=True)}  # fmt: skip
    messages = [{"role": "user", "content": text}]
    lead = tokenizer.convert_ids_to_tokens(leading_token_id(tokenizer))  # the file's BOS
    chat = llama_chat_format.Jinja2ChatFormatter(llama.llm.metadata["tokenizer.chat_template"], tokenizer.eos_token,
                                                 lead)(messages=messages)  # fmt: skip
    return {
        "package": instruction_prompt(template, tokenizer, text)[0],
        "transformers": gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False),
        "llama_cpp": llama.llm.tokenize(chat.prompt.encode(), add_bos=not chat.added_special, special=True),
    }


def measure(run: Path, files: dict[str, Path], sequences: list[list[int]], prompts: list[str], base: str) -> dict:
    merged, tokenizer = load_for_inference(str(run), None, False, CPU)
    merged = HF(merged)
    plain = HF(load_for_inference(base, None, False, CPU)[0])
    config = merged.model.config
    n_ctx = min(getattr(config, "n_positions", None) or config.max_position_embeddings, 2048)
    hf, llama, hf_tokenizer = {}, {}, None
    for kind, path in files.items():
        if not kind.startswith("llama-"):
            hf[kind], tokenizer_of_file = hf_from_gguf(path, base)
            hf_tokenizer = hf_tokenizer or tokenizer_of_file
        llama[kind] = Llama(path, n_ctx)
    result = {
        "held_out": {"sequences": len(sequences), "tokens": sum(map(len, sequences))},
        "max_dlogit": {
            "transformers_f16_vs_merged": max_gap(hf["f16"], merged, sequences),
            "llama_cpp_f16_vs_merged": max_gap(llama["f16"], merged, sequences),
            "merged_vs_base": max_gap(merged, plain, sequences),
        },  # fmt: skip
        "perplexity": {"merged": perplexity(merged, sequences), "base": perplexity(plain, sequences)},
        "file_mb": {kind: path.stat().st_size / 1e6 for kind, path in files.items()},
    }
    for kind in TYPES:
        result["perplexity"][f"transformers_{kind}"] = perplexity(hf[kind], sequences)
        result["perplexity"][f"llama_cpp_{kind}"] = perplexity(llama[kind], sequences)
    for kind in TYPES[1:]:  # the reference: llama.cpp's own quantizer, read by llama.cpp
        ppl = result["perplexity"]
        ppl[f"llama_quantize_{kind}"] = perplexity(llama[f"llama-{kind}"], sequences)
        result.setdefault("vs_llama_quantize", {})[kind] = ppl[f"llama_cpp_{kind}"] / ppl[f"llama_quantize_{kind}"] - 1
    ids = {text: prompt_ids(run, tokenizer, hf_tokenizer, llama["f16"], text) for text in prompts}
    result["prompt_ids"] = {text: {**got, "equal": got["package"] == got["transformers"] == got["llama_cpp"]}
                            for text, got in ids.items()}  # fmt: skip
    result["greedy"] = {text: compare_greedy(llama["f16"], hf["f16"], got["package"]) for text, got in ids.items()}
    result["checks"] = checks(result)
    return result


def checks(result: dict) -> dict[str, bool]:
    ppl = result["perplexity"]
    greedy = result["greedy"].values()
    out = {"f16_max_dlogit": result["max_dlogit"]["transformers_f16_vs_merged"] <= F16_MAX_DLOGIT,
           "prompt_ids_equal": all(p["equal"] for p in result["prompt_ids"].values()),
           "greedy_equal_but_near_ties": all(g["equal"] or g["near_tie"] for g in greedy)}  # fmt: skip
    for reader in ("transformers", "llama_cpp"):
        f16 = ppl[f"{reader}_f16"]
        out[f"{reader}_q8_0_ppl_within_1pct"] = abs(ppl[f"{reader}_q8_0"] / f16 - 1) <= Q8_PPL
        out[f"{reader}_q4_0_ppl_within_10pct"] = abs(ppl[f"{reader}_q4_0"] / f16 - 1) <= Q4_PPL
    return out


def table(name: str, r: dict) -> str:
    ppl = r["perplexity"]
    lines = [f"{name}: {r['held_out']['tokens']} held-out tokens; max |dlogit| transformers f16 vs merged "
             f"{r['max_dlogit']['transformers_f16_vs_merged']:.4f}, llama.cpp f16 vs merged "
             f"{r['max_dlogit']['llama_cpp_f16_vs_merged']:.4f}",
             f"  perplexity: base {ppl['base']:.3f}, merged {ppl['merged']:.3f}"]  # fmt: skip
    for kind in TYPES:
        reference = f"  llama-quantize's own {ppl[f'llama_quantize_{kind}']:.3f}" if kind != "f16" else ""
        lines.append(f"  {kind:5} {r['file_mb'][kind]:5.1f} MB  transformers {ppl[f'transformers_{kind}']:.3f}  "
                     f"llama.cpp {ppl[f'llama_cpp_{kind}']:.3f}{reference}")  # fmt: skip
    equal = sum(g["equal"] for g in r["greedy"].values())
    ties = sum(not g["equal"] and g["near_tie"] for g in r["greedy"].values())
    lines.append(f"  greedy 32 tokens: {equal}/{len(r['greedy'])} equal, {ties} near-tie; checks: {r['checks']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "mini-gpt2-fiction"))
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens per run")
    parser.add_argument("--runs", nargs="+", choices=["style", "instruction", "chat"],
                        default=["style", "instruction", "chat"])  # fmt: skip
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gguf-check.json"))
    args = parser.parse_args()
    import llama_cpp
    import transformers

    results = {"command": "python bench/gguf_check.py " + " ".join(sys.argv[1:]), "device": "2-core CPU, no GPU",
               "versions": {"gguf": importlib.metadata.version("gguf"),
                            "llama_cpp_python": llama_cpp.__version__, "transformers": transformers.__version__},
               "thresholds": {"f16_max_dlogit": F16_MAX_DLOGIT, "q8_0_ppl": Q8_PPL, "q4_0_ppl": Q4_PPL,
                              "near_tie_top2_gap": NEAR_TIE}, "runs": {}}  # fmt: skip
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, make, prompts in (
            ("style", style_run, STYLE_PROMPTS),
            ("instruction", instruction_run, INSTRUCTIONS),
            ("chat", chat_run, INSTRUCTIONS),
        ):
            if name not in args.runs:
                continue
            run, sequences = make(args, root)
            results["runs"][name] = measure(run, export_all(run, root), sequences, prompts, args.model)
            print(table(name, results["runs"][name]), flush=True)
    results["seconds"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
