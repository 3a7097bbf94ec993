"""`modelpress generate` as a user meets it: streamed text, a tokens/s line, speculative modes that give the
same greedy text, and bad input that fails in one line."""

import json
import shutil

import pytest
import torch
from conftest import save_tiny_llama

from modelpress.cli import main
from modelpress.nn import cpu_native


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


def run_cli(*args):
    return main([str(a) for a in args])


def test_generate_streams_text_and_reports_speed(tiny_llama_dir, tmp_path, capsys):
    report = tmp_path / "g.json"
    assert run_cli("generate", tiny_llama_dir, "--prompt", "hello", "--max-new-tokens", "12", "--device", "cpu",
                   "--json", report) == 0
    out, err = capsys.readouterr()
    data = json.loads(report.read_text())
    assert data["new_tokens"] == 12 and data["prompt_tokens"] == 5 and data["acceptance_rate"] is None
    assert out == data["text"] + "\n"
    assert "12 tokens in" in err and "tokens/s" in err


@pytest.mark.parametrize("extra", [["--self-speculative", "int4/g32"], ["--draft", "OTHER"], ["--kv-cache", "int8"],
                                   ["--draft", "OTHER", "--kv-cache", "int4", "--draft-tokens", "2"],
                                   ["--self-speculative", "int4/g32", "--kv-cache", "int8"]],
                         ids=["self", "draft", "int8-cache", "draft-int4-cache", "self-int8-cache"])
def test_greedy_text_is_the_same_in_every_mode(tiny_llama_dir, tmp_path, capsys, extra):
    other = save_tiny_llama(tmp_path / "other", seed=1)
    extra = [str(other) if e == "OTHER" else e for e in extra]
    base = ["generate", tiny_llama_dir, "--prompt", "the cat", "--max-new-tokens", "10", "--device", "cpu"]
    assert run_cli(*base, "--json", tmp_path / "plain.json") == 0
    assert run_cli(*base, *extra, "--json", tmp_path / "mode.json") == 0
    plain, mode = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "mode"))
    assert mode["tokens"] == plain["tokens"]
    assert mode["kv_cache"] == (extra[extra.index("--kv-cache") + 1] if "--kv-cache" in extra else "float")
    if "--draft" in extra or "--self-speculative" in extra:
        assert mode["acceptance_rate"] is not None and "draft acceptance" in (err := capsys.readouterr().err)
        # both drafts have the target's architecture: they read its cache, except on the eager path
        assert mode["shared_kv_cache"] == (mode["decode_path"] != "eager")
        assert ("the draft on the target KV cache" in err) == mode["shared_kv_cache"]


def test_several_prompts_decode_as_one_batch(tiny_llama_dir, tmp_path, capsys):
    """Each --prompt's text in the batch is the text it gets alone, and with a draft (greedy, so the same text)."""
    prompts = ["the cat", "a", "hello there"]
    alone = []
    for i, prompt in enumerate(prompts):
        assert run_cli("generate", tiny_llama_dir, "--prompt", prompt, "--max-new-tokens", "6", "--device", "cpu",
                       "--json", tmp_path / f"{i}.json") == 0
        alone.append(json.loads((tmp_path / f"{i}.json").read_text())["text"])
    capsys.readouterr()
    args = [a for p in prompts for a in ("--prompt", p)]
    assert run_cli("generate", tiny_llama_dir, *args, "--max-new-tokens", "6", "--device", "cpu",
                   "--json", tmp_path / "batch.json") == 0
    out, err = capsys.readouterr()
    data = json.loads((tmp_path / "batch.json").read_text())
    assert data["batched"] and data["texts"] == alone and data["new_tokens"] == 18
    assert out == "".join(f"### prompt {i}\n{text}\n" for i, text in enumerate(alone, 1))
    assert "3 prompts in 1 batch" in err
    # with a draft the prompts decode speculatively one after another, in one session: greedy, each the plain text
    assert run_cli("generate", tiny_llama_dir, *args, "--max-new-tokens", "6", "--self-speculative", "int8/channel",
                   "--device", "cpu", "--json", tmp_path / "spec.json") == 0
    out, err = capsys.readouterr()
    spec = json.loads((tmp_path / "spec.json").read_text())
    assert spec["texts"] == alone and spec["new_tokens"] == 18 and len(spec["runs"]) == 3
    assert out == "".join(f"### prompt {i}\n{text}\n" for i, text in enumerate(alone, 1))
    assert "3 prompts one after another" in err and "draft acceptance" in err


def test_a_prompts_file_decodes_in_batches_of_the_batch_size(tiny_llama_dir, tmp_path, capsys):
    prompts = ["the cat", "a", "hello there", "dogs", "xyz"]
    (tmp_path / "p.txt").write_text("\n".join(prompts[:3]) + "\n\n" + "\n".join(prompts[3:]) + "\n")
    assert run_cli("generate", tiny_llama_dir, *[a for p in prompts for a in ("--prompt", p)], "--max-new-tokens", "5",
                   "--device", "cpu", "--json", tmp_path / "one.json") == 0
    capsys.readouterr()
    assert run_cli("generate", tiny_llama_dir, "--prompts-file", tmp_path / "p.txt", "--batch-size", "2",
                   "--max-new-tokens", "5", "--device", "cpu", "--json", tmp_path / "file.json") == 0
    out, err = capsys.readouterr()
    one, file = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "file"))
    assert file["prompts"] == prompts and file["texts"] == one["texts"] and file["new_tokens"] == 25
    assert out.count("### prompt ") == 5 and "5 prompts in 3 batches" in err
    (tmp_path / "empty.txt").write_text("\n \n")
    for path, message in ((tmp_path / "empty.txt", "holds no prompt"), (tmp_path / "none.txt", "cannot read")):
        assert run_cli("generate", tiny_llama_dir, "--prompts-file", path, "--device", "cpu") == 2
        assert message in capsys.readouterr().err
    assert run_cli("generate", tiny_llama_dir, "--device", "cpu") == 2
    assert "give a prompt" in capsys.readouterr().err


def test_sampling_is_reproducible_with_a_seed(tiny_llama_dir, tmp_path):
    base = ["generate", tiny_llama_dir, "--prompt", "abc", "--max-new-tokens", "8", "--temperature", "1.0",
            "--top-p", "0.9", "--device", "cpu"]
    runs = []
    for seed, name in ((3, "a"), (3, "b"), (4, "c")):
        assert run_cli(*base, "--seed", seed, "--json", tmp_path / f"{name}.json") == 0
        runs.append(json.loads((tmp_path / f"{name}.json").read_text())["tokens"])
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("args, message", [
    (["--chat"], "tokenizer has no chat template"),
    (["--top-p", "1.5"], "top-p must be in (0, 1], got 1.5"),
    (["--temperature", "-1"], "temperature must be >= 0, got -1.0"),
    (["--self-speculative", "int7"], "unknown number format 'int7'"),
    (["--draft", "BIGVOCAB"], "draft model scores 400 tokens but the target scores 320"),
    (["--eager", "--compile"], "--compile compiles the static-cache decode step, which --eager turns off"),
])
def test_bad_generate_arguments_fail_in_one_line(tiny_llama_dir, tmp_path, capsys, args, message):
    if "BIGVOCAB" in args:
        args = ["--draft", str(save_tiny_llama(tmp_path / "big", vocab_size=400))]
    assert run_cli("generate", tiny_llama_dir, "--prompt", "hi", "--max-new-tokens", "3", "--device", "cpu", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor compiles C++ on the CPU")
def test_compile_decodes_on_the_static_cache_on_the_cpu(tiny_llama_dir, tmp_path):
    """--compile: the static cache; by default the native step (where it serves the model); --eager: eager."""
    base = ["generate", tiny_llama_dir, "--prompt", "the cat", "--max-new-tokens", "5", "--device", "cpu"]
    assert run_cli(*base, "--compile", "--json", tmp_path / "compiled.json") == 0
    assert run_cli(*base, "--json", tmp_path / "plain.json") == 0
    assert run_cli(*base, "--eager", "--json", tmp_path / "eager.json") == 0
    runs = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("compiled", "plain", "eager")]
    native = "native" if cpu_native.available() else "eager"
    assert [run["decode_path"] for run in runs] == ["static", native, "eager"]
    assert runs[0]["tokens"] == runs[1]["tokens"] == runs[2]["tokens"]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_kv_cache_decodes_on_the_captured_static_path_on_cuda(cuda, tiny_llama_dir, tmp_path, mode):
    base = ["generate", tiny_llama_dir, "--prompt", "the cat", "--max-new-tokens", "10", "--device", "cuda"]
    assert run_cli(*base, "--kv-cache", mode, "--json", tmp_path / "graph.json") == 0
    assert run_cli(*base, "--kv-cache", mode, "--eager", "--json", tmp_path / "eager.json") == 0
    graph, eager = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("graph", "eager"))
    assert graph["decode_path"] == "graph" and eager["decode_path"] == "eager" and graph["kv_cache"] == mode
    assert graph["tokens"] == eager["tokens"]


@pytest.mark.gpu
def test_speculative_generate_on_cuda_takes_the_graph_path_unless_eager(cuda, tiny_llama_dir, tmp_path):
    base = ["generate", tiny_llama_dir, "--prompt", "the cat", "--max-new-tokens", "12", "--device", "cuda",
            "--self-speculative", "int8/channel", "--draft-tokens", "3"]
    assert run_cli(*base, "--json", tmp_path / "auto.json") == 0
    assert run_cli(*base, "--eager", "--json", tmp_path / "eager.json") == 0
    auto, eager = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("auto", "eager"))
    assert (auto["decode_path"], eager["decode_path"]) == ("graph", "eager")
    assert auto["tokens"] == eager["tokens"] and auto["rounds"] >= 1


def test_speculative_generate_with_eager_reports_the_eager_path(tiny_llama_dir, tmp_path):
    report = tmp_path / "g.json"
    assert run_cli("generate", tiny_llama_dir, "--prompt", "the cat", "--max-new-tokens", "6", "--device", "cpu",
                   "--self-speculative", "int8/channel", "--eager", "--json", report) == 0
    data = json.loads(report.read_text())
    assert data["decode_path"] == "eager" and data["acceptance_rate"] is not None
