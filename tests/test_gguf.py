"""`qlora-ft export --format gguf`: the file holds llama.cpp's GPT-2 layout, and readers the package did not
write (transformers' GGUF loader, llama.cpp through llama-cpp-python when installed) compute the merged
model's logits and prompt with the ids the package prompts with: the leading `<|endoftext|>` comes from
`add_bos_token` in a text run's file and from the chat template in an instruction run's, never from both."""

import pickle
import sys

import pytest
import torch
from test_instruct import instruction_rows, write

from conftest import build_model_dir, make_paragraphs, shared_or_skip
from qlora_ft.cli import main, train_main
from qlora_ft.data.encode import encode, exported_chat_template, render_chat
from qlora_ft.data.records import Chat
from qlora_ft.generate import encode_prompt, instruction_prompt
from qlora_ft.templates import DEFAULT_CHAT_TEMPLATE, TEMPLATES, Template

PROMPTS = ["She was", "  Two  spaces, 1234 digits\n\nand café's \u201cquotes\u201d <|endoftext|> end", ""]
NEAR_TIE = 0.1  # logits: a greedy step whose top-2 gap is below this may go either way between two readers


def gpt2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_or_skip("data", "gpt2-tokenizer"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random GPT-2 with GPT-2's own tokenizer (vocabulary, merges, pre-tokenizer split)."""
    pytest.importorskip("gguf", reason="the [gguf] extra is not installed")
    return build_model_dir(tmp_path_factory.mktemp("gpt2-vocab"), tokenizer=gpt2_tokenizer())


def export(src, out, *flags) -> None:
    main(["export", "--model_path", str(src), "--out", str(out), "--format", "gguf", *flags])


def from_gguf(path, config_dir):
    """(model, tokenizer) as transformers reads the file; `config=` because its GGUF config mapping leaves
    GPT-2 at 1,024 positions."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(config_dir)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def max_logit_gap(model, reference, ids) -> float:
    with torch.no_grad():
        return (model(ids).logits - reference(ids).logits).abs().max().item()


def held_out_ids(tokenizer) -> torch.Tensor:
    text = " ".join(make_paragraphs(30, seed=7))
    return torch.tensor([[tokenizer.eos_token_id, *tokenizer(text)["input_ids"][:120]]])  # (1, 121)


def llama_or_skip(path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (docs/gguf.md)")
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, seed=0)


# ----------------------------------------------------------------------------------------------------------
# Refusals: one line, exit 2, nothing written


def one_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qlora-ft: error: "), err
    return lines[0]


def neox_dir(tmp_path):
    from transformers import GPTNeoXConfig

    config = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    config.save_pretrained(tmp_path / "neox")
    return tmp_path / "neox"


def test_an_architecture_llama_cpps_gpt2_and_llama_graphs_do_not_compute_is_refused(tmp_path, capsys):
    pytest.importorskip("gguf", reason="the [gguf] extra is not installed")
    line = one_line(capsys, ["export", "--model_path", str(neox_dir(tmp_path)), "--out", str(tmp_path / "l.gguf"),
                             "--format", "gguf"])  # fmt: skip
    assert "GPT-2" in line and "Llama" in line and "'gpt_neox'" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neox"]


def test_bad_exports_are_refused_in_one_line_and_write_nothing(tmp_path, capsys, monkeypatch):
    export_argv = ["export", "--model_path", str(neox_dir(tmp_path)), "--out"]  # the output is checked first
    monkeypatch.setitem(sys.modules, "gguf", None)  # as without the [gguf] extra: import gguf fails
    line = one_line(capsys, [*export_argv, str(tmp_path / "l.gguf"), "--format", "gguf"])
    assert "pip install 'qlora-ft[gguf]'" in line
    line = one_line(capsys, [*export_argv, str(tmp_path / "m.gguf"), "--format", "gguf", "--gguf-type", "q5_k"])
    assert "q5_k" in line and "q4_0" in line

    existing = tmp_path / "old.gguf"
    existing.write_bytes(b"keep me")
    assert "--overwrite" in one_line(capsys, [*export_argv, str(existing), "--format", "gguf"])
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert "--overwrite" in one_line(capsys, [*export_argv, str(folder)])  # the safetensors export too
    assert "--format gguf" in one_line(capsys, [*export_argv, str(tmp_path / "new.gguf")])
    assert "--format gguf" in one_line(capsys, [*export_argv, str(tmp_path / "new"), "--gguf-type", "q8_0"])
    assert existing.read_bytes() == b"keep me" and sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "neox", "old.gguf"]


def test_an_exported_chat_template_prompts_with_trainings_ids():
    """A chat run's template (GPT-2 has none: the default) gets training's leading <eos>: the exported
    template's prompt for a conversation is the ids training saw before the last reply."""
    tokenizer = gpt2_tokenizer()
    template = Template("chat", "{instruction}{input}", "{instruction}", chat_template=DEFAULT_CHAT_TEMPLATE)
    chat = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "And then?"), ("assistant", "-")]
    trained, _ = encode(tokenizer, render_chat(Chat(tuple(chat)), tokenizer, DEFAULT_CHAT_TEMPLATE))
    messages = [{"role": r, "content": c} for r, c in chat[:-1]]
    exported = exported_chat_template(template, tokenizer)
    ids = tokenizer.apply_chat_template(messages, chat_template=exported, add_generation_prompt=True, return_dict=False)
    assert ids[0] == tokenizer.eos_token_id and trained[: len(ids)] == ids
    assert exported_chat_template(TEMPLATES["plain"], tokenizer).startswith("{{ eos_token }}")


# ----------------------------------------------------------------------------------------------------------
# The file, read back


@pytest.fixture(scope="module")
def small(tiny_model_dir, tmp_path_factory):
    """The tiny GPT-2 of conftest (a 400-token byte-level BPE: quick to write and read) in each type."""
    pytest.importorskip("gguf", reason="the [gguf] extra is not installed")
    root = tmp_path_factory.mktemp("gguf")
    for kind in ("f16", "q8_0", "q4_0"):
        export(tiny_model_dir, root / f"{kind}.gguf", "--gguf-type", kind)
    return tiny_model_dir, root


def fields(path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    values = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    values["tensors"] = {t.name: (t.tensor_type.name, tuple(t.shape)) for t in reader.tensors}
    values["data"] = {t.name: t.data for t in reader.tensors}
    return values


def test_conv1d_weights_are_written_as_llama_cpps_out_by_in_matrices(tiny_model_dir, tmp_path):
    """GPT-2's Conv1D layers hold (in, out) weights, llama.cpp reads (out, in): each is written transposed,
    the embeddings as they are. (The quick check of the layout; the slow tests run the file.)"""
    pytest.importorskip("gguf", reason="the [gguf] extra is not installed")
    from transformers import AutoModelForCausalLM

    export(tiny_model_dir, tmp_path / "f16.gguf", "--gguf-type", "f16")
    data = fields(tmp_path / "f16.gguf")["data"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for b, block in enumerate(model.transformer.h):
        layers = {"attn_qkv": block.attn.c_attn, "attn_output": block.attn.c_proj, "ffn_up": block.mlp.c_fc,
                  "ffn_down": block.mlp.c_proj}  # fmt: skip
        for name, layer in layers.items():
            written = torch.from_numpy(data[f"blk.{b}.{name}.weight"].astype("float32"))
            torch.testing.assert_close(written, layer.weight.detach().T, atol=1e-3, rtol=1e-3, msg=name)
    embedding = torch.from_numpy(data["token_embd.weight"].astype("float32"))
    torch.testing.assert_close(embedding, model.transformer.wte.weight.detach(), atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_the_file_holds_llama_cpps_gpt2_layout_and_transformers_reads_it(small):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, root = small
    meta = fields(root / "f16.gguf")
    assert meta["general.architecture"] == "gpt2"
    assert {k: meta[f"gpt2.{k}"] for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                                          "attention.head_count")} == {
        "context_length": 128, "embedding_length": 64, "block_count": 2, "feed_forward_length": 256,
        "attention.head_count": 2}  # fmt: skip
    assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    tensors = meta["tensors"]
    per_block = ["attn_norm.weight", "attn_norm.bias", "attn_qkv.weight", "attn_qkv.bias", "attn_output.weight",
                 "attn_output.bias", "ffn_norm.weight", "ffn_norm.bias", "ffn_up.weight", "ffn_up.bias",
                 "ffn_down.weight", "ffn_down.bias"]  # fmt: skip
    assert set(tensors) == {"token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias",
                            *(f"blk.{b}.{n}" for b in range(2) for n in per_block)}  # fmt: skip  # tied: no output
    assert tensors["blk.0.attn_qkv.weight"] == ("F16", (64, 192))  # GGUF lists (in, out): a (192, 64) matrix
    assert tensors["position_embd.weight"][0] == "F32" and tensors["token_embd.weight"][0] == "F16"
    assert all(kind == "F32" for kind, shape in tensors.values() if len(shape) == 1)
    reference = AutoModelForCausalLM.from_pretrained(base).eval()
    c_attn = reference.transformer.h[0].attn.c_attn.weight  # Conv1D: (in, out)
    qkv = torch.from_numpy(meta["data"]["blk.0.attn_qkv.weight"].astype("float32"))
    torch.testing.assert_close(qkv, c_attn.T, atol=1e-3, rtol=1e-3)
    for name, kind in (("q8_0", "Q8_0"), ("q4_0", "Q4_0")):
        quantized = fields(root / f"{name}.gguf")["tensors"]
        assert quantized["blk.1.ffn_down.weight"][0] == kind and quantized["token_embd.weight"][0] == "Q8_0"

    tokenizer = AutoTokenizer.from_pretrained(base)
    eos = tokenizer.eos_token_id
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert meta["tokenizer.ggml.tokens"] == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    types = meta["tokenizer.ggml.token_type"]
    assert types[eos] == 3 and {t for i, t in enumerate(types) if i != eos} == {1}  # CONTROL; the rest NORMAL
    assert meta["tokenizer.ggml.bos_token_id"] == meta["tokenizer.ggml.eos_token_id"] == eos
    assert meta["tokenizer.ggml.add_bos_token"] is True and "tokenizer.chat_template" not in meta  # a text model

    ids = held_out_ids(tokenizer)
    for kind, limit in {"f16": 1e-3, "q8_0": 0.01, "q4_0": 0.1}.items():  # random weights: small logits
        model, gguf_tokenizer = from_gguf(root / f"{kind}.gguf", base)
        assert max_logit_gap(model, reference, ids) <= limit, kind
    for prompt in PROMPTS:  # add_bos_token gives the <|endoftext|> the package puts first; special text stays text
        assert gguf_tokenizer(prompt)["input_ids"] == encode_prompt(tokenizer, prompt, torch.device("cpu"))[0].tolist()


# ----------------------------------------------------------------------------------------------------------
# From training runs: a QLoRA style run and an instruction run


QUIET = ["--sample-every", "0", "--save-interval", "0"]


def style_run(base, root):
    data = root / "data.pkl"
    data.write_bytes(pickle.dumps([{"sentence": p} for p in make_paragraphs(40)]))
    train_main(["--data", str(data), "--model", str(base), "--batch-size", "4", "--max-input-length", "32",
                "--rank-lora", "4", "--lr", "2e-2", "--warmup-steps", "1", "--max-steps", "2", *QUIET,
                "--check-dir", str(root / "ckpt"), "--output-dir", str(root / "run")])  # fmt: skip
    return root / "run"


def instruction_run(base, root):
    data = write(root / "d.json", instruction_rows(16))
    train_main(["--data", str(data), "--model", str(base), "--batch-size", "4", "--max-input-length", "96",
                "--template", "plain", "--rank-lora", "4", "--max-steps", "2", *QUIET,
                "--check-dir", str(root / "ckpt-i"), "--output-dir", str(root / "run-i")])  # fmt: skip
    return root / "run-i"


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """A QLoRA style run and a QLoRA instruction run on the GPT-2-vocabulary base, each exported in f16."""
    root = tmp_path_factory.mktemp("runs")
    out = []
    for run in (style_run(base, root), instruction_run(base, root)):
        export(run, root / f"{run.name}.gguf")
        out.append((run, root / f"{run.name}.gguf"))
    return out


@pytest.mark.slow
def test_runs_export_to_files_that_transformers_and_llama_cpp_prompt_as_the_package(base, runs):
    from qlora_ft.data.prepare import read_template
    from qlora_ft.model import load_for_inference

    cpu = torch.device("cpu")
    plain, _ = load_for_inference(str(base), None, False, cpu)
    for run, out in runs:
        merged, tokenizer = load_for_inference(str(run), None, False, cpu)  # merged as the safetensors export
        model, gguf_tokenizer = from_gguf(out, base)
        ids = held_out_ids(tokenizer)
        assert max_logit_gap(model, merged, ids) <= 0.05
        assert max_logit_gap(model, plain, ids) > 1e-3  # the adapter is in the file

        template = read_template(run)
        meta = fields(out)
        assert meta["tokenizer.ggml.add_bos_token"] is (template is None)  # the leading <eos>: from one place
        if template is None:  # GPT-2's own vocabulary, merges and pre-tokenizer split
            assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.ggml.tokens"][1212] == "This"
            assert len(meta["tokenizer.ggml.merges"]) == 50000 and meta["tokenizer.ggml.merges"][0] == "Ġ t"
            assert meta["tokenizer.ggml.token_type"][50256] == 3
        for prompt in PROMPTS[:2] if template is None else ["Say hi", "Name   two\n\ncolours, café 12345."]:
            if template is None:
                messages, got = None, gguf_tokenizer(prompt)["input_ids"]
                package = encode_prompt(tokenizer, prompt, cpu)[0].tolist()
            else:  # the package prompts an instruction with the ids training gave it
                messages = [{"role": "user", "content": prompt}]
                got = gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
                package, _ = instruction_prompt(template, tokenizer, prompt)
                assert meta["tokenizer.chat_template"] == exported_chat_template(template, tokenizer)
            assert package[0] == tokenizer.eos_token_id
            assert got == package, prompt
            llama = llama_prompt_ids(out, prompt, messages)
            assert llama is None or llama == package, prompt


def llama_prompt_ids(path, prompt: str, messages) -> list[int] | None:
    """The prompt's ids as llama.cpp makes them: a raw prompt tokenized with the file's special-token settings,
    or the conversation through llama-cpp-python's chat formatter (the file's template). None without it."""
    try:
        from llama_cpp import llama_chat_format
    except ImportError:
        return None
    llm = llama_or_skip(path)
    if messages is None:
        return llm.tokenize(prompt.encode(), add_bos=True, special=True)  # special text parsed, as llama-cli does
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    formatter = llama_chat_format.Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos, eos)
    result = formatter(messages=messages)
    assert llm.tokenize(b"Hi", add_bos=True, special=False)[0] != llm.token_eos()  # no BOS of its own: the template's
    return llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)


@pytest.mark.slow
def test_llama_cpp_continues_as_transformers(small, tmp_path):
    """Greedy continuations from an f16 file of the shared mini model (a trained GPT-2: clear argmaxes) equal
    transformers', token for token, except from a near-tie on (top-2 logit gap under NEAR_TIE in transformers:
    rounding may pick either); every type of the tiny model evaluates to the logits transformers reads."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (docs/gguf.md)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mini = shared_or_skip("models", "mini-gpt2-fiction")
    export(mini, tmp_path / "mini.gguf")
    reference = AutoModelForCausalLM.from_pretrained(mini).eval()
    tokenizer = AutoTokenizer.from_pretrained(mini)
    llm = llama_or_skip(tmp_path / "mini.gguf")
    for prompt in ["She was", "The morning", ""]:
        ids = encode_prompt(tokenizer, prompt, torch.device("cpu"))
        with torch.no_grad():
            hf = reference.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        hf_new = hf[0, ids.shape[1] :].tolist()
        llm.reset()
        llm.eval(ids[0].tolist())
        llama_new = []
        for _ in range(len(hf_new)):  # greedy on llama.cpp's own logits
            llama_new.append(int(llm.scores[llm.n_tokens - 1].argmax()))
            llm.eval(llama_new[-1:])
        at = next((i for i, (a, b) in enumerate(zip(hf_new, llama_new, strict=True)) if a != b), None)
        if at is not None:
            with torch.no_grad():
                logits = reference(torch.tensor([ids[0].tolist() + hf_new[:at]])).logits[0, -1]
            top2 = logits.topk(2).values
            assert (top2[0] - top2[1]).item() < NEAR_TIE, (prompt, at, hf_new, llama_new)

    base, root = small
    held_out = held_out_ids(AutoTokenizer.from_pretrained(base))[0].tolist()
    for kind in ("f16", "q8_0", "q4_0"):
        model, _ = from_gguf(root / f"{kind}.gguf", base)
        with torch.no_grad():
            expected = model(torch.tensor([held_out])).logits[0].numpy()
        llm = llama_or_skip(root / f"{kind}.gguf")
        llm.eval(held_out)
        assert abs(llm.scores[: len(held_out)] - expected).max() <= 0.01, kind
