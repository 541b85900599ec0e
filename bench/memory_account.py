"""Where a QLoRA run's memory goes, part by part: measured in one process beside the arithmetic.

Loads the model as `train` does (4-bit NF4, LoRA at the text defaults: r 64 on the architecture's targets),
then measures: the RSS the libraries take once imported, what loading the 4-bit model adds, what LoRA and its
AdamW state add (after one optimizer step), and the activations one forward of a `--batch-size` x
`--max-length` batch keeps for backward, layer by layer: every tensor autograd saves is counted once
(by storage) through `torch.autograd.graph.saved_tensors_hooks`, attributed to the decoder layer running.

    python bench/memory_account.py --model /tmp/smollm2-hf-s --batch-size 8 --max-length 256

Prints a JSON line of the figures and the arithmetic (see docs/memory.md for the formulas).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MB = 1e6


def rss() -> float:
    return psutil.Process().memory_info().rss / MB


def saved_bytes_per_layer(body, layers, params: set[int], ids, positions) -> tuple[list[float], float]:
    """Bytes autograd keeps for backward in one forward of `body`: per decoder layer, and outside them."""
    import torch

    current, per_layer, seen = [None], [0.0] * len(layers), set()
    outside = [0.0]
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda _m, _a, i=i: current.__setitem__(0, i))
        layer.register_forward_hook(lambda *_: current.__setitem__(0, None))

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in params and storage.nbytes():
            seen.add(key)
            if current[0] is None:
                outside[0] += storage.nbytes()
            else:
                per_layer[current[0]] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = body(input_ids=ids, position_ids=positions).last_hidden_state
    out.sum().backward()
    return per_layer, outside[0]


def arithmetic(config, tokens: int, rank: int, lora_params: int, linear_4bit: int, embed: int) -> dict:
    """The figures by formula (float32 activations, CPU)."""
    d, inter = config.hidden_size, config.intermediate_size
    kv = d * config.num_key_value_heads // config.num_attention_heads
    heads, seq = config.num_attention_heads, None
    lora_inputs = 6 * d + inter  # q k v o gate up read the width; down reads the MLP width
    per_token = {  # floats kept per token per layer
        "norms (inputs and outputs)": 4 * d,
        "q, k, v, rotary (k, q before and after)": d + 2 * kv + d + 2 * kv,
        "attention output, o_proj input": d,
        "MLP gate, up, silu(gate), product": 4 * inter,
        "LoRA dropout outputs (one per target)": lora_inputs,
        "LoRA A outputs": 7 * rank,
    }
    per_token_bytes = sum(per_token.values()) * 4 + lora_inputs  # + the dropout masks, 1 byte each
    del heads, seq
    return {
        "4-bit linear weights (0.516 B each)": linear_4bit * 0.516 / MB,
        "embeddings (float32, tied)": embed * 4 / MB,
        "LoRA + grads + AdamW moments (16 B each)": lora_params * 16 / MB,
        "activations per layer": tokens * per_token_bytes / MB,
        "activations per layer, by part (MB)": {k: tokens * v * 4 / MB for k, v in per_token.items()},
        "loss chunk (1024 tokens x vocab, logits + gradient, float32)": 2 * 1024 * config.vocab_size * 4 / MB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    start = rss()
    import torch

    from qlora_ft.config import ModelArgs
    from qlora_ft.model import add_lora, count_parameters, keep_training_layout, load_base

    imported = rss()
    model = load_base(args.model, True, torch.float32, torch.device("cpu"))
    keep_training_layout(model)
    loaded = rss()
    model = add_lora(model, ModelArgs(model=args.model)).train()  # dropout on, as in training
    trainable, _ = count_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = args.batch_size * args.max_length
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.max_length))
    positions = torch.arange(args.max_length).expand(args.batch_size, -1)
    body = model.get_base_model().model
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    before_step = rss()
    per_layer, outside = saved_bytes_per_layer(body, body.layers, params, ids, positions)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    after_step = rss()
    four_bit = sum(p.quant_state.shape.numel() for p in model.parameters() if getattr(p, "quant_state", None))
    embed = model.get_input_embeddings().weight.numel()
    report = {
        "measured (MB)": {
            "process before imports": start,
            "libraries imported (torch, transformers, peft, bitsandbytes)": imported - start,
            "4-bit model loaded": loaded - imported,
            "LoRA + AdamW state + gradients (RSS after one step, less before)": after_step - before_step,
            "activations saved per layer (mean)": sum(per_layer) / len(per_layer) / MB,
            "activations saved, all layers": sum(per_layer) / MB,
            "activations saved outside the layers": outside / MB,
            "peak RSS of this process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
        },
        "arithmetic (MB)": arithmetic(model.config, tokens, 64, trainable, four_bit, embed),
        "layers": len(per_layer),
        "tokens": tokens,
        "trainable": trainable,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
