"""Re-packing directly: rows copied once into fresh batches, order, layout and dtype kept."""

from __future__ import annotations

import pytest
import torch

from sbdata.repack import Repacker, count_output_batches

from .conftest import features, make_batch, names


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _byte_range(a), _byte_range(b)
    return a0 < b1 and b0 < a1


def test_rows_are_copied_in_order_across_source_batches():
    packer = Repacker(4)
    a = make_batch("tuple", torch.arange(0, 6))
    b = make_batch("tuple", torch.arange(6, 12))
    assert packer.add(a, torch.tensor([1, 3, 5])) == []
    assert len(packer) == 3
    (full,) = packer.add(b, torch.tensor([0, 2, 4]))
    assert full[2].tolist() == [1, 3, 5, 6]
    assert torch.equal(full[0], features(full[2]))
    assert len(packer) == 2
    tail = packer.flush()
    assert tail[2].tolist() == [8, 10]
    assert packer.flush() is None and len(packer) == 0


def test_one_add_can_complete_several_batches():
    packer = Repacker(2)
    batch = make_batch("dict", torch.arange(7))
    done = packer.add(batch, torch.arange(7))
    assert [b["id"].tolist() for b in done] == [[0, 1], [2, 3], [4, 5]]
    assert [b["name"] for b in done] == [["ex0", "ex1"], ["ex2", "ex3"], ["ex4", "ex5"]]
    assert packer.flush()["id"].tolist() == [6]


def test_output_does_not_share_storage_with_the_source():
    x = torch.randn(8, 3, 4)
    y = torch.arange(8)
    packer = Repacker(4)
    (full,) = packer.add((x, y), torch.tensor([0, 2, 4, 6, 7]))
    tail = packer.flush()
    for out in (full, tail):
        for got, src in zip(out, (x, y)):
            assert not _overlaps(got, src)
    assert not _overlaps(full[0], tail[0])


def test_mutating_the_source_after_add_leaves_the_output_unchanged():
    x = torch.arange(24.0).reshape(6, 4)
    names_list = [f"n{i}" for i in range(6)]
    batch = {"x": x, "name": names_list}
    packer = Repacker(3)
    (full,) = packer.add(batch, torch.tensor([0, 1, 3, 5]))
    expect_full, expect_tail = x[[0, 1, 3]].clone(), x[[5]].clone()
    x.fill_(-1.0)  # as a recycling loader (FFCV) would
    names_list[:] = ["gone"] * 6
    tail = packer.flush()
    assert torch.equal(full["x"], expect_full)
    assert torch.equal(tail["x"], expect_tail)
    assert full["name"] == ["n0", "n1", "n3"] and tail["name"] == ["n5"]


def test_output_batches_are_fresh_each_time():
    packer = Repacker(2)
    first = packer.add((torch.arange(4.0),), torch.tensor([0, 1]))[0]
    second = packer.add((torch.arange(4.0) + 10,), torch.tensor([2, 3]))[0]
    assert first[0].tolist() == [0.0, 1.0] and second[0].tolist() == [12.0, 13.0]
    assert not _overlaps(first[0], second[0])


def test_channels_last_and_float16_are_preserved():
    x = torch.randn(6, 3, 4, 5).to(memory_format=torch.channels_last)
    h = torch.randn(6, 7).half()
    packer = Repacker(4)
    (full,) = packer.add((x, h), torch.tensor([5, 0, 2, 3]))
    tail_src = torch.randn(6, 3, 4, 5).to(memory_format=torch.channels_last)
    packer.add((tail_src, h), torch.tensor([1]))
    tail = packer.flush()
    for out in (full, tail):
        assert out[0].is_contiguous(memory_format=torch.channels_last)
        assert not out[0].is_contiguous()
        assert out[0].dtype == torch.float32
        assert out[1].dtype == torch.float16
    assert torch.equal(full[0], x[[5, 0, 2, 3]])
    assert torch.equal(full[1], h[[5, 0, 2, 3]])
    assert torch.equal(tail[0], tail_src[[1]])


def test_every_structure_is_rebuilt_with_its_types():
    for kind in ("tuple", "dict", "nested", "namedtuple"):
        packer = Repacker(3)
        (out,) = packer.add(make_batch(kind, torch.arange(10, 15)), torch.tensor([4, 1, 2]))
        src = make_batch(kind, torch.tensor([14, 11, 12]))
        assert type(out) is type(src)
        if kind == "nested":
            assert type(out["pair"]) is tuple
            assert out["meta"]["name"] == names(torch.tensor([14, 11, 12]))
        flat_out, flat_src = _leaves(out), _leaves(src)
        assert len(flat_out) == len(flat_src)
        for a, b in zip(flat_out, flat_src):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def _leaves(batch):
    if isinstance(batch, dict):
        return [leaf for v in batch.values() for leaf in _leaves(v)]
    if isinstance(batch, tuple):
        return [leaf for v in batch for leaf in _leaves(v)]
    return [batch]


def test_a_tuple_of_strings_stays_a_tuple():
    packer = Repacker(2)
    (out,) = packer.add((torch.arange(3), ("a", "b", "c")), torch.tensor([0, 2]))
    assert out[1] == ("a", "c")


def test_a_changed_row_shape_or_structure_while_rows_wait_is_an_error():
    packer = Repacker(4)
    packer.add((torch.zeros(3, 2),), torch.tensor([0]))
    with pytest.raises(ValueError, match="row"):
        packer.add((torch.zeros(3, 5),), torch.tensor([0]))
    packer.clear()
    packer.add({"x": torch.zeros(3)}, torch.tensor([0]))
    with pytest.raises(ValueError, match="structure"):
        packer.add({"z": torch.zeros(3)}, torch.tensor([0]))


def test_clear_drops_the_pending_rows():
    packer = Repacker(4)
    packer.add((torch.arange(5),), torch.tensor([0, 1]))
    packer.clear()
    assert len(packer) == 0 and packer.flush() is None


@pytest.mark.parametrize(
    "kept, batch_size, last_batch, carried, expected",
    [
        ([3, 3, 3], 4, "yield", 0, 3),
        ([3, 3, 3], 4, "drop", 0, 2),
        ([3, 3, 3], 4, "carry", 0, 2),
        ([3, 3, 2], 4, "yield", 0, 2),
        ([3, 3, 3], 4, "yield", 3, 3),
        ([3, 3, 3], 4, "drop", 3, 3),
        ([0, 0], 4, "yield", 0, 0),
    ],
)
def test_count_output_batches(kept, batch_size, last_batch, carried, expected):
    assert count_output_batches(kept, batch_size, last_batch, carried) == expected
