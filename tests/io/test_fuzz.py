"""Fuzzing the inputs modelpress reads (issue 14, item 7): real files, randomly truncated, byte-flipped or with a
JSON value swapped, then read back through modelpress' own paths.

The property, for every mutated input: it loads to exactly what the original loads to (same tensors, same layer
records), or it fails with a ModelpressError; never another exception type, never a hang (a per-case alarm and
hypothesis' deadline), never a write to the input (every file's bytes and mtime compared before and after).
GGUF carries no checksums, so a flipped byte in a GGUF value reads back as another value: there the property is
"a ModelpressError or a well-formed answer", and a truncation must not read back as the whole.

derandomize=True: the same cases on every run (CI-reproducible); hypothesis' example database is off.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama, char_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelpress.algorithms.quantize.gptq import GPTQ, GPTQConfig
from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.engine.runner import EngineSettings, run_sequential
from modelpress.errors import ModelpressError
from modelpress.formats.scheme import WeightScheme
from modelpress.io.model import LoadedModel, check_gguf_file, load_model
from modelpress.io.save import save_compressed

CASE_SECONDS = 10   # a case still running after this is a hang


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, database=None, deadline=timedelta(seconds=CASE_SECONDS),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Hang(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: int = CASE_SECONDS):
    """Raise Hang in this (main) thread if the block runs longer than `seconds`."""
    def ring(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outcome(read: Callable[[], object]) -> object:
    """What `read` returns, or the ModelpressError it raises; any other exception fails the test."""
    try:
        with alarm():
            return read()
    except ModelpressError as err:
        return err


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root (a directory or a file): its bytes and mtime."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


# --- mutations ---------------------------------------------------------------------------------------------

class Mutation:
    """A change of a file's bytes, shown by its label in hypothesis' reports."""

    def __init__(self, label: str, change: Callable[[bytes], bytes]) -> None:
        self.label, self.change = label, change

    def __repr__(self) -> str:
        return self.label


@st.composite
def byte_mutation(draw, region: tuple[float, float] = (0.0, 1.0)):
    """A function of bytes: a truncation, or 1-4 flipped bytes, at positions drawn (as fractions of the length)
    from `region` of the file."""
    low, high = region
    where = st.floats(low, high, exclude_max=high < 1.0)
    if draw(st.booleans()):
        cut = draw(where)
        return Mutation(f"truncate at {cut:.4f}", lambda data: data[: int(cut * len(data))])
    flips = draw(st.lists(st.tuples(where, st.integers(1, 255)), min_size=1, max_size=4))

    def flip(data: bytes) -> bytes:
        out = bytearray(data)
        for at, xor in flips:
            out[min(int(at * len(out)), len(out) - 1)] ^= xor
        return bytes(out)

    return Mutation(f"flip {[(round(a, 4), x) for a, x in flips]}", flip)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2, 2**40) | st.floats(allow_nan=True)
                           | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=6)


@st.composite
def json_mutation(draw):
    """A function of JSON bytes: one value somewhere in the tree replaced by another (of any type), or deleted."""
    pick, value, delete = draw(st.integers(0, 10**6)), draw(JSON_VALUES), draw(st.booleans())

    def mutate(data: bytes) -> bytes:
        tree = json.loads(data)
        slots = list(_slots(tree))
        parent, key = slots[pick % len(slots)]
        if delete:
            del parent[key]
        else:
            parent[key] = value
        return json.dumps(tree).encode()

    return Mutation(f"{'delete' if delete else f'set to {value!r:.60}'} slot #{pick}", mutate)


def _slots(tree):
    """(container, key) for every value in a JSON tree, depth first."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, child in items:
        yield tree, key
        yield from _slots(child)


def mutate_file(path: Path, mutation: Mutation) -> None:
    path.write_bytes(mutation.change(path.read_bytes()))


@contextlib.contextmanager
def copy_of(source: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / source.name
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        yield target


def safetensors_header_end(path: Path) -> float:
    """The fraction of the file that is its 8-byte length and JSON header."""
    data = path.read_bytes()
    return (8 + int.from_bytes(data[:8], "little")) / len(data)


# --- (a) a saved modelpress directory ----------------------------------------------------------------------

PROBE = torch.arange(12).view(1, 12) * 7 % 320   # token ids whose logits stand for the model's behaviour


def model_view(loaded: LoadedModel) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """What a load means: every tensor, and the logits of a fixed input (so that a layer record or a config
    value read differently, with the same tensors, shows too)."""
    model = loaded.model
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    return {k: v.clone() for k, v in model.state_dict().items()}, logits


def same_model(a, b) -> bool:
    return (torch.equal(a[1], b[1]) and a[0].keys() == b[0].keys()
            and all(torch.equal(a[0][k], b[0][k]) for k in a[0]))


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    model = build_tiny_llama(num_hidden_layers=1)
    quantize_rtn(model, RTNConfig(WeightScheme.parse("int4/g32")))
    path = tmp_path_factory.mktemp("fuzz-saved") / "m"
    save_compressed(LoadedModel(model, char_tokenizer(), source="tiny", float_source="tiny-float"), path)
    return path, model_view(load_model(str(path), verify_checksums=True))


SAVED_FILES = ("model.safetensors", "modelpress.json", "config.json")


@st.composite
def saved_dir_mutation(draw):
    name = draw(st.sampled_from(SAVED_FILES))
    if name == "model.safetensors":
        in_header = draw(st.booleans())   # most of the file is tensor data; the header is where parsing happens
        return name, draw(byte_mutation((0.0, 0.02) if in_header else (0.0, 1.0)))
    return name, draw(json_mutation() if draw(st.booleans()) else byte_mutation())


@fuzz_settings(80)
@given(case=saved_dir_mutation())
def test_fuzzed_saved_directory_loads_the_same_or_fails_clearly(saved_dir, case):
    original, expected = saved_dir
    name, mutation = case
    with copy_of(original) as directory:
        mutate_file(directory / name, mutation)
        before = snapshot(directory)
        result = outcome(lambda: model_view(load_model(str(directory), verify_checksums=True)))
        assert snapshot(directory) == before
    assert isinstance(result, ModelpressError) or same_model(result, expected), f"{name}: {mutation}"


# --- (b) a GGUF file: header and tensor table ---------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A small GGUF with keys of every kind (strings, arrays of strings and numbers, scalars) and three tensors."""
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path_factory.mktemp("fuzz-gguf") / "tiny.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_token_list([f"t{i}" for i in range(16)])
    writer.add_token_scores([float(i) for i in range(16)])
    writer.add_bool("tiny.flag", True)
    writer.add_int64("tiny.big", -(2**40))
    rng = np.random.default_rng(0)
    for name, shape in (("token_embd.weight", (16, 8)), ("blk.0.attn_norm.weight", (8,)), ("output.weight", (16, 8))):
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from modelpress.export.gguf_kv import read_kv

    return path, read_kv(path)


def gguf_table_end(path: Path) -> float:
    """The fraction of the file up to the end of its tensor table (where tensor data starts, aligned)."""
    from gguf import GGUFReader

    return GGUFReader(str(path)).data_offset / path.stat().st_size


def read_gguf(path: Path) -> object:
    """What modelpress reads of a GGUF without transformers: the magic check, then every key-value pair."""
    from modelpress.export.gguf_kv import read_kv

    check_gguf_file(path)
    pairs = read_kv(path)
    assert all(isinstance(key, str) for key, _, _, _ in pairs)
    return pairs


def in_prefix(mutation: Mutation, end: float) -> Mutation:
    """`mutation` applied to the first `end` of the file only (a truncation cuts there; flips land there)."""
    def apply(data: bytes) -> bytes:
        cut = int(end * len(data))
        return mutation.change(data[:cut]) + (b"" if mutation.label.startswith("truncate") else data[cut:])

    return Mutation(mutation.label, apply)


@fuzz_settings(150)
@given(mutation=byte_mutation())
def test_fuzzed_gguf_header_reads_or_fails_clearly(gguf_file, mutation):
    original, expected = gguf_file
    with copy_of(original) as path:
        mutate_file(path, in_prefix(mutation, gguf_table_end(original)))
        before = snapshot(path)
        result = outcome(lambda: read_gguf(path))
        assert snapshot(path) == before
    assert isinstance(result, (ModelpressError, list)), mutation.label
    if mutation.label.startswith("truncate"):   # a cut removes, never changes: the keys (cut after them) or an error
        assert isinstance(result, ModelpressError) or result == expected, mutation.label


# --- (c) a --resume directory -------------------------------------------------------------------------------

class Interrupted(Exception):
    pass


class StopAfterBlock0(GPTQ):
    """Dies at its first solve in block 1, after block 0 was committed."""

    def __init__(self, config):
        super().__init__(config)
        self.finished = 0

    def solve(self, group):
        if self.finished:
            raise Interrupted
        return super().solve(group)

    def finish_block(self, block_index):
        super().finish_block(block_index)
        self.finished += 1


RESUME_IDS = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
RESUME_SETTINGS = EngineSettings(batch_size=2)


def _gptq() -> GPTQConfig:
    return GPTQConfig(WeightScheme.parse("int4/g32"))


def resumed_model(directory: Path):
    model = build_tiny_llama(num_hidden_layers=2)
    run_sequential(model, GPTQ(_gptq()), RESUME_IDS, resume_dir=str(directory), settings=RESUME_SETTINGS)
    return model_view(LoadedModel(model, None, source="", float_source=""))


@pytest.fixture(scope="module")
def resume_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz-resume") / "resume"
    with pytest.raises(Interrupted):
        run_sequential(build_tiny_llama(num_hidden_layers=2), StopAfterBlock0(_gptq()), RESUME_IDS,
                       resume_dir=str(directory), settings=RESUME_SETTINGS)
    whole = build_tiny_llama(num_hidden_layers=2)
    run_sequential(whole, GPTQ(_gptq()), RESUME_IDS, settings=RESUME_SETTINGS)
    return directory, model_view(LoadedModel(whole, None, source="", float_source=""))


RESUME_FILES = ("state.json", "block-0000.safetensors", "hidden-0001.safetensors")


@st.composite
def resume_mutation(draw):
    name = draw(st.sampled_from(RESUME_FILES))
    if name == "state.json":
        return name, draw(json_mutation() if draw(st.booleans()) else byte_mutation())
    return name, draw(byte_mutation((0.0, 0.05) if draw(st.booleans()) else (0.0, 1.0)))


@fuzz_settings(60)
@given(case=resume_mutation())
def test_fuzzed_resume_directory_resumes_the_same_or_fails_clearly(resume_dir, case):
    original, expected = resume_dir
    name, mutation = case
    with copy_of(original) as directory:
        mutate_file(directory / name, mutation)
        before = {k: v for k, v in snapshot(directory).items()}
        result = outcome(lambda: resumed_model(directory))
        if isinstance(result, ModelpressError):   # a refused directory is left exactly as it was
            assert snapshot(directory) == before
    assert isinstance(result, ModelpressError) or same_model(result, expected), f"{name}: {mutation}"


@fuzz_settings(20)
@given(mutation=byte_mutation())
def test_fuzzed_gguf_through_load_model_fails_clearly(gguf_file, mutation, tmp_path, monkeypatch):
    """load_model on a .gguf (transformers' GGUF reader behind modelpress' float cache): this file has no
    tokenizer, so even unmutated it cannot load; every mutation must fail as a ModelpressError too."""
    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path / "cache"))
    original, _ = gguf_file
    with copy_of(original) as path:
        mutate_file(path, in_prefix(mutation, gguf_table_end(original)))
        before = snapshot(path)
        result = outcome(lambda: load_model(str(path)))
        assert snapshot(path) == before
    assert isinstance(result, (ModelpressError, LoadedModel)), mutation.label
