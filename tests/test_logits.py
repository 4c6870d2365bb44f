"""``core.logits``: next-token losses from the head's input in chunks of positions equal the losses from the whole
logits (value and gradient, for every architecture qaft exports, soft-capping included), and never create a
``[batch, T, vocab]`` tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qaft.core import logits as L
from qaft.core.model import ModelConfig, load_model_and_tokenizer

ARCHS = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3", "tiny-phi3"]


def model_of(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=name, dtype="float32"))
    if "gemma" in name:
        model.config.final_logit_softcapping = 3.0  # small enough to bend these logits: the post-head step is exercised
    return model.eval()


def reference(model: torch.nn.Module, ids: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
    logits = model(**(inputs or {"input_ids": ids}), use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")


@pytest.mark.parametrize("name", ARCHS)
def test_chunked_losses_and_gradients_equal_the_whole_logits(name, monkeypatch):
    monkeypatch.setattr(L, "CHUNK", 5)  # chunks that do not divide the positions
    model = model_of(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    embeds = model.get_input_embeddings()(ids).detach()
    a, b = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
    got, want = L.token_nll(model, ids, inputs_embeds=a), reference(model, ids, inputs_embeds=b)
    assert got.shape == (2, 22) and torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    (got * torch.linspace(0.5, 1.5, 22)).sum().backward()
    (want * torch.linspace(0.5, 1.5, 22)).sum().backward()
    assert (a.grad - b.grad).abs().max() <= 1e-5 * b.grad.abs().max(), (a.grad - b.grad).abs().max()  # float32 sums in another order
    out = L.lm_outputs(model, ids)
    assert torch.allclose(out.loss, model(input_ids=ids, labels=ids).loss, atol=1e-5)
    assert torch.allclose(out.logits, model(input_ids=ids).logits, atol=1e-5)  # on request, the whole logits as the model's
    assert model.get_output_embeddings()(embeds).shape[-1] == model.config.vocab_size  # the head is itself again


def test_under_bf16_autocast_the_head_runs_in_bf16_as_inside_the_model():
    """The head runs after the forward: it must take the autocast the forward ran under (bf16 matmuls), not float32."""
    model = model_of("tiny-llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        head = L.head_of(model, ids)
        want = model(input_ids=ids).logits
    assert head.logits.dtype == torch.bfloat16 and torch.equal(head.logits, want)


class LargestLogits(TorchDispatchMode):
    """The most positions any tensor with a vocabulary-sized last dimension held, over every op run inside."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.vocab, self.hidden, self.positions = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (
                isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab and tuple(t.shape) != (self.hidden, self.vocab)
            ):  # not the head's weight
                self.positions = max(self.positions, t.numel() // self.vocab)
        return out


def test_no_tensor_of_the_whole_logits_is_made_with_or_without_gradients(monkeypatch):
    monkeypatch.setattr(L, "CHUNK", 8)
    model = model_of("tiny-gemma3")
    batch, positions, vocab = 2, 64, model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, positions), generator=torch.Generator().manual_seed(3))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with LargestLogits(vocab, model.config.hidden_size) as seen:
        reference(model, ids)
    assert seen.positions >= batch * (positions - 1)  # the check sees the whole logits where they are made
    for grad in (False, True):
        with torch.set_grad_enabled(grad), LargestLogits(vocab, model.config.hidden_size) as seen:
            loss = L.token_nll(model, ids, inputs_embeds=embeds).mean()
            if grad:
                loss.backward()
        assert 0 < seen.positions <= batch * 8, (grad, seen.positions)  # one chunk of 8 positions per sequence at a time


def test_an_architecture_whose_post_head_step_is_unknown_takes_the_models_own_logits(monkeypatch):
    model = model_of("tiny-llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(L, "PLAIN", frozenset())
    model.lm_head.register_forward_hook(lambda m, args, out: out * 2.0)  # what only the model's own forward knows
    assert torch.allclose(L.token_nll(model, ids), reference(model, ids), atol=1e-5)


def test_a_head_sharded_by_deepspeed_zero3_takes_the_models_own_logits():
    """Under ZeRO-3 the head's weight is whole only inside its own forward; the checkpointed chunks would apply it again
    in the backward and meet the shard (the ZeRO-3 tests crashed so): such a model makes its logits itself."""
    model = model_of("tiny-llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    assert L.head_of(model, ids).hidden.shape[-1] == model.config.hidden_size
    model.lm_head.weight.ds_id = 7  # what deepspeed.zero.Init marks its partitioned parameters with
    head = L.head_of(model, ids)
    assert head.hidden.shape[-1] == model.config.vocab_size and torch.allclose(L.token_nll(model, ids), reference(model, ids), atol=1e-5)
