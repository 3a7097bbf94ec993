"""`modelpress chat`: each stdin line a user turn, the reply streamed, the whole conversation the prompt of each turn,
and the part the session's cache holds from the turn before not run again; the replies are what a fresh generation
of the same prompt gives."""

import io
import json
import sys

import pytest
from conftest import save_tiny_llama

from modelpress.cli import main
from modelpress.commands.chat import Conversation
from modelpress.inference.decoding import GenerationSettings, generate
from modelpress.inference.sampling import SamplingConfig
from modelpress.io.model import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def chat(monkeypatch, model_dir, lines, *extra):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    return main(["chat", str(model_dir), "--device", "cpu", *map(str, extra)])


@pytest.mark.parametrize("templated, kv", [(False, "float"), (True, "float"), (True, "int8")],
                         ids=["plain-lines", "chat-template", "int8-cache"])
def test_each_turn_reuses_the_last_and_replies_as_a_fresh_generation(tmp_path, monkeypatch, capsys, templated, kv):
    model_dir = save_tiny_llama(tmp_path / "tiny")
    if templated:
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
        (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    report = tmp_path / "chat.json"
    messages = ["the cat sat", "and then?", "why"]
    assert chat(monkeypatch, model_dir, messages, "--max-new-tokens", 8, "--kv-cache", kv, "--json", report) == 0
    out, err = capsys.readouterr()
    data = json.loads(report.read_text())
    turns = data["turns"]
    assert data["templated"] == templated and ("no chat template" in err) != templated
    assert [t["message"] for t in turns] == messages and out == "".join(t["reply"] + "\n" for t in turns)
    assert turns[0]["reused_prompt_tokens"] == 0
    assert all(t["reused_prompt_tokens"] > 0 for t in turns[1:]) and err.count("held from the turn before") == 3
    # each turn's prompt rebuilt from the messages and replies; a fresh greedy generation gives the same reply
    loaded = load_model(str(model_dir))
    conversation = Conversation(loaded.tokenizer, None, None)
    settings = GenerationSettings(max_new_tokens=8, decode="auto", kv_cache=kv, sampling=SamplingConfig(0.0))
    for turn in turns:
        conversation.messages.append({"role": "user", "content": turn["message"]})
        ids = conversation.ids()
        assert turn["prompt_tokens"] == len(ids) and turn["reused_prompt_tokens"] < len(ids)
        assert generate(loaded.model, ids, settings).tokens == turn["tokens"]
        conversation.messages.append({"role": "assistant", "content": turn["reply"].strip()})


def test_reset_and_a_conversation_longer_than_the_context(tmp_path, monkeypatch, capsys):
    model_dir = save_tiny_llama(tmp_path / "tiny", max_position_embeddings=96)
    report = tmp_path / "chat.json"
    lines = ["abc", "/reset", "abc", "a longer message " * 2, "more words here " * 2, "/exit", "never read"]
    assert chat(monkeypatch, model_dir, lines, "--max-new-tokens", 12, "--json", report) == 0
    err = capsys.readouterr().err
    turns = json.loads(report.read_text())["turns"]
    assert len(turns) == 4 and "(a new conversation)" in err
    assert turns[1]["prompt_tokens"] == turns[0]["prompt_tokens"]   # the same first message, anew
    assert turns[0]["tokens"] == turns[1]["tokens"]
    assert any(t["dropped"] for t in turns) and "oldest exchange" in err
    assert all(t["prompt_tokens"] + 12 <= 96 for t in turns)
    monkeypatch.setattr(sys, "stdin", io.StringIO("x" * 200 + "\n"))
    assert main(["chat", str(model_dir), "--device", "cpu", "--max-new-tokens", "12"]) == 2
    assert "does not fit the model's context of 96" in capsys.readouterr().err


def test_a_speculative_chat_replies_as_plain_chat(tmp_path, monkeypatch):
    model_dir = save_tiny_llama(tmp_path / "tiny")
    messages = ["the cat sat", "and then?"]
    assert chat(monkeypatch, model_dir, messages, "--max-new-tokens", 8, "--json", tmp_path / "plain.json") == 0
    assert chat(monkeypatch, model_dir, messages, "--max-new-tokens", 8, "--self-speculative", "int4/g32",
                "--json", tmp_path / "spec.json") == 0
    plain, spec = (json.loads((tmp_path / f"{n}.json").read_text())["turns"] for n in ("plain", "spec"))
    assert [t["tokens"] for t in spec] == [t["tokens"] for t in plain]
    assert all(t["acceptance_rate"] is not None for t in spec) and spec[1]["reused_prompt_tokens"] > 0


def test_ctrl_c_stops_a_reply_and_the_next_turn_goes_on(tmp_path, monkeypatch, capsys):
    """Ctrl-C during a reply keeps what was said and reads the next message; nothing of the session is lost: the
    next turn runs (its prompt whole: the interrupted call left no held prefix) and replies as a fresh call."""
    from modelpress.inference.session import DecodeSession

    model_dir = save_tiny_llama(tmp_path / "tiny")
    generate_one = DecodeSession.generate

    def first_interrupted(self, ids, **kwargs):
        if not getattr(self, "interrupted_once", False):
            self.interrupted_once = True
            kwargs["on_tokens"]([40, 41])                     # two tokens streamed, then Ctrl-C
            raise KeyboardInterrupt
        return generate_one(self, ids, **kwargs)

    monkeypatch.setattr(DecodeSession, "generate", first_interrupted)
    report = tmp_path / "chat.json"
    assert chat(monkeypatch, model_dir, ["hello", "and then?"], "--max-new-tokens", 6, "--json", report) == 0
    err = capsys.readouterr().err
    turns = json.loads(report.read_text())["turns"]
    assert "(reply interrupted)" in err and turns[0]["interrupted"] and len(turns) == 2
    assert turns[1]["reused_prompt_tokens"] == 0 and len(turns[1]["tokens"]) == 6
