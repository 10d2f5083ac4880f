"""A Hugging Face BERT built from a config (no download), pruned as it is: dict batches with
``labels``, ``.logits`` outputs, global thresholds over the encoder, gradual fine-tuning, and a
``from_pretrained`` round trip of the baked weights."""

from __future__ import annotations

import pytest
import torch

import woodfisher as wf
from woodfisher.params import effective_weight, select_params

transformers = pytest.importorskip("transformers")


def _bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def _batches(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, 8), generator=g)
    mask = torch.ones(n, 8, dtype=torch.long)
    mask[n // 2 :, 6:] = 0  # some padding, so the attention mask matters
    labels = ids[:, 0] % 3
    return [
        {"input_ids": ids[i : i + 12], "attention_mask": mask[i : i + 12],
         "labels": labels[i : i + 12]}
        for i in range(0, n, 12)
    ]


def test_per_sample_gradients_of_bert_equal_a_loop_of_backward_passes():
    model = _bert().double()
    batches = _batches(8)
    layers = "bert.encoder.layer.0.*"
    G = wf.sample_gradients(model, batches, num_grads=4, params=["bert.encoder.layer.0.*.weight"])
    targets = select_params(model, params=["bert.encoder.layer.0.*.weight"]).targets
    assert all(t.module_name.startswith(layers[:-1]) for t in targets.values())
    b = batches[0]
    for i in range(4):
        model.zero_grad()
        row = slice(i, i + 1)
        out = model(input_ids=b["input_ids"][row], attention_mask=b["attention_mask"][row])
        torch.nn.functional.cross_entropy(out.logits, b["labels"][i : i + 1]).backward()
        ref = torch.cat([t.module.weight.grad.reshape(-1) for t in targets.values()])
        assert torch.allclose(G[i], ref, atol=1e-9)


def test_one_shot_global_over_the_encoder_then_from_pretrained(tmp_path):
    from woodfisher.hf import save_pretrained

    model = _bert()
    batches = _batches()
    res = wf.prune(model, batches, 0.5, layers="bert.encoder.*", num_grads=24, block_size=128,
                   recompute=2)
    kinds = {layer.kind for layer in res.layers}
    assert {"attention_q", "attention_k", "attention_v", "linear"} <= kinds
    encoder = select_params(model, layers="bert.encoder.*").targets.values()
    zeros = sum(int((effective_weight(t) == 0).sum()) for t in encoder)
    total = sum(effective_weight(t).numel() for t in encoder)
    assert zeros == round(0.5 * total)
    assert len({round(layer.sparsity, 3) for layer in res.layers}) > 1  # global: uneven layers
    assert "bert.embeddings.word_embeddings.weight" in res.skipped
    out_dir = save_pretrained(model, tmp_path / "pruned")
    assert (out_dir / "model.safetensors").is_file()
    again = transformers.BertForSequenceClassification.from_pretrained(out_dir).eval()
    b = batches[0]
    inputs = {k: v for k, v in b.items() if k != "labels"}
    with torch.no_grad():
        assert torch.allclose(again(**inputs).logits, model(**inputs).logits, atol=1e-5)
    q = again.bert.encoder.layer[0].attention.self.query.weight
    assert (q == 0).any()
    assert any(n.endswith("_orig") for n, _ in model.named_parameters())  # model kept its masks


def test_gradual_fine_tunes_bert_with_dict_batches_and_keeps_zeros():
    model = _bert()
    batches = _batches()
    cfg = wf.GradualConfig(
        final_sparsity=0.6, initial_sparsity=0.3, epochs=2, end=1, lr=0.01,
        prune_options={"num_grads": 12, "block_size": 128, "layers": "bert.encoder.*",
                       "recompute": 1},
        batch_size=12,
    )
    res = wf.gradual(model, batches[:2], cfg, test_data=batches[2:], progress=False)
    assert res.final["sparsity"] == pytest.approx(0.6, abs=1e-3)
    for t in select_params(model, layers="bert.encoder.*").targets.values():
        assert float((effective_weight(t) == 0).float().mean()) > 0


def test_two_four_over_the_encoder_leaves_two_zeros_in_every_group_of_four():
    model = _bert()
    res = wf.prune(model, _batches(), None, pattern="2:4", layers="bert.encoder.*",
                   num_grads=24, block_size=128)
    encoder = list(select_params(model, layers="bert.encoder.*").targets.values())
    assert len(encoder) == len(res.layers) > 0
    for t in encoder:
        w = effective_weight(t)
        groups = w.reshape(w.shape[0], -1, 4)  # groups of 4 consecutive inputs of a row
        assert bool(((groups == 0).sum(-1) >= 2).all()), t.name
    assert res.sparsity == pytest.approx(0.5, abs=1e-6)
