"""Bad input, as a table: every case is either accepted with the right result or refused with
an error that names the argument, echoes the value and says the fix. None is silently wrong.

Each row: a name, a thunk that does the misuse, and either the expected ``(exception, regex)``
or ``ACCEPTED`` with a check of the result.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from sbdata import RankPolicy, SelectiveBatchLoader

from .conftest import Echo, IndexedPairs, loss_from_x

ACCEPTED = None


def dl(n: int = 24, **kw) -> DataLoader:
    return DataLoader(IndexedPairs(n), batch_size=kw.pop("batch_size", 4), **kw)


def sb(loader: Any = None, **kw) -> SelectiveBatchLoader:
    kw.setdefault("loss_fn", loss_from_x)
    return SelectiveBatchLoader(dl() if loader is None else loader, kw.pop("model", Echo()), **kw)


def first(loader: SelectiveBatchLoader) -> Any:
    return next(iter(loader))


def batches(*parts: Any) -> list[Any]:
    return list(parts)


def xy(n: int = 4, **extra: Any) -> tuple:
    ids = torch.arange(n)
    return (ids[:, None].float().repeat(1, 2), ids % 3, ids, *extra.values())


class Returns(nn.Module):
    def __init__(self, value: Callable[[torch.Tensor], Any]) -> None:
        super().__init__()
        self.value = value
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> Any:
        return self.value(x)


def state_of(**kw) -> dict:
    loader = sb(**kw)
    list(loader)
    return loader.state_dict()


def mid_epoch_state(**kw) -> dict:
    loader = sb(**kw)
    it = iter(loader)
    next(it)
    return loader.state_dict()  # while ``it`` is alive: a dropped iterator ends its epoch


def read_ahead_weights() -> Any:
    loader = sb(policy="infobatch")
    it = iter(loader)
    next(it), next(it)
    return loader.batch_weights


def record_after_many() -> None:
    loader = sb(dl(400, batch_size=4), keep=1.0)
    for _ in itertools.islice(loader, 70):
        pass
    loader.record(torch.zeros(4))


def use_closed_iterator() -> None:
    loader = sb()
    a = iter(loader)
    next(a)
    iter(loader)
    next(a)


def set_other_epoch_after_mid_epoch_load() -> None:
    state = mid_epoch_state()
    loader = sb()
    loader.load_state_dict(state)
    loader.set_epoch(3)


def other_world_size() -> None:
    state = mid_epoch_state()
    state["world_size"] = 2
    sb().load_state_dict(state)


def nonfinite_lowest() -> list:
    model = Returns(lambda x: torch.where(x[:, :1] == 2, float("nan"), x[:, :1]).repeat(1, 3))
    loader = sb(model=model, loss_fn=lambda out, y: out[:, 0], nonfinite="lowest", policy="topk")
    return [b[2].tolist() for b in loader]


CASES: list[tuple[str, Callable[[], Any], Any]] = [
    # ---------------------------------------------------------------- keep and policy
    *[(f"keep={v!r}", (lambda v=v: sb(keep=v)), (ValueError, r"keep must be in \(0, 1\], got keep=")) for v in [0, 0.0, -1, 1.5, True, "0.5", math.nan]],
    ("keep=tensor", lambda: sb(keep=torch.tensor(0.5)), (ValueError, r"keep=tensor\(0.5000\).*pass a Python float")),
    ("keep keeps no row", lambda: sb(keep=0.1), (ValueError, r"keep=0.1 keeps int\(0.1 \* 4\) = 0 rows.*at least 1/4")),
    ("keep vs policy object", lambda: sb(keep=0.25, policy=RankPolicy(0.5)), (ValueError, r"keep=0.25 but policy=RankPolicy.*keeps 0.5.*leave keep= out")),
    ("policy object's keep is used", lambda: sb(policy=RankPolicy(0.25), batch_size=8).keep == 0.25 or 1 / 0, ACCEPTED),
    ("keep=1 passes everything", lambda: len(list(sb(keep=1))) == 6 or 1 / 0, ACCEPTED),
    ("policy name", lambda: sb(policy="best"), (ValueError, r"policy must be one of .*got policy='best'")),
    ("policy object without methods", lambda: sb(policy=object()), (TypeError, r"policy must be a name or an object with .*BasePolicy")),
    # ---------------------------------------------------------------- sizes and schedule
    *[(f"batch_size={v!r}", (lambda v=v: sb(batch_size=v)), (ValueError, r"batch_size must be a positive int, got batch_size=")) for v in [0, -1, 2.5, True]],
    *[(f"epochs={v!r}", (lambda v=v: sb(epochs=v)), (ValueError, r"epochs must be a positive int, got epochs=")) for v in [0, -2, 1.5]],
    ("start without epochs", lambda: sb(start=0.5), (ValueError, r"start=0.5 .*pass epochs=")),
    ("end without epochs", lambda: sb(end=0.5), (ValueError, r"end=0.5 .*pass epochs=")),
    ("start < 0", lambda: sb(start=-0.1, epochs=4), (ValueError, r"start must be a training fraction in \[0, 1\], got start=-0.1")),
    ("end > 1", lambda: sb(end=1.5, epochs=4), (ValueError, r"end must be a training fraction in \[0, 1\], got end=1.5")),
    ("start > end", lambda: sb(start=0.8, end=0.2, epochs=4), (ValueError, r"start must be <= end, got start=0.8, end=0.2")),
    *[(f"interrupt={v!r}", (lambda v=v: sb(interrupt=v)), (ValueError, r"interrupt")) for v in [-1, 1, 2.0]],
    *[(f"scale_factor={v!r}", (lambda v=v: sb(scale_factor=v)), (ValueError, r"scale_factor must be in \(0, 1\]")) for v in [0, 1.5, "1"]],
    ("scale_factor with score_fn", lambda: sb(scale_factor=0.5, score_fn=lambda m, b: b[0][:, 0]), (ValueError, r"scale_factor=0.5 only applies to the built-in scoring pass")),
    ("scale_factor on 2-D inputs", lambda: first(sb(scale_factor=0.5)), (ValueError, r"scale_factor=0.5 needs 3-D, 4-D or 5-D inputs")),
    *[(f"stale={v!r}", (lambda v=v: sb(stale=v)), (ValueError, r"stale must be None or an int >= 1.*'once'.*got stale=")) for v in [0, -1, 1.5, True, "twice"]],
    *[(f"last_batch={v!r}", (lambda v=v: sb(last_batch=v)), (ValueError, r"last_batch must be one of \('yield', 'drop', 'carry'\), got last_batch=")) for v in ["keep", "DROP", ""]],
    ("last_batch follows drop_last", lambda: sb(dl(drop_last=True)).last_batch == "drop" or 1 / 0, ACCEPTED),
    ("scoring_mode", lambda: sb(scoring_mode="test"), (ValueError, r"scoring_mode must be 'eval' or 'train', got scoring_mode='test'")),
    ("nonfinite", lambda: sb(nonfinite="ignore"), (ValueError, r"nonfinite must be one of .*got nonfinite='ignore'")),
    *[(f"seed={v!r}", (lambda v=v: sb(seed=v)), (ValueError, r"seed must be an int in \[0, 2\*\*63\), got seed=")) for v in ["abc", 2**70, -1, 1.5]],
    ("device name", lambda: sb(device="gpu0"), (ValueError, r"device must be a torch.device .*got device='gpu0'")),
    # ---------------------------------------------------------------- callables and model
    ("score_fn not callable", lambda: sb(score_fn=3), (TypeError, r"score_fn must be callable .*got score_fn=3")),
    ("loss_fn not callable", lambda: sb(loss_fn="ce"), (TypeError, r"loss_fn must be callable .*got loss_fn='ce'")),
    ("autocast_dtype", lambda: sb(autocast_dtype="bf16"), (TypeError, r"autocast_dtype must be a torch.dtype .*got autocast_dtype='bf16'")),
    ("model not a module", lambda: SelectiveBatchLoader(dl(), lambda x: x), (TypeError, r"model must be a torch.nn.Module")),
    ("model returns a tuple", lambda: first(sb(model=Returns(lambda x: (x, x)), loss_fn=None)), (TypeError, r"model returned a tuple.*loss_fn=.*score_fn=")),
    ("model returns a dict", lambda: first(sb(model=Returns(lambda x: {"logits": x}), loss_fn=None)), (TypeError, r"model returned a dict.*loss_fn=.*score_fn=")),
    ("loss_fn returns a scalar", lambda: first(sb(loss_fn=lambda o, y: o.sum())), (ValueError, r"loss_fn must return one loss per example, shape \[4\], got shape \[\]; .*reduction='none'")),
    ("loss_fn returns [N, 2]", lambda: first(sb(loss_fn=lambda o, y: o)), (ValueError, r"loss_fn must return one loss per example, shape \[4\], got shape \[4, 2\]")),
    ("loss_fn returns NaN", lambda: first(sb(loss_fn=lambda o, y: o[:, 0] / 0 * 0)), (ValueError, r"loss_fn returned 4 non-finite .*example ids \[0, 1, 2, 3\].*nonfinite=")),
    ("score_fn returns a list", lambda: first(sb(score_fn=lambda m, b: [0.0] * 4)), (TypeError, r"score_fn must return a tensor of per-example losses of shape \[4\], got list")),
    ("score_fn returns inf", lambda: first(sb(score_fn=lambda m, b: torch.full((4,), math.inf))), (ValueError, r"score_fn returned 4 non-finite")),
    ("nonfinite='lowest' ranks NaN last", lambda: all(2 not in b for b in nonfinite_lowest()) or 1 / 0, ACCEPTED),
    ("reduction argument is set to none", lambda: len(list(sb(model=nn.Linear(2, 3), loss_fn=F.cross_entropy))) == 3 or 1 / 0, ACCEPTED),
    ("loss module reduction", lambda: len(list(sb(model=nn.Linear(2, 3), loss_fn=nn.CrossEntropyLoss()))) == 3 or 1 / 0, ACCEPTED),
    # ---------------------------------------------------------------- loaders and batches
    ("one-shot iterator", lambda: sb(iter([xy()])), (TypeError, r"one-shot iterator.*Pass a re-iterable")),
    ("not iterable", lambda: sb(42), (TypeError, r"loader must be a DataLoader, an FFCV Loader or a re-iterable of batches, got int")),
    ("DataLoader(batch_size=None)", lambda: sb(DataLoader(IndexedPairs(8), batch_size=None)), (ValueError, r"batch_size=None.*yields single examples.*give the DataLoader a batch_size")),
    ("list without batch_size", lambda: sb(batches(xy())), (ValueError, r"batch_size is needed: list has no batch_size.*pass batch_size=")),
    ("stale on a list without ids", lambda: sb(batches(xy()), stale=2, batch_size=4), (ValueError, r"stale=2 needs example ids.*index_key=")),
    ("input_key missing", lambda: first(sb(input_key="x")), (ValueError, r"input_key='x' was not found in the batch \(list of length 3\)")),
    ("target_key missing", lambda: first(sb(target_key=7)), (ValueError, r"target_key=7 was not found in the batch")),
    ("index_key missing", lambda: first(sb(index_key=5)), (ValueError, r"index_key=5 was not found in the batch")),
    ("index_key floats", lambda: first(sb(batches(xy(ids=torch.rand(4))), index_key=3, batch_size=4)), (ValueError, r"index_key=3 must give one integer id per example, shape \[4\], got torch.float32")),
    ("index_key negative", lambda: first(sb(batches(xy(ids=torch.arange(4) - 2)), index_key=3, batch_size=4)), (ValueError, r"example ids must be >= 0, got -2; index_key=3 must locate each example's index")),
    ("index_key wrong shape", lambda: first(sb(batches(xy()), index_key=lambda b: torch.arange(8), batch_size=4)), (ValueError, r"index_key=<function .*> must give one integer id per example, shape \[4\], got torch.int64 of shape \[8\]")),
    ("ids of different lengths", lambda: first(sb(batches(xy(ids=torch.arange(8))), index_key=3, batch_size=4)), (ValueError, r"every field of a batch needs the same leading \(batch\) size, got sizes \[4, 8\]")),
    ("index_key callable", lambda: len(list(sb(index_key=lambda b: b[2], stale=2))) == 3 or 1 / 0, ACCEPTED),
    ("sparse ids stay small", lambda: (lambda s: [list(s), s.cache.nbytes < 10_000][1] or 1 / 0)(sb(batches(xy(ids=torch.arange(4) * 10**8 + 7)), index_key=3, batch_size=4, stale=2)), ACCEPTED),
    ("ragged batch", lambda: first(sb(batches((torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))), batch_size=4)), (ValueError, r"every field of a batch needs the same leading \(batch\) size, got sizes \[3, 4\]")),
    ("0-dim tensor in a batch", lambda: first(sb(batches((torch.zeros(4, 2), torch.tensor(1))), batch_size=4)), (ValueError, r"0-dim tensor; every tensor needs a leading batch dimension")),
    ("unsupported leaf", lambda: first(sb(batches((torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), object())), batch_size=4)), (TypeError, r"batches must be made of tensors, dicts, lists and tuples, got a object leaf")),
    ("dtype changes mid-epoch", lambda: list(sb(batches(xy(6), (xy(6)[0].double(), *xy(6)[1:])), batch_size=4)), (ValueError, r"rows of shape \(2,\) torch.float32 are waiting to be re-packed but the next source batch has rows of \(2,\) torch.float64")),
    ("len of an unsized iterable", lambda: len(sb(_Stream(), batch_size=4)), (TypeError, r"len\(\) is unknown for a _Stream source until one epoch has been iterated")),
    # ---------------------------------------------------------------- record and weights
    ("record before a batch", lambda: sb().record(torch.zeros(4)), (RuntimeError, r"record\(\) was called before any batch was yielded")),
    ("record twice", lambda: (lambda s: [first(s), s.record(torch.zeros(4)), s.record(torch.zeros(4))])(sb()), (RuntimeError, r"record\(\) was called more times than batches were yielded")),
    ("record wrong shape", lambda: (lambda s: [first(s), s.record(torch.zeros(3))])(sb()), (ValueError, r"record\(\) must return one loss per example, shape \[4\], got shape \[3\]")),
    ("record NaN", lambda: (lambda s: [first(s), s.record(torch.tensor([0.0, math.nan, 0.0, 0.0]))])(sb()), (ValueError, r"record\(\) returned 1 non-finite")),
    ("record a list", lambda: (lambda s: [first(s), s.record([0.0, 0.0])])(sb()), (TypeError, r"record\(\) must return a tensor")),
    ("record unknown ids", lambda: (lambda s: [first(s), s.record(torch.zeros(4), ids=torch.tensor([99, 98, 97, 96]))])(sb()), (ValueError, r"record\(ids=...\) got ids \[99, 98, 97, 96\] that match no yielded, unrecorded batch")),
    ("record without ids is a checked no-op", lambda: (lambda s: [first(s), torch.equal(s.record(torch.ones(2)), torch.ones(2)) or 1 / 0])(sb(batches(xy()), batch_size=2)), ACCEPTED),
    ("batch_weights under read-ahead", read_ahead_weights, (RuntimeError, r"batch_weights is ambiguous.*sb.record\(per_example_losses\)")),
    ("record after 70 unrecorded batches", record_after_many, (RuntimeError, r"record\(\) cannot tell which batch.*ids=example_ids")),
    ("closed iterator", use_closed_iterator, (RuntimeError, r"closed by a newer iter\(\) of the same loader")),
    ("option set after construction", lambda: setattr(sb(), "keep", 0.25), (AttributeError, r"keep is fixed when a SelectiveBatchLoader is built.*keep=\.\.\.")),
    ("total_steps without epochs", lambda: sb().total_steps(), (ValueError, r"total_steps\(\) needs the number of training epochs; pass epochs=")),
    ("set_epoch(-1)", lambda: sb().set_epoch(-1), (ValueError, r"epoch must be a non-negative int, got epoch=-1")),
    ("set_epoch('1')", lambda: sb().set_epoch("1"), (ValueError, r"epoch must be a non-negative int, got epoch='1'")),
    ("set_epoch skips a loaded mid-epoch state", set_other_epoch_after_mid_epoch_load, (ValueError, r"the loaded state is in the middle of epoch 0, so set_epoch\(3\)")),
    # ---------------------------------------------------------------- checkpoints
    ("load {}", lambda: sb().load_state_dict({}), (ValueError, r"state_dict has format version None.*SelectiveBatchLoader.state_dict\(\)")),
    ("load a string", lambda: sb().load_state_dict("state"), (ValueError, r"state_dict has format version 'str'")),
    ("load other keep", lambda: sb(keep=0.25, batch_size=8).load_state_dict(state_of()), (ValueError, r"saved with keep=0.5 but this loader has keep=0.25")),
    ("load other batch size", lambda: sb(batch_size=2).load_state_dict(state_of()), (ValueError, r"saved with batch_size=4 but this loader has batch_size=2")),
    ("load other dataset size", lambda: sb(dl(28)).load_state_dict(state_of()), (ValueError, r"saved with num_examples=24 but this loader has num_examples=28")),
    ("load other policy", lambda: sb(policy="topk").load_state_dict(state_of()), (ValueError, r"saved with policy='RankPolicy' but this loader has policy='TopKPolicy'")),
    ("load other stale", lambda: sb(stale=2).load_state_dict(state_of()), (ValueError, r"saved with stale=None but this loader has stale=2")),
    ("load other last_batch", lambda: sb(last_batch="carry").load_state_dict(state_of()), (ValueError, r"saved with last_batch='yield' but this loader has last_batch='carry'")),
    ("load other interrupt", lambda: sb(interrupt=2).load_state_dict(state_of()), (ValueError, r"saved with interrupt=0 but this loader has interrupt=2")),
    ("load other seed", lambda: sb(seed=1).load_state_dict(state_of()), (ValueError, r"saved with seed=0 but this loader has seed=1")),
    ("load other schedule", lambda: sb(epochs=4, end=0.5).load_state_dict(state_of(epochs=4)), (ValueError, r"saved with schedule=\(4, 0.0, 1.0\) but this loader has schedule=\(4, 0.0, 0.5\)")),
    ("mid-epoch state on another world size", other_world_size, (ValueError, r"a mid-epoch state_dict saved on 2 ranks cannot resume on 1")),
    ("state right after load", lambda: (lambda s: [s.load_state_dict(mid_epoch_state()), s.state_dict()["position"]["yielded"] == 1 or 1 / 0])(sb()), ACCEPTED),
]


class _Stream:
    """A re-iterable with no length and no dataset."""

    def __iter__(self):
        yield xy()


def test_the_table_has_at_least_80_cases():
    assert len(CASES) >= 80


@pytest.mark.parametrize("name, run, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, run, expected):
    if expected is ACCEPTED:
        run()  # each accepted case checks its own result (``or 1 / 0`` fails it)
        return
    error, pattern = expected
    with pytest.raises(error, match=pattern):
        run()
