"""Every misuse gets an exception whose message names the argument, the value and the fix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sbdata import SelectiveBatchLoader, ThresholdPolicy

from .conftest import consecutive_ids, id_loss, make_batch


def _batches(sizes=(4, 4)):
    return [make_batch("tuple", ids) for ids in consecutive_ids(list(sizes))]


def _xy(sizes=(4, 4), classes=3):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(n, classes, generator=gen), torch.randint(0, classes, (n,), generator=gen)) for n in sizes]


def _make(loader=None, model=None, **kwargs):
    kwargs.setdefault("batch_size", 2)
    return SelectiveBatchLoader(_xy() if loader is None else loader, model or nn.Identity(), **kwargs)


# ---------------------------------------------------------------- constructor arguments


@pytest.mark.parametrize("keep", [0, 0.0, -1, 1.5, True, "0.5", math.nan])
def test_keep_outside_zero_one_is_rejected(keep):
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\], got keep="):
        _make(keep=keep)


@pytest.mark.parametrize("keep", [0.5, 1, 1.0])
def test_keep_inside_zero_one_is_accepted(keep):
    assert _make(keep=keep).keep == float(keep)


def test_a_keep_that_keeps_no_row_of_a_source_batch_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"keep=1e-06 keeps int\(1e-06 \* 4\) = 0 rows of each source batch of 4; raise keep to at least 1/4"):
        _make(keep=1e-6)


@pytest.mark.parametrize("kwargs", [{"start": 0.5}, {"end": 0.9}, {"start": 0.2, "end": 0.8}])
def test_start_or_end_without_epochs_asks_for_epochs(kwargs):
    with pytest.raises(ValueError, match=r"epochs=.*pass epochs=<total training epochs>"):
        _make(**kwargs)


def test_start_and_end_at_their_defaults_need_no_epochs():
    _make(start=0.0, end=1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"start": -0.1, "epochs": 10}, r"start must be a training fraction in \[0, 1\], got start=-0.1"),
        ({"end": 1.5, "epochs": 10}, r"end must be a training fraction in \[0, 1\], got end=1.5"),
        ({"start": 0.8, "end": 0.2, "epochs": 10}, r"start must be <= end"),
        ({"epochs": 0}, r"epochs must be a positive int, got epochs=0"),
    ],
)
def test_bad_schedule_fractions_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _make(**kwargs)


def test_interrupt_one_is_rejected_because_it_never_selects():
    with pytest.raises(ValueError, match=r"interrupt=1 would pass every batch through.*interrupt=0"):
        _make(interrupt=1)


@pytest.mark.parametrize("interrupt", [-1, 2.5])
def test_interrupt_must_be_a_non_negative_int(interrupt):
    with pytest.raises(ValueError, match=rf"interrupt must be an int >= 0 .*got interrupt={interrupt}"):
        _make(interrupt=interrupt)


@pytest.mark.parametrize("scale_factor", [0, 0.0, -0.5, 1.5, 2, "half"])
def test_scale_factor_outside_zero_one_is_rejected(scale_factor):
    with pytest.raises(ValueError, match=r"scale_factor must be in \(0, 1\], got scale_factor="):
        _make(scale_factor=scale_factor)


def test_scale_factor_on_two_dimensional_inputs_is_rejected_when_scoring():
    sb = _make(scale_factor=0.5)
    with pytest.raises(ValueError, match=r"scale_factor=0.5 needs 3-D, 4-D or 5-D inputs.*shape \(4, 3\)"):
        list(sb)


def test_scale_factor_together_with_score_fn_is_rejected():
    with pytest.raises(ValueError, match=r"scale_factor=0.5 only applies to the built-in scoring pass"):
        _make(scale_factor=0.5, score_fn=lambda m, b: id_loss(b[1]))


@pytest.mark.parametrize("last_batch", ["keep", "", "DROP"])
def test_bad_last_batch_is_rejected(last_batch):
    with pytest.raises(ValueError, match=r"last_batch must be one of \('yield', 'drop', 'carry'\), got last_batch="):
        _make(last_batch=last_batch)


@pytest.mark.parametrize("stale", [0, -1, 1.5, True])
def test_stale_must_be_none_or_a_positive_int(stale):
    with pytest.raises(ValueError, match=rf"stale must be None or an int >= 1 .*got stale={stale}"):
        _make(stale=stale)


def test_stale_on_a_plain_list_of_batches_without_index_key_explains_index_key():
    with pytest.raises(ValueError, match=r"stale=2 needs example ids.*list does not provide.*index_key="):
        _make(_batches(), stale=2)


def test_stale_on_a_plain_list_with_index_key_is_accepted():
    _make(_batches(), stale=2, index_key=2)


@pytest.mark.parametrize("batch_size", [0, -3, 2.0, True])
def test_bad_batch_size_is_rejected(batch_size):
    with pytest.raises(ValueError, match=r"batch_size must be a positive int, got batch_size="):
        _make(batch_size=batch_size)


def test_a_source_without_batch_size_needs_one():
    with pytest.raises(ValueError, match=r"batch_size is needed: list has no batch_size.*pass batch_size="):
        SelectiveBatchLoader(_xy(), nn.Identity())


def test_scoring_mode_must_be_eval_or_train():
    with pytest.raises(ValueError, match=r"scoring_mode must be 'eval' or 'train', got scoring_mode='test'"):
        _make(scoring_mode="test")


def test_an_unknown_policy_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"policy must be one of \[.*'rank'.*'topk'.*\].*got policy='best'"):
        _make(policy="best")


def test_a_policy_object_without_the_interface_is_rejected():
    with pytest.raises(TypeError, match=r"policy must be a name or an object with exact, count\(n\)"):
        _make(policy=object())


def test_bad_threshold_settings_are_rejected():
    with pytest.raises(ValueError, match=r"history_size must be a positive integer, got history_size=0"):
        ThresholdPolicy(0.5, history_size=0)
    with pytest.raises(ValueError, match=r"beta must be >= 0, got beta=-1"):
        ThresholdPolicy(0.5, beta=-1)


def test_the_model_must_be_a_module():
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module .*got function"):
        SelectiveBatchLoader(_xy(), lambda x: x, batch_size=2)


def test_loss_fn_and_score_fn_must_be_callable():
    with pytest.raises(TypeError, match=r"loss_fn must be callable"):
        _make(loss_fn="cross_entropy")
    with pytest.raises(TypeError, match=r"score_fn must be callable"):
        _make(score_fn="mine")


# ---------------------------------------------------------------- loaders


def test_a_one_shot_generator_is_rejected_as_loader():
    gen = (b for b in _xy())
    with pytest.raises(TypeError, match=r"loader is a one-shot iterator \(generator\).*re-iterable"):
        _make(gen)


def test_an_iterator_over_a_list_is_rejected_as_loader():
    with pytest.raises(TypeError, match=r"one-shot iterator \(list_iterator\)"):
        _make(iter(_xy()))


def test_a_non_iterable_loader_is_rejected():
    with pytest.raises(TypeError, match=r"loader must be a DataLoader, an FFCV Loader or a re-iterable"):
        _make(42)


class _Stream:
    """A re-iterable whose batch sizes cannot be known before it has been iterated."""

    def __iter__(self):
        yield from _xy((4, 4, 2))


def test_len_of_a_generic_iterable_is_known_only_after_its_first_epoch():
    sb = _make(_Stream(), loss_fn=lambda o, t: o.sum(1))
    with pytest.raises(TypeError, match=r"len\(\) is unknown for a _Stream source until one epoch"):
        len(sb)
    n = len(list(sb))
    assert len(sb) == n == 3  # 2 + 2 + 1 rows kept, re-packed by 2


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda o, t: F.cross_entropy(o, t).mean(),
        lambda o, t: o.sum(),
    ],
    ids=["mean-cross-entropy", "sum"],
)
def test_a_loss_that_returns_a_scalar_says_to_use_reduction_none(loss_fn):
    with pytest.raises(ValueError, match=r"loss_fn must return one loss per example, shape \[4\], got shape \[\]; .*reduction='none'"):
        list(_make(loss_fn=loss_fn))


def test_a_lambda_calling_cross_entropy_without_reduction_is_caught():
    sb = _make(loss_fn=lambda o, t: F.cross_entropy(o, t))
    with pytest.raises(ValueError, match=r"got shape \[\]; it returned a scalar: use reduction='none'"):
        next(iter(sb))


def test_a_module_loss_without_a_reduction_attribute_returning_a_scalar_is_caught():
    class MeanLoss(nn.Module):
        def forward(self, outputs, targets):
            return F.cross_entropy(outputs, targets)

    with pytest.raises(ValueError, match=r"loss_fn must return one loss per example.*got shape \[\]"):
        list(_make(loss_fn=MeanLoss()))


@pytest.mark.parametrize(
    "loss_fn, shape",
    [
        (lambda o, t: F.cross_entropy(o, t, reduction="none")[:, None], r"\[4, 1\]"),
        (lambda o, t: F.cross_entropy(o, t, reduction="none")[:-1], r"\[3\]"),
        (lambda o, t: o, r"\[4, 3\]"),
    ],
    ids=["N-by-1", "N-minus-1", "unreduced"],
)
def test_a_loss_of_the_wrong_shape_is_caught(loss_fn, shape):
    with pytest.raises(ValueError, match=rf"loss_fn must return one loss per example, shape \[4\], got shape {shape}"):
        list(_make(loss_fn=loss_fn))


def test_a_score_fn_returning_a_list_names_score_fn():
    sb = _make(score_fn=lambda m, b: [0.0] * 4)
    with pytest.raises(TypeError, match=r"score_fn must return a tensor of per-example losses of shape \[4\], got list"):
        list(sb)


def test_a_score_fn_of_the_wrong_shape_names_score_fn():
    sb = _make(score_fn=lambda m, b: torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"score_fn must return one loss per example, shape \[4\], got shape \[4, 2\]"):
        list(sb)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_losses_name_their_batch_positions(bad):
    def score(model, batch):
        losses = torch.ones(len(batch[0]))
        if batch[2][0] == 4:  # second batch, positions 1 and 3
            losses[1] = losses[3] = bad
        return losses

    sb = _make(_batches(), score_fn=score)
    it = iter(sb)
    next(it)  # the first batch is fine
    with pytest.raises(ValueError, match=r"score_fn returned 2 non-finite \(NaN or infinite\) losses at batch positions \[1, 3\]"):
        list(it)


def test_non_finite_losses_name_example_ids_when_they_are_known():
    def loss_fn(outputs, targets):
        losses = torch.ones(len(targets))
        losses[2] = math.nan
        return losses

    batches = [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), ids + 100) for ids in consecutive_ids([4])]
    sb = _make(batches, loss_fn=loss_fn, index_key=2)
    with pytest.raises(ValueError, match=r"loss_fn returned 1 non-finite .* at example ids \[102\]"):
        list(sb)


# ---------------------------------------------------------------- batch fields


def test_input_key_not_in_a_tuple_batch_is_named():
    with pytest.raises(ValueError, match=r"input_key='image' was not found in the batch \(tuple of length 2\); pass input_key="):
        list(_make(input_key="image"))


def test_target_key_beyond_a_tuple_batch_is_named():
    with pytest.raises(ValueError, match=r"target_key=5 was not found in the batch \(tuple of length 2\); pass target_key="):
        list(_make(target_key=5))


def test_default_keys_on_a_dict_batch_name_the_keys_it_has():
    batches = [{"image": torch.randn(4, 3), "label": torch.zeros(4, dtype=torch.long)}]
    with pytest.raises(ValueError, match=r"input_key=0 was not found in the batch \(dict with keys \['image', 'label'\]\)"):
        list(_make(batches))


def test_index_key_not_in_the_batch_is_named():
    with pytest.raises(ValueError, match=r"index_key='id' was not found in the batch"):
        list(_make(index_key="id"))


def test_index_key_of_the_wrong_shape_is_rejected():
    batches = [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"index_key=2 must give one integer id per example, shape \[4\]"):
        list(_make(batches, index_key=2))


def test_fields_of_different_lengths_are_rejected():
    batches = [(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"every field of a batch needs the same leading \(batch\) size, got sizes \[3, 4\]"):
        list(_make(batches, loss_fn=lambda o, t: o.sum(1)))


# ---------------------------------------------------------------- record()


def _recording_loader():
    return _make(_batches((4, 4, 4)), index_key=2, score_fn=lambda m, b: id_loss(b[2]), keep=0.5)


def test_record_before_any_batch_is_an_error():
    sb = _recording_loader()
    with pytest.raises(RuntimeError, match=r"record\(\) was called before any batch was yielded"):
        sb.record(torch.zeros(2))


def test_record_without_ids_or_cache_is_a_checked_no_op():
    sb = _make(_batches(), score_fn=lambda m, b: id_loss(b[2]))
    batch = next(iter(sb))
    n = len(batch[0])
    with pytest.raises(ValueError, match=rf"record\(\) must return one loss per example, shape \[{n}\]"):
        sb.record(torch.zeros(n + 1))
    sb.record(torch.zeros(n))  # allowed in every mode; nothing to cache without ids
    assert sb.stats.current.recorded == 0 and sb.cache.known_count() == 0


def test_record_checks_the_shape_and_values_and_accepts_one_call_per_batch():
    sb = _recording_loader()
    it = iter(sb)
    batch = next(it)
    with pytest.raises(ValueError, match=r"record\(\) must return one loss per example, shape \[2\], got shape \[3\]"):
        sb.record(torch.zeros(3))
    with pytest.raises(ValueError, match=r"record\(\) must return one loss per example, shape \[2\], got shape \[\]"):
        sb.record(torch.tensor(1.0))
    bad = torch.tensor([0.5, math.nan])
    with pytest.raises(ValueError, match=rf"record\(\) returned 1 non-finite .* at example ids \[{int(batch[2][1])}\]"):
        sb.record(bad)
    sb.record(torch.tensor([0.5, 0.25]))
    assert sb.stats.current.recorded == 2
    with pytest.raises(RuntimeError, match=r"record\(\) was called more times than batches were yielded"):
        sb.record(torch.tensor([0.5, 0.25]))
    next(it)
    sb.record(torch.tensor([1.0, 2.0]))  # the next batch may be recorded again


def test_set_epoch_rejects_negative_or_non_int_epochs():
    sb = _make()
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ValueError, match=r"epoch must be a non-negative int, got epoch="):
            sb.set_epoch(bad)
