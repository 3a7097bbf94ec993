"""Reliability and security at the boundary (issue 14): no remote code, one clear error per damaged input,
outputs validated before work, safe overwrite, NaN/Inf and N:M refused early, resume fingerprints."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama, char_tokenizer, save_tiny_llama
from safetensors.torch import load_file, save_file

from modelpress.algorithms.quantize.gptq import GPTQ, GPTQConfig
from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.cli import main
from modelpress.engine.runner import EngineSettings, run_sequential
from modelpress.errors import ModelpressError
from modelpress.formats.scheme import WeightScheme
from modelpress.io.model import LoadedModel, load_model
from modelpress.io.save import save_compressed


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def cli_error(capsys, *args) -> str:
    """The one line a failing command prints (exit code 2, no traceback)."""
    capsys.readouterr()
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def save_quantized(path: Path, spec: str = "int4/g32") -> Path:
    model = build_tiny_llama()
    quantize_rtn(model, RTNConfig(WeightScheme.parse(spec)))
    save_compressed(LoadedModel(model, char_tokenizer(), source="tiny", float_source="tiny-float"), path)
    return path


# --- 1. no remote code ------------------------------------------------------------------------------------

def add_remote_code(directory: Path, marker: Path) -> Path:
    """Point config.json at custom code that, if ever imported, creates `marker`."""
    code = (f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
            "from transformers import PretrainedConfig\n\n"
            "class EvilConfig(PretrainedConfig):\n    model_type = 'evil-model'\n")
    (directory / "configuration_evil.py").write_text(code)
    (directory / "modeling_evil.py").write_text(code)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="evil-model", architectures=["EvilForCausalLM"],
                  auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("kind", ["hf", "saved"])
def test_remote_code_never_runs_and_never_prompts(tmp_path, monkeypatch, capsys, kind):
    directory = save_tiny_llama(tmp_path / "m") if kind == "hf" else save_quantized(tmp_path / "m")
    marker = tmp_path / "code-ran"
    add_remote_code(directory, marker)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))   # a user who would answer yes to a prompt
    with pytest.raises(ModelpressError, match=r"auto_map.*trust_remote_code=True"):
        load_model(str(directory))
    assert "auto_map" in cli_error(capsys, "eval", directory, "--reference", "none", "--no-speed")
    if kind == "hf":
        assert "auto_map" in cli_error(capsys, "estimate", directory)
    assert not marker.exists()


def test_tokenizer_remote_code_is_refused_too(tmp_path):
    directory = save_tiny_llama(tmp_path / "m")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelpressError, match="tokenizer_config.json.*auto_map"):
        load_model(str(directory))


# --- 2. one clear error at the boundary --------------------------------------------------------------------

def truncated_hf_weights(tmp_path: Path) -> tuple[Path, str]:
    directory = save_tiny_llama(tmp_path / "m")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return directory, "model.safetensors"


def garbage_saved_config(tmp_path: Path) -> tuple[Path, str]:
    directory = save_quantized(tmp_path / "m")
    (directory / "config.json").write_text("{ not json")
    return directory, "config.json"


def unknown_type_saved_config(tmp_path: Path) -> tuple[Path, str]:
    directory = save_quantized(tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    return directory, "config.json"


def edit_modelpress_json(edit):
    def make(tmp_path: Path) -> tuple[Path, str]:
        directory = save_quantized(tmp_path / "m")
        meta = json.loads((directory / "modelpress.json").read_text())
        expected = edit(meta)
        (directory / "modelpress.json").write_text(json.dumps(meta))
        return directory, expected
    return make


def _drop_kind(meta):
    del meta["layers"]["model.layers.0.mlp.up_proj"]["kind"]
    return "model.layers.0.mlp.up_proj.*kind"


def _drop_layers(meta):
    del meta["layers"]
    return "modelpress.json.*layers"


def _unknown_layer(meta):
    meta["layers"]["model.layers.7.mlp.up_proj"] = meta["layers"]["model.layers.0.mlp.up_proj"]
    return "model.layers.7.mlp.up_proj"


def _wrong_kind(meta):
    meta["layers"]["model.layers.0.mlp.up_proj"]["kind"] = "no-such-kind"
    return "model.layers.0.mlp.up_proj.*no-such-kind"


class Evil:
    """Any class outside torch's weights_only allow-list."""


def refused_torch_bin(tmp_path: Path) -> tuple[Path, str]:
    directory = save_tiny_llama(tmp_path / "m")
    (directory / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Evil()}, directory / "pytorch_model.bin")
    return directory, "pytorch_model.bin"


LOAD_CASES = {
    "truncated HF safetensors": truncated_hf_weights,
    "invalid config.json in a saved dir": garbage_saved_config,
    "unknown model_type in a saved dir": unknown_type_saved_config,
    "modelpress.json layer without kind": edit_modelpress_json(_drop_kind),
    "modelpress.json without layers": edit_modelpress_json(_drop_layers),
    "modelpress.json naming a missing layer": edit_modelpress_json(_unknown_layer),
    "modelpress.json naming an unknown kind": edit_modelpress_json(_wrong_kind),
    "pytorch_model.bin refused by weights_only": refused_torch_bin,
}


@pytest.mark.parametrize("case", LOAD_CASES)
def test_damaged_model_is_one_clear_error(tmp_path, capsys, case):
    directory, expected = LOAD_CASES[case](tmp_path)
    with pytest.raises(ModelpressError, match=expected):
        load_model(str(directory))
    line = cli_error(capsys, "eval", directory, "--reference", "none", "--no-speed")
    assert str(directory) in line, line


def test_reference_with_another_vocabulary_is_refused(tmp_path, tiny_text, capsys):
    model = save_tiny_llama(tmp_path / "a")
    other = save_tiny_llama(tmp_path / "b", vocab_size=330)
    line = cli_error(capsys, "eval", model, "--reference", other, "--text", tiny_text, "--windows", "1",
                     "--seq-len", "16", "--no-speed")
    assert "vocabular" in line and "330" in line and "320" in line


# resume directories: a run interrupted after block 0, then one of its files damaged

class Interrupted(Exception):
    pass


class StopAtBlock1(GPTQ):
    """Dies at its first solve in block 1, after block 0 was committed (a stand-in for Ctrl-C)."""

    finished = 0

    def solve(self, group):
        if self.finished:
            raise Interrupted
        return super().solve(group)

    def finish_block(self, block_index):
        super().finish_block(block_index)
        self.finished += 1


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01   # a tensor value changes; the file still parses
    path.write_bytes(bytes(data))


RESUME_DAMAGE = {
    "truncated block": ("block-0000.safetensors", _truncate),
    "a flipped byte in the block": ("block-0000.safetensors", _flip_last_byte),
    "a flipped byte in the hidden states": ("hidden-0001.safetensors", _flip_last_byte),
    "a record edited in state.json": ("state.json", lambda p: p.write_text(p.read_text().replace('"group_size": 32',
                                                                                                '"group_size": 64', 1))),
    "missing block": ("block-0000.safetensors", Path.unlink),
    "truncated hidden states": ("hidden-0001.safetensors", _truncate),
    "missing hidden states": ("hidden-0001.safetensors", Path.unlink),
    "corrupt state.json": ("state.json", lambda p: p.write_text("{")),
    "state.json of another shape": ("state.json", lambda p: p.write_text('{"blocks_done": 1}')),
}


def _gptq(**overrides) -> GPTQConfig:
    return GPTQConfig(WeightScheme.parse("int4/g32"), **overrides)


def _interrupted_run(resume: Path, ids: torch.Tensor, settings: EngineSettings) -> None:
    with pytest.raises(Interrupted):
        run_sequential(build_tiny_llama(num_hidden_layers=3), StopAtBlock1(_gptq()), ids, resume_dir=resume,
                       settings=settings)


@pytest.mark.parametrize("case", RESUME_DAMAGE)
def test_damaged_resume_directory_is_named(tmp_path, case):
    name, damage = RESUME_DAMAGE[case]
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    settings = EngineSettings(batch_size=2)
    _interrupted_run(tmp_path, ids, settings)
    damage(tmp_path / name)
    with pytest.raises(ModelpressError, match=f"{name}.*--resume"):
        run_sequential(build_tiny_llama(num_hidden_layers=3), GPTQ(_gptq()), ids, resume_dir=tmp_path,
                       settings=settings)


# the GGUF float cache: a damaged cache is detected and rebuilt

def fake_gguf_reader(calls: list):
    def read(path):
        calls.append(path)
        return build_tiny_llama(), char_tokenizer()
    return read


@pytest.mark.parametrize("damage", ["truncate", "delete", "garbage config"])
def test_damaged_gguf_float_cache_is_rebuilt(tmp_path, monkeypatch, damage):
    import modelpress.io.model as model_io

    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path / "cache"))
    calls: list = []
    monkeypatch.setattr(model_io, "read_gguf_with_transformers", fake_gguf_reader(calls))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    first = {k: v.clone() for k, v in load_model(str(gguf)).model.state_dict().items()}  # unmapped from the cache
    cache = model_io.gguf_float_cache(gguf)
    assert len(calls) == 1
    if damage == "truncate":
        _truncate(cache / "model.safetensors")
    elif damage == "delete":
        (cache / "model.safetensors").unlink()
    else:
        (cache / "config.json").write_text("{")
    again = load_model(str(gguf))
    assert len(calls) == 2
    for name, tensor in first.items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name


# --- 3. outputs validated before any work ------------------------------------------------------------------

def _existing_out(tmp_path: Path) -> tuple[list, str]:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    return ["--out", tmp_path / "out"], "already exists"


def _out_under_a_file(tmp_path: Path) -> tuple[list, str]:
    (tmp_path / "file").write_text("x")
    return ["--out", tmp_path / "file" / "out"], "not a directory"


def _json_under_a_file(tmp_path: Path) -> tuple[list, str]:
    (tmp_path / "file").write_text("x")
    return ["--out", tmp_path / "fresh", "--json", tmp_path / "file" / "r.json"], "--json"


def _resume_is_a_file(tmp_path: Path) -> tuple[list, str]:
    (tmp_path / "file").write_text("x")
    return ["--out", tmp_path / "fresh", "--resume", tmp_path / "file"], "--resume"


def _overwrite_foreign(tmp_path: Path) -> tuple[list, str]:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    return ["--out", tmp_path / "out", "--overwrite"], "not written by modelpress"


COMMANDS = {
    "quantize": ["quantize", "{model}", "--format", "int4"],
    "prune": ["prune", "{model}", "--method", "magnitude", "--sparsity", "0.5"],
    "distill": ["distill", "--teacher", "{model}", "--student", "{model}"],
    "finetune": ["finetune", "{model}", "--lora"],
    "export": ["export", "{model}", "--to", "hf"],
}
PATH_CASES = {"existing --out": _existing_out, "--out under a file": _out_under_a_file,
              "--json under a file": _json_under_a_file, "--overwrite of a foreign dir": _overwrite_foreign}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", PATH_CASES)
def test_bad_output_paths_are_refused_before_loading(tmp_path, capsys, monkeypatch, command, case):
    from modelpress.export import base

    if "hf" not in base.export_targets():   # a stand-in target where the exporters are not merged yet
        monkeypatch.setitem(base._EXPORTERS, "hf", lambda loaded, folder, options: None)
    extra, expected = PATH_CASES[case](tmp_path)
    args = [a.replace("{model}", str(tmp_path / "no-model")) for a in COMMANDS[command]]
    line = cli_error(capsys, *args, *extra)   # the model does not exist: loading first would fail differently
    assert expected in line and "does not exist" not in line, line
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep" if (tmp_path / "out").exists() else True


@pytest.mark.parametrize("command", ["quantize", "prune"])
def test_unwritable_resume_is_refused_before_loading(tmp_path, capsys, command):
    extra, expected = _resume_is_a_file(tmp_path)
    args = [a.replace("{model}", str(tmp_path / "no-model")) for a in COMMANDS[command]]
    assert expected in cli_error(capsys, *args, *extra)


@pytest.mark.parametrize("argv", [["eval", "{model}", "--json", "{bad}"],
                                  ["compare", "{model}", "--json", "{bad}"],
                                  ["compare", "{model}", "--plot", "{bad}"]])
def test_eval_and_compare_check_report_paths_first(tmp_path, capsys, argv):
    (tmp_path / "file").write_text("x")
    args = [a.format(model=tmp_path / "no-model", bad=tmp_path / "file" / "r") for a in argv]
    line = cli_error(capsys, *args)
    assert "not a directory" in line and "does not exist" not in line


# --- 4. safe overwrite and clean-up ------------------------------------------------------------------------

def test_overwrite_replaces_only_what_modelpress_wrote(tmp_path):
    loaded = LoadedModel(build_tiny_llama(), char_tokenizer(), source="tiny", float_source="tiny")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(ModelpressError, match="not written by modelpress"):
        save_compressed(loaded, foreign, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "years of work"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(ModelpressError, match="not a directory"):
        save_compressed(loaded, a_file, overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    save_compressed(loaded, empty, overwrite=True)           # an empty directory may be filled
    save_compressed(loaded, empty, overwrite=True)           # our own output may be replaced
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "export.json").write_text("{}")
    save_compressed(loaded, tmp_path / "exported", overwrite=True)


def test_stale_partial_and_old_siblings_are_cleaned(tmp_path):
    from modelpress.io.atomic import atomic_directory

    old = time.time() - 3600
    stale = [tmp_path / ".out.partial-abc123", tmp_path / ".out.old-def456", tmp_path / ".out.partial-file"]
    for path in stale[:2]:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    stale[2].write_bytes(b"half")
    fresh = tmp_path / ".out.partial-now"   # younger than this process: maybe another run's, left alone
    fresh.mkdir()
    unrelated = tmp_path / ".other.partial-abc"
    unrelated.mkdir()
    for path in stale + [unrelated]:
        os.utime(path, (old, old))
    os.utime(fresh, (time.time() + 60, time.time() + 60))
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "modelpress.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".out.partial-now", ".other.partial-abc", "out"])


# --- 5. NaN/Inf and N:M refused before work ----------------------------------------------------------------

def _nan_model_dir(tmp_path: Path) -> Path:
    directory = save_tiny_llama(tmp_path / "m")
    weights = load_file(directory / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][3, 3] = float("nan")
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("argv", [
    ["prune", "{m}", "--method", "magnitude", "--sparsity", "0.5", "--out", "{out}"],
    ["finetune", "{m}", "--lora", "--teacher", "none", "--steps", "1", "--text", "{text}", "--seq-len", "16",
     "--train-windows", "1", "--out", "{out}"],
    ["distill", "--teacher", "{m}", "--student", "{m}", "--steps", "1", "--text", "{text}", "--seq-len", "16",
     "--train-windows", "1", "--out", "{out}"],
])
def test_nan_weights_are_refused(tmp_path, tiny_text, capsys, argv):
    directory = _nan_model_dir(tmp_path)
    args = [a.format(m=directory, out=tmp_path / "out", text=tiny_text) for a in argv]
    line = cli_error(capsys, *args)
    assert "model.layers.0.mlp.up_proj" in line and "NaN/Inf" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("pattern, expected", [("2:7", "2:7"), ("3:2", "0 < N < M"), ("2:x", "N:M")])
def test_nm_pattern_no_layer_admits_is_refused_first(tmp_path, capsys, pattern, expected):
    directory = save_tiny_llama(tmp_path / "m")   # rows of 96 and 160 inputs: neither a multiple of 7
    out = tmp_path / "out"
    line = cli_error(capsys, "prune", directory, "--method", "magnitude", "--pattern", pattern, "--out", out)
    assert expected in line
    assert not out.exists()


# --- 6. resume fingerprint covers every setting ------------------------------------------------------------

@pytest.mark.parametrize("changed", [{"skip": ("lm_head", "mlp")}, {"act_order": False}, {"shrink_steps": 5}])
def test_resume_refuses_other_settings(tmp_path, changed):
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    settings = EngineSettings(batch_size=2)
    _interrupted_run(tmp_path, ids, settings)
    config = _gptq(**changed)
    other = EngineSettings(batch_size=2, skip=config.skip)
    with pytest.raises(ModelpressError, match="other settings"):
        run_sequential(build_tiny_llama(num_hidden_layers=3), GPTQ(config), ids, resume_dir=tmp_path, settings=other)


# --- 7. integrity: checksums and tensors against their layers' records -------------------------------------

def _flip_a_byte(directory: Path) -> str:
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    return "model.safetensors is damaged: its sha256 differs"


def _truncate_weights(directory: Path) -> str:
    _truncate(directory / "model.safetensors")
    return "model.safetensors is damaged: 100 bytes"


def _edit_record(edit):
    def damage(directory: Path) -> str:
        meta = json.loads((directory / "modelpress.json").read_text())
        edit(meta["layers"]["model.layers.1.self_attn.q_proj"])
        (directory / "modelpress.json").write_text(json.dumps(meta))
        return "layer model.layers.1.self_attn.q_proj"
    return damage


def _retype_tensor(directory: Path) -> str:
    """A consistent file (checksum updated) whose scale dtype contradicts the record's scheme."""
    weights = load_file(directory / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.scale"] = weights["model.layers.0.mlp.down_proj.scale"].float()
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    meta = json.loads((directory / "modelpress.json").read_text())
    del meta["files"]   # as a save from before checksums were recorded
    (directory / "modelpress.json").write_text(json.dumps(meta))
    return "model.layers.0.mlp.down_proj.scale is .* torch.float32, but layer model.layers.0.mlp.down_proj"


INTEGRITY_CASES = {
    "a flipped byte": _flip_a_byte,
    "a truncated file": _truncate_weights,
    "group size changed in the record": _edit_record(lambda r: r["scheme"].update(group_size=64)),
    "format bits changed in the record": _edit_record(lambda r: r["scheme"].update(format="int8")),
    "permutation claimed by the record": _edit_record(lambda r: r.update(input_perm=True)),
    "shape changed in the record": _edit_record(lambda r: r.update(shape=[96, 64])),
    "scale dtype changed in the file": _retype_tensor,
}


@pytest.mark.parametrize("case", INTEGRITY_CASES)
def test_integrity_violations_name_the_file_or_layer(tmp_path, case):
    directory = save_quantized(tmp_path / "m")
    expected = INTEGRITY_CASES[case](directory)
    with pytest.raises(ModelpressError, match=expected):
        load_model(str(directory), verify_checksums=True)


def test_saved_directory_records_file_checksums(tmp_path):
    import hashlib

    directory = save_quantized(tmp_path / "m")
    meta = json.loads((directory / "modelpress.json").read_text())
    for name in ("model.safetensors", "config.json"):   # config.json: a changed value there changes the model too
        data = (directory / name).read_bytes()
        assert meta["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
