"""The tiny checkpoint: deterministic, loadable through the normal path, and checked on load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwen_tasks.cli import app
from qwen_tasks.dev.tiny_model import (
    AUDIO_TOKENS,
    CHAT_TOKENS,
    YES_NO_VARIANTS,
    build_tokenizer,
    make_tiny_model,
)
from qwen_tasks.errors import ConfigError, ModelError
from qwen_tasks.labelling.backends import load_backend


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_tokenizer_has_special_tokens_and_single_token_yes_no() -> None:
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    for token in CHAT_TOKENS + AUDIO_TOKENS + ("<|en|>", "<|zh|>"):
        assert token in vocab
        assert tok.encode(token, add_special_tokens=False) == [vocab[token]]
    for variant in YES_NO_VARIANTS:
        assert len(tok.encode(variant, add_special_tokens=False)) == 1
    assert tok.decode(tok.encode("the quick brown fox 今天")) == "the quick brown fox 今天"


@pytest.mark.model  # builds the tiny model itself (the builder under test), not tiny_model_dir
def test_same_seed_same_checkpoint_other_seed_differs(tiny: Path, tmp_path: Path) -> None:
    again = make_tiny_model(tmp_path / "again", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)
    weights = (tiny / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (again / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != weights


@pytest.mark.model  # builds the tiny model itself (the builder under test), not tiny_model_dir
def test_config_audio_token_matches_tokenizer(tiny: Path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    tokenizer = json.loads((tiny / "tokenizer.json").read_text())
    audio_ids = [t["id"] for t in tokenizer["added_tokens"] if t["content"] == "<|AUDIO|>"]
    assert audio_ids == [config["audio_token_index"]]
    assert config["audio_config"]["num_mel_bins"] == 128
    assert config["audio_config"]["max_source_positions"] == 1500


@pytest.mark.model  # builds the tiny model itself (the builder under test), not tiny_model_dir
def test_loads_like_any_checkpoint(tiny: Path) -> None:
    backend = load_backend(str(tiny), device="cpu")
    assert backend.info.model == str(tiny)
    assert backend.info.device == "cpu" and backend.info.dtype == "float32"
    assert backend.style == "chat"
    assert backend.yes_ids and backend.no_ids and not set(backend.yes_ids) & set(backend.no_ids)


@pytest.mark.model  # builds the tiny model itself (the builder under test), not tiny_model_dir
def test_mismatched_audio_token_id_is_refused(tiny: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["audio_token_index"] = config["audio_token_index"] - 1
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="audio_token_id"):
        load_backend(str(broken), device="cpu")


@pytest.mark.model  # builds the tiny model itself (the builder under test), not tiny_model_dir
def test_base_checkpoint_has_no_chat_template(tmp_path: Path) -> None:
    base = make_tiny_model(tmp_path / "base", instruct=False)
    assert not (base / "chat_template.jinja").exists()
    backend = load_backend(str(base), device="cpu")
    assert backend.style == "base"


def test_unknown_preset_and_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown preset"):
        make_tiny_model(tmp_path / "x", "huge")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_backend(str(empty), device="cpu")


@pytest.mark.model  # builds the tiny model itself (the builder under test), not tiny_model_dir
def test_cli_make_tiny_model(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / "cli"), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    bad = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / "bad"), "--preset", "huge"])
    assert bad.exit_code == 1
