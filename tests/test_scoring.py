"""The scoring pass: losses, model state left untouched, scale_factor, batch structures."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sbdata import SelectiveBatchLoader

from .conftest import (
    Example,
    LogitTable,
    Recorder,
    consecutive_ids,
    id_loss,
    known_ce,
    names,
    topk_positions,
)


def _bn_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8, momentum=None)),
        nn.Linear(8, 3),
    )
    # make the running statistics non-trivial, as in a model mid-training
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 4) * 3 + 1)
    return model


def _snapshot(model):
    flags = [m.training for m in model.modules()]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return flags, buffers, params


def _assert_unchanged(model, snap):
    flags, buffers, params = snap
    assert [m.training for m in model.modules()] == flags
    now = dict(model.named_buffers())
    assert set(now) == set(buffers)
    assert any(name.endswith("num_batches_tracked") for name in now)
    for name, value in buffers.items():
        assert torch.equal(now[name], value), f"buffer {name} changed"
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), params[name])


def _xy_batches(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in sizes
    ]


# ---------------------------------------------------------------- model state


@pytest.mark.parametrize("scoring_mode", ["eval", "train"])
@pytest.mark.parametrize("model_mode", ["train", "eval", "mixed"])
def test_scoring_leaves_batchnorm_buffers_and_train_eval_flags_exactly_as_they_were(
    scoring_mode, model_mode
):
    model = _bn_model()
    if model_mode == "eval":
        model.eval()
    elif model_mode == "mixed":
        model[1].eval()  # one BatchNorm frozen, the rest training
        model[3].eval()
    snap = _snapshot(model)
    sb = SelectiveBatchLoader(
        _xy_batches([8, 8, 8, 5]), model, keep=0.5, batch_size=4, scoring_mode=scoring_mode
    )
    for epoch in range(2):
        for x, y in sb:
            _assert_unchanged(model, snap)  # also between batches, not only at the end
    assert sb.stats.history[-1].scored == 29
    _assert_unchanged(model, snap)


def test_eval_scoring_uses_running_statistics_and_no_dropout():
    model = _bn_model()  # in train mode
    batches = _xy_batches([8])
    seen = []

    def loss_fn(outputs, targets):
        seen.append(outputs.clone())
        return F.cross_entropy(outputs, targets, reduction="none")

    list(SelectiveBatchLoader(batches, model, keep=0.5, batch_size=4, loss_fn=loss_fn))
    model.eval()
    with torch.no_grad():
        expected = model(batches[0][0])
    assert torch.allclose(seen[0], expected)


def test_train_scoring_normalises_with_batch_statistics():
    model = nn.BatchNorm1d(4)
    with torch.no_grad():
        model.running_mean.fill_(5.0)
        model.running_var.fill_(9.0)
    model.eval()
    batches = _xy_batches([8])
    seen = []

    def loss_fn(outputs, targets):
        seen.append(outputs.clone())
        return outputs.sum(dim=1)

    sb = SelectiveBatchLoader(
        batches, model, keep=0.5, batch_size=4, loss_fn=loss_fn, scoring_mode="train"
    )
    list(sb)
    x = batches[0][0]
    expected = F.batch_norm(x, None, None, model.weight, model.bias, training=True)
    assert torch.allclose(seen[0], expected, atol=1e-5)
    assert not model.training
    assert torch.equal(model.running_mean, torch.full((4,), 5.0))
    assert torch.equal(model.running_var, torch.full((4,), 9.0))
    assert int(model.num_batches_tracked) == 0


def test_scoring_runs_without_gradients():
    model = Recorder()
    ids = torch.arange(6)
    batches = [(ids.float()[:, None].expand(6, 2).contiguous(), ids)]
    sb = SelectiveBatchLoader(
        batches, model, keep=0.5, batch_size=3, loss_fn=lambda out, tgt: out.sum(dim=1)
    )
    list(sb)
    assert model.grad_enabled == [False]


# ---------------------------------------------------------------- losses


def _known_ce_setup(n=24, classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(n, classes, generator=gen) * 2
    targets = torch.randint(0, classes, (n,), generator=gen)
    batches = [(ids, targets[ids]) for ids in consecutive_ids([8, 8, 8])]
    expected = []
    for ids, y in batches:
        losses = known_ce(table, ids, y)
        expected += [int(ids[p]) for p in topk_positions(losses.tolist(), 0.25)]
    return table, batches, expected


@pytest.mark.parametrize(
    "loss_fn",
    [
        None,
        nn.CrossEntropyLoss(),  # reduction="mean" module: copied with reduction="none"
        F.cross_entropy,  # takes reduction: called with reduction="none"
        lambda out, tgt: F.cross_entropy(out, tgt, reduction="none"),  # already per example
    ],
    ids=["default", "module", "function-with-reduction", "per-example-lambda"],
)
def test_every_form_of_cross_entropy_gives_per_example_losses(loss_fn):
    table, batches, expected = _known_ce_setup()
    sb = SelectiveBatchLoader(
        batches, LogitTable(table), keep=0.25, policy="topk", batch_size=6, loss_fn=loss_fn
    )
    out = [int(i) for ids, y in sb for i in ids]
    assert out == expected


def test_a_loss_module_given_by_the_user_keeps_its_own_reduction():
    module = nn.CrossEntropyLoss()
    table, batches, _ = _known_ce_setup()
    list(SelectiveBatchLoader(batches, LogitTable(table), keep=0.25, batch_size=6, loss_fn=module))
    assert module.reduction == "mean"


def test_a_custom_per_example_loss_decides_the_selection():
    # the loss is minus the id: topk must keep the lowest ids of each batch
    batches = [(ids.float()[:, None], ids) for ids in consecutive_ids([6, 6])]
    sb = SelectiveBatchLoader(
        batches, nn.Identity(), keep=0.5, policy="topk", batch_size=3,
        loss_fn=lambda out, tgt: -out[:, 0],
    )
    assert [b[1].tolist() for b in sb] == [[0, 1, 2], [6, 7, 8]]


# ---------------------------------------------------------------- scale_factor


@pytest.mark.parametrize(
    "shape, mode",
    [((8, 2, 16), "linear"), ((8, 3, 8, 12), "bilinear"), ((8, 1, 4, 4, 8), "trilinear")],
)
def test_scale_factor_shrinks_the_scorer_input_but_not_the_yielded_batch(shape, mode):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    ids = torch.arange(shape[0])
    model = Recorder()
    sb = SelectiveBatchLoader(
        [(x, ids)], model, keep=0.5, policy="topk", batch_size=4, scale_factor=0.5,
        loss_fn=lambda out, tgt: out.flatten(1).mean(dim=1),
    )
    (out,) = list(sb)
    (seen,) = model.inputs
    small = (shape[0], shape[1], *[s // 2 for s in shape[2:]])
    assert seen.shape == small
    assert torch.allclose(seen, F.interpolate(x, scale_factor=0.5, mode=mode, align_corners=False))
    assert not torch.allclose(seen, F.interpolate(x, scale_factor=0.5, mode="nearest"))
    assert out[0].shape == (4, *shape[1:])
    # the selection uses the scores of the small input, the rows come from the full one
    scores = seen.flatten(1).mean(dim=1)
    rows = topk_positions(scores.tolist(), 0.5)
    assert torch.equal(out[0], x[rows])
    assert out[1].tolist() == rows


def test_scale_factor_one_feeds_the_input_unchanged():
    x = torch.randn(4, 2, 8)
    model = Recorder()
    list(SelectiveBatchLoader(
        [(x, torch.arange(4))], model, keep=0.5, batch_size=2,
        loss_fn=lambda out, tgt: out.flatten(1).mean(dim=1),
    ))
    assert torch.equal(model.inputs[0], x)


# ---------------------------------------------------------------- batch structures


def _known_ce_dict_batches(table, targets, sizes):
    return [
        {"image": ids, "label": targets[ids], "name": names(ids), "id": ids}
        for ids in consecutive_ids(sizes)
    ]


def test_dict_batches_with_input_key_and_target_key_strings_and_a_string_field():
    gen = torch.Generator().manual_seed(1)
    table, targets = torch.randn(20, 4, generator=gen), torch.randint(0, 4, (20,), generator=gen)
    batches = _known_ce_dict_batches(table, targets, [8, 8, 4])
    sb = SelectiveBatchLoader(
        batches, LogitTable(table), keep=0.5, policy="topk", batch_size=5,
        input_key="image", target_key="label",
    )
    out = list(sb)
    assert [len(b["id"]) for b in out] == [5, 5]
    expected = []
    for b in batches:
        losses = known_ce(table, b["image"], b["label"])
        expected += [int(b["id"][p]) for p in topk_positions(losses.tolist(), 0.5)]
    got = [int(i) for b in out for i in b["id"]]
    assert got == expected
    for b in out:
        assert list(b) == ["image", "label", "name", "id"]
        assert b["name"] == names(b["id"])
        assert torch.equal(b["label"], targets[b["id"]])
        assert torch.equal(b["image"], b["id"])


def test_nested_batches_with_callable_keys():
    gen = torch.Generator().manual_seed(2)
    table, targets = torch.randn(16, 3, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    batches = [
        {"pair": (ids, targets[ids]), "meta": {"name": names(ids), "id": ids}}
        for ids in consecutive_ids([8, 8])
    ]
    sb = SelectiveBatchLoader(
        batches, LogitTable(table), keep=0.5, policy="topk", batch_size=4,
        input_key=lambda b: b["pair"][0], target_key=lambda b: b["pair"][1],
    )
    out = list(sb)
    expected = []
    for b in batches:
        losses = known_ce(table, *b["pair"])
        expected += [int(b["meta"]["id"][p]) for p in topk_positions(losses.tolist(), 0.5)]
    assert [int(i) for b in out for i in b["meta"]["id"]] == expected
    for b in out:
        assert type(b["pair"]) is tuple
        assert torch.equal(b["pair"][0], b["meta"]["id"])
        assert torch.equal(b["pair"][1], targets[b["meta"]["id"]])
        assert b["meta"]["name"] == names(b["meta"]["id"])


def test_named_tuple_batches_keep_their_type():
    gen = torch.Generator().manual_seed(3)
    table, targets = torch.randn(12, 3, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    batches = [Example(ids, targets[ids], ids.clone()) for ids in consecutive_ids([6, 6])]
    sb = SelectiveBatchLoader(batches, LogitTable(table), keep=0.5, policy="topk", batch_size=3)
    out = list(sb)
    expected = []
    for b in batches:
        expected += [int(b.id[p]) for p in topk_positions(known_ce(table, b.x, b.y).tolist(), 0.5)]
    assert all(type(b) is Example for b in out)
    assert [int(i) for b in out for i in b.id] == expected
    assert all(torch.equal(b.x, b.id) and torch.equal(b.y, targets[b.id]) for b in out)


def test_score_fn_receives_the_model_and_the_whole_batch():
    Batch = collections.namedtuple("Batch", ["tokens", "mask", "meta"])
    batches = [
        Batch(ids[:, None].repeat(1, 3), torch.ones(len(ids), 3), {"id": ids, "name": names(ids)})
        for ids in consecutive_ids([6, 6, 6])
    ]
    model = Recorder()
    calls = []

    def score_fn(m, batch):
        calls.append((m, batch))
        return id_loss(batch.meta["id"])

    out = list(SelectiveBatchLoader(
        batches, model, keep=0.5, policy="topk", batch_size=3, score_fn=score_fn
    ))
    assert [c[1] for c in calls] == batches and all(c[0] is model for c in calls)
    expected = []
    for b in batches:
        ids = b.meta["id"]
        expected += [int(ids[p]) for p in topk_positions(id_loss(ids).tolist(), 0.5)]
    assert [int(i) for b in out for i in b.meta["id"]] == expected
    for b in out:
        assert type(b) is Batch
        assert torch.equal(b.tokens[:, 0], b.meta["id"])
        assert b.meta["name"] == names(b.meta["id"])


# ---------------------------------------------------------------- device


def test_batches_are_yielded_on_the_model_device():
    model = nn.Linear(4, 3)
    sb = SelectiveBatchLoader(_xy_batches([8, 8]), model, keep=0.5, batch_size=4)
    for x, y in sb:
        assert x.device == next(model.parameters()).device
        assert y.device == x.device
    assert sb.device == torch.device("cpu")
    explicit = SelectiveBatchLoader(_xy_batches([8]), model, keep=0.5, batch_size=4, device="cpu")
    assert all(x.device.type == "cpu" for x, _ in explicit)


def test_score_fn_runs_under_the_same_guarantees_as_the_built_in_pass():
    from torch.utils.data import DataLoader, TensorDataset

    from sbdata import SelectiveBatchLoader

    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []

    def score_fn(model, batch):
        x, y = batch
        seen.append((torch.is_grad_enabled(), model.training, torch.is_autocast_enabled("cpu")))
        model.train()  # a careless score_fn: sbdata restores the mode and the BatchNorm buffers
        return F.cross_entropy(model(x).float(), y, reduction="none")

    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    sb = SelectiveBatchLoader(DataLoader(data, batch_size=8), net, keep=0.5, score_fn=score_fn, autocast_dtype=torch.bfloat16)
    assert len(list(sb)) == 2
    assert seen == [(False, False, True)] * 4, "no grad, eval mode, autocast"
    assert net.training and all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by scoring"
