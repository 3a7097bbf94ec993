"""lm-eval on a modelpress model (eval/tasks.py): the LM's three request types against direct computations on
the same quantized model, and a tiny multiple-choice task file (local JSON, no network) end to end.
Skipped without the optional lm-eval extra."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_llama, char_tokenizer, save_tiny_llama

pytest.importorskip("lm_eval")

import modelpress  # noqa: E402
from modelpress import RTN  # noqa: E402
from modelpress.errors import ModelpressError  # noqa: E402
from modelpress.eval.tasks import evaluate_tasks, lm_eval_model  # noqa: E402
from modelpress.io.model import LoadedModel  # noqa: E402

DOCS = [("The sky is", ["blue", "green", "red"], 0), ("Two plus two is", ["four", "five"], 1),
        ("Fire is", ["cold", "hot", "wet", "dry"], 1), ("Ice is", ["cold", "warm"], 0),
        ("Grass is", ["green", "purple"], 0), ("Snow is", ["white", "black", "blue"], 2)]


@pytest.fixture(scope="module")
def quantized():
    model = build_tiny_llama()
    modelpress.quantize(model, RTN("int4/g32"))
    return LoadedModel(model, char_tokenizer(), source="tiny-int4", float_source="tiny")


def loglikelihood(loaded, context: str, continuation: str) -> float:
    """log p(continuation | context) straight from the model: the reference the adapter must match."""
    tok = loaded.tokenizer
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return scored(loaded, ctx, tok(continuation, add_special_tokens=False)["input_ids"])


def scored(loaded, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = F.log_softmax(loaded.model(ids[:, :-1]).logits.float(), -1)[0]
    targets = ids[0, len(context):]
    return float(logp[len(context) - 1:].gather(-1, targets.unsqueeze(-1)).sum())


def test_lm_requests_match_the_model(quantized):
    from lm_eval.api.instance import Instance

    lm = lm_eval_model(quantized, batch_size=3)
    pairs = [("The sky is", " blue"), ("Fire is", " cold and wet"), ("A", "bc")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests)
    for (context, continuation), (value, _greedy) in zip(pairs, got):
        assert value == pytest.approx(loglikelihood(quantized, context, continuation), abs=1e-4)

    text = "Snow is white. Grass is green."
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    expected = scored(quantized, [lm.prefix_token_id], quantized.tokenizer(text)["input_ids"])  # every token
    assert rolling == pytest.approx(expected, abs=1e-3)

    generated = lm.generate_until([Instance("generate_until", {}, ("Ice is", {"until": ["\n"], "max_gen_toks": 6,
                                                                              "do_sample": False}), 0)])[0]
    prompt = quantized.tokenizer("Ice is")["input_ids"]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(6):                                    # greedy, one token at a time
            ids = torch.cat([ids, quantized.model(ids).logits[:, -1:].argmax(-1)], dim=1)
    greedy = quantized.tokenizer.decode(ids[0, len(prompt):])
    assert generated == greedy.split("\n")[0]


def write_task(tmp_path):
    (tmp_path / "tiny_mc.jsonl").write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": a})
                                                      for q, c, a in DOCS) + "\n")
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
        + str(tmp_path / "tiny_mc.jsonl")
        + "\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
        "    aggregation: mean\n    higher_is_better: true\n")
    return tmp_path / "tiny_mc.yaml"


def expected_accuracy(loaded) -> float:
    picks = [max(range(len(c)), key=lambda i: loglikelihood(loaded, q, " " + c[i])) for q, c, _ in DOCS]
    return sum(p == a for p, (_, _, a) in zip(picks, DOCS)) / len(DOCS)


def test_multiple_choice_task_file(quantized, tmp_path):
    report = evaluate_tasks(quantized, [write_task(tmp_path)], batch_size=4)
    expected = expected_accuracy(quantized)
    assert report.results["tiny_mc"]["acc"] == pytest.approx(expected)
    assert report.samples["tiny_mc"] == len(DOCS)
    assert json.loads(json.dumps(report.to_json()))["results"]["tiny_mc"]["acc"] == pytest.approx(expected)


def test_unknown_task_is_named(quantized, tmp_path):
    (tmp_path / "bad.yaml").write_text("dataset_path: json\n")
    with pytest.raises(ModelpressError, match="no `task:` name"):
        evaluate_tasks(quantized, [tmp_path / "bad.yaml"])
    with pytest.raises(ModelpressError, match="does not exist"):
        evaluate_tasks(quantized, [tmp_path / "missing.yaml"])


def test_eval_command_reports_task_accuracy_beside_ppl(tmp_path, capsys):
    from modelpress.cli import main

    path = save_tiny_llama(tmp_path / "tiny")
    (tmp_path / "text.txt").write_text("Snow is white and grass is green. " * 20)
    code = main(["eval", str(path), "--reference", "none", "--text", str(tmp_path / "text.txt"), "--windows", "1",
                 "--seq-len", "32", "--no-speed", "--tasks", str(write_task(tmp_path)),
                 "--json", str(tmp_path / "r.json")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    acc = report["extra"]["tasks"]["results"]["tiny_mc"]["acc"]
    assert acc == pytest.approx(expected_accuracy(modelpress.load(str(path))))
    assert "tiny_mc acc" in capsys.readouterr().out
