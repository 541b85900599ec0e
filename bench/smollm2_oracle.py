"""SmolLM2's f16 export against llama.cpp: the export's f16 tensors vs llama.cpp's own f16 re-quantisation of
the shipped file (f16 ulps apart), and the export read by llama.cpp and transformers vs the folder in float32.

    python ../shared/models/smollm2-135m-instruct/to_hf.py /tmp/smollm2-hf
    qlora-ft export --model_path /tmp/smollm2-hf --out /tmp/smollm2-f16.gguf --format gguf
    python bench/smollm2_oracle.py --folder /tmp/smollm2-hf --gguf /tmp/smollm2-f16.gguf

Needs llama-cpp-python (docs/gguf.md). Prints the figures docs/gguf.md quotes.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_gguf import fields  # noqa: E402

from qlora_ft.data.records import iter_paragraphs  # noqa: E402
from qlora_ft.data.sources import resolve  # noqa: E402
from qlora_ft.generate import encode_prompt  # noqa: E402

SHARED = ROOT.parent / "shared"
SHIPPED = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def ulps(ours: dict, theirs: dict) -> dict:
    """How many f16 values are 0, 1, ... ulps apart; the largest |difference| of the F32 tensors."""
    hist: dict = {"f32_max_abs": 0.0}
    for name, data in ours["data"].items():
        if data.dtype != np.float16:
            hist["f32_max_abs"] = max(hist["f32_max_abs"], float(np.abs(data - theirs["data"][name]).max()))
            continue
        apart = np.abs(data.view(np.int16).astype(np.int32) - theirs["data"][name].view(np.int16).astype(np.int32))
        for k, n in zip(*np.unique(apart, return_counts=True), strict=True):
            hist[int(k)] = hist.get(int(k), 0) + int(n)
    return hist


def main() -> None:
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", required=True)
    parser.add_argument("--gguf", required=True, type=Path)
    args = parser.parse_args()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_F16, True
    with tempfile.TemporaryDirectory() as tmp:
        requantised = Path(tmp) / "llama-f16.gguf"
        assert llama_cpp.llama_model_quantize(str(SHIPPED).encode(), str(requantised).encode(), params) == 0
        print("f16 ulps apart, export vs llama.cpp's re-quantisation:", ulps(fields(args.gguf), fields(requantised)))

    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model = AutoModelForCausalLM.from_pretrained(args.folder).eval()
    paragraphs = list(iter_paragraphs(resolve(str(SHARED / "data" / "corpora" / "austen" / "emma.txt"))))[20:40]
    ids = encode_prompt(tokenizer, " ".join(paragraphs), torch.device("cpu"))[0].tolist()[:256]
    llm = llama_cpp.Llama(model_path=str(args.gguf), n_ctx=512, logits_all=True, verbose=False)
    llama_ids = llm.tokenize(tokenizer.decode(ids[1:]).encode(), add_bos=True, special=True)
    print(f"prompt ids equal: {sum(a == b for a, b in zip(llama_ids, ids, strict=False))} of {len(ids)}")
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
        read = AutoModelForCausalLM.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name).eval()
        from_file = read(torch.tensor([ids])).logits[0].numpy()
    gap = np.abs(got - expected)
    print(f"llama.cpp f16 vs transformers: max {gap.max():.4f} mean {gap.mean():.4f}, argmax equal at "
          f"{int((got.argmax(-1) == expected.argmax(-1)).sum())} of {len(ids)}")  # fmt: skip
    print(f"transformers reading the file vs the folder: max {np.abs(from_file - expected).max():.4f}")
    with torch.no_grad():  # the same matrices rounded to f16 in torch, no file involved
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
        rounded = model(torch.tensor([ids])).logits[0].numpy()
    print(f"f16-rounded matrices in torch vs the folder: max {np.abs(rounded - expected).max():.4f}")


if __name__ == "__main__":
    main()
