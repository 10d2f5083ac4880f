"""Models no one here wrote: every weight tensor, dict/tuple inputs, outputs with ``.logits``."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import woodfisher as wf
from woodfisher.batch import call_model, logits_of
from woodfisher.checkpoint import refresh_pruned_weights, restore_pruning
from woodfisher.params import effective_weight, select_params, weight_param


class LSTMClassifier(nn.Module):
    def __init__(self, vocab=20, dim=6, hidden=8, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens):
        out, _ = self.lstm(self.emb(tokens))
        return self.head(out[:, -1])


class TinyTransformer(nn.Module):
    def __init__(self, dim=8, classes=3):
        super().__init__()
        self.proj = nn.Linear(4, dim)
        self.enc = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.enc(self.proj(x)).mean(1))


def _seq_data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 20, (n, 7), generator=g)
    y = (tokens[:, -1] % 3).long()
    return [(tokens[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def test_default_selection_covers_attention_rnn_conv_variants_and_explains_skips():
    model = nn.ModuleDict(
        {
            "enc": nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
            "lstm": nn.LSTM(4, 5, num_layers=2, bidirectional=True),
            "c1": nn.Conv1d(2, 3, 3),
            "c3": nn.Conv3d(2, 3, 2),
            "ct": nn.ConvTranspose2d(3, 2, 2),
            "emb": nn.Embedding(10, 4),
            "bn": nn.BatchNorm2d(3),
        }
    )
    sel = select_params(model)
    kinds = {t.param_name: t.kind for t in sel.targets.values()}
    assert kinds["enc.self_attn.in_proj_weight"] == "attention_qkv"
    assert kinds["enc.self_attn.out_proj.weight"] == "attention_out"
    assert kinds["enc.linear1.weight"] == "linear"
    assert kinds["lstm.weight_ih_l1_reverse"] == "rnn_ih"
    assert kinds["lstm.weight_hh_l0"] == "rnn_hh"
    assert sum(k.startswith("lstm.") for k in kinds) == 8
    assert kinds["c1.weight"] == kinds["c3.weight"] == "conv"
    assert kinds["ct.weight"] == "conv_transpose"
    assert "emb.weight" not in kinds and "embedding" in sel.skipped["emb.weight"]
    assert "never pruned" in sel.skipped["bn.weight"]
    assert "never pruned" in sel.skipped["lstm.bias_ih_l0"]
    # every parameter is either selected or explained
    names = {n.replace("_orig", "") for n, _ in model.named_parameters()}
    assert names == set(kinds) | set(sel.skipped)
    # embeddings are selectable by name; a pattern matching nothing names what exists
    assert list(select_params(model, params="emb.*").targets) == ["emb"]
    with pytest.raises(ValueError, match=r"matches no prunable weight; available: \[.*in_proj"):
        select_params(model, params="decoder.*")


def test_lstm_classifier_prunes_its_recurrent_weights_and_masks_survive_everything(tmp_path):
    torch.manual_seed(0)
    model = LSTMClassifier()
    data = _seq_data()
    res = wf.prune(model, data, 0.5, num_grads=32, block_size=64)
    by_name = {layer.name: layer for layer in res.layers}
    assert res.sparsity == 0.5
    assert by_name["lstm.weight_ih_l0"].kind == "rnn_ih"
    assert set(by_name["lstm.weight_hh_l1"].parts) == {"input", "forget", "cell", "output"}
    lstm_zeros = sum(
        int((effective_weight(t) == 0).sum())
        for t in select_params(model, layers="lstm").targets.values()
    )
    assert lstm_zeros > 0.3 * sum(p.numel() for p in model.lstm.parameters() if p.ndim == 2)
    assert "emb.weight" in res.skipped
    # the forward pass really uses the masked recurrent weights
    x = data[0][0]
    twin = LSTMClassifier()
    twin.load_state_dict({k: v for k, v in wf.bake(_copy(model)).state_dict().items()})
    assert torch.allclose(model(x), twin(x), atol=1e-6)
    # save / load keeps the masks
    state = model.state_dict()
    fresh = LSTMClassifier()
    restore_pruning(fresh, state)
    fresh.load_state_dict(state)
    refresh_pruned_weights(fresh)
    assert torch.allclose(fresh(x), model(x), atol=1e-6)
    # training keeps pruned weights at zero; bake leaves plain parameters with the zeros
    before = {t.name: effective_weight(t) == 0 for t in select_params(model).targets.values()}
    wf.train(model, data, epochs=2, lr=0.1, progress=False)
    for t in select_params(model).targets.values():
        assert (effective_weight(t)[before[t.name]] == 0).all()
        assert (weight_param(t)[before[t.name]] == 0).all()
    out = model(x)
    wf.bake(model)
    assert not any(n.endswith("_orig") for n, _ in model.named_parameters())
    assert torch.allclose(model(x), out, atol=1e-6)


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_transformer_in_proj_is_pruned_with_q_k_v_parts_reported():
    torch.manual_seed(0)
    model = TinyTransformer()
    X = torch.randn(48, 5, 4)
    y = torch.randint(0, 3, (48,))
    res = wf.prune(model, [(X[:24], y[:24]), (X[24:], y[24:])], 0.6, num_grads=40,
                   block_size=64)
    qkv = {layer.name: layer for layer in res.layers}["enc.self_attn.in_proj_weight"]
    assert qkv.kind == "attention_qkv" and set(qkv.parts) == {"q", "k", "v"}
    w = effective_weight(select_params(model).targets[qkv.name])
    assert float((w == 0).float().mean()) == pytest.approx(qkv.sparsity)
    assert qkv.sparsity > 0


class KwModel(nn.Module):
    """Takes keyword inputs and returns an object with ``.logits``, like a transformers model."""

    @dataclass
    class Output:
        logits: torch.Tensor

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, features, scale):
        return self.Output(self.b(torch.tanh(self.a(features * scale))))


class TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x, shift):
        out = self.a(x + shift)
        return out, out.detach()  # logits first, as transformers' tuples are


def _loop_grads(model, rows):
    """The oracle: one backward pass per sample."""
    out = []
    for inputs, y in rows:
        model.zero_grad()
        logits = logits_of(call_model(model, inputs))
        nn.functional.cross_entropy(logits, y).backward()
        out.append(torch.cat([model.a.weight.grad.reshape(-1), model.b.weight.grad.reshape(-1)]))
    return torch.stack(out)


def test_dict_batches_with_labels_give_the_per_sample_gradients_of_a_loop():
    torch.manual_seed(0)
    model = KwModel().double()
    feats = torch.randn(6, 3, dtype=torch.float64)
    scale = torch.rand(6, 1, dtype=torch.float64) + 0.5
    labels = torch.randint(0, 2, (6,))
    batches = [{"features": feats[i : i + 3], "scale": scale[i : i + 3],
                "labels": labels[i : i + 3]} for i in (0, 3)]
    G = wf.sample_gradients(model, batches, num_grads=6)
    rows = [({"features": feats[i : i + 1], "scale": scale[i : i + 1]}, labels[i : i + 1])
            for i in range(6)]
    assert torch.allclose(G, _loop_grads(model, rows), atol=1e-10)
    res = wf.prune(model, batches, 0.5, num_grads=6, block_size=8)
    assert res.sparsity == 0.5
    assert 0 <= wf.evaluate(model, batches)["accuracy"] <= 1


def test_tuple_inputs_are_positional_and_tuple_outputs_give_their_first_element():
    torch.manual_seed(0)
    model = TupleModel().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    shift = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (4,))
    G = wf.sample_gradients(model, [((x, shift), y)], num_grads=4)
    for i in range(4):
        model.zero_grad()
        out = model(x[i : i + 1], shift[i : i + 1])[0]
        nn.functional.cross_entropy(out, y[i : i + 1]).backward()
        assert torch.allclose(G[i], model.a.weight.grad.reshape(-1), atol=1e-10)


def test_bad_structures_are_one_line_errors_that_show_what_was_received():
    model = KwModel()
    with pytest.raises(ValueError, match=r"no 'labels' key: got \{features: float32\(2, 3\)"):
        wf.prune(model, [{"features": torch.randn(2, 3)}], 0.5)
    with pytest.raises(ValueError, match=r"does not fit the model: inputs \{features"):
        wf.prune(model, [({"features": torch.randn(2, 3)}, torch.zeros(2).long())], 0.5)

    class NoLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x):
            return {"hidden": self.a(x)}

    with pytest.raises(ValueError, match="without logits"):
        wf.prune(NoLogits(), [(torch.randn(2, 3), torch.zeros(2).long())], 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_kfac_refuses_what_it_cannot_model_and_names_the_fallback():
    conv = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(4 * 16, 2))
    data = [(torch.randn(4, 4, 6, 6), torch.randint(0, 2, (4,)))]
    with pytest.raises(ValueError, match=r"method='woodfisher' or 'diag-fisher'.*skip=\['0'\]"):
        wf.prune(conv, data, 0.5, method="kfac", num_grads=1)
    assert wf.prune(conv, data, 0.5, method="kfac", num_grads=1, skip="0").sparsity == 0.5
