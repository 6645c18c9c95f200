"""The scale benchmark (sbdata.bench.scale) at tiny sizes: it runs, and measures a stale epoch."""

from __future__ import annotations

import json

import pytest

from sbdata.bench import scale

ROW_FIELDS = (
    "raw_first_batch_ms",
    "stale_first_batch_ms",
    "first_batch_ratio",
    "stale_step_overhead_us",
    "boundary_state_bytes_per_example",
    "mid_state_bytes_per_example",
    "cache_fill",
)


def _check_rows(rows: list[dict], ranks: int) -> None:
    assert rows, f"no rows for {ranks} rank(s)"
    for row in rows:
        assert "error" not in row, row["error"]
        assert row["measured_mode"] == "stale" and row["measured_epoch"] == 1
        for field in ROW_FIELDS:
            assert row[field] is not None, field
        assert row["raw_first_batch_ms"] > 0 and row["stale_first_batch_ms"] > 0
        assert row["boundary_state_bytes_per_example"] > 0
        assert row["mid_state_bytes_per_example"] > 0


def test_quick_run_measures_a_stale_epoch(tmp_path):
    results = scale.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "scale.json").read_text())
    assert saved["meta"] == json.loads(json.dumps(results["meta"]))
    assert (tmp_path / "scale.md").read_text().startswith("# sbdata scale benchmark")
    rows = saved["rows"]
    assert [r["n"] for r in rows] == scale.QUICK_SIZES
    _check_rows(rows, 1)
    # the small size fills the cache by a fresh epoch, the large one by a synthesized state checked against it
    assert rows[0]["cache_fill"] == "fresh epoch" and rows[0]["fresh_step_overhead_us"] is not None
    assert rows[1]["cache_fill"] == "synthesized state"
    assert saved["meta"]["synthesis_checked"] is True
    sized = saved["sizing"]["variants"]["replicated"]
    assert sized["boundary_state_bytes"]["value"] > 0


def test_scaled_state_refuses_an_unknown_layout():
    with pytest.raises(RuntimeError, match="cannot scale"):
        small = {"n0": 100, "cache": None, "rank": 0, "world": 1, "shard": False}
        scale.scaled({"loss": scale.torch.rand(100)}, small, 1000)  # random values: not losses of ids 0..99


def test_traffic_counts_what_a_rank_sends():
    assert scale.payload("all_gather", {"tensor": scale.torch.zeros(10), "tensor_list": [scale.torch.zeros(10)] * 2}, 0, 2) == (
        40,
        40,
    )
    assert scale.payload("broadcast", {"tensor": scale.torch.zeros(4, dtype=scale.torch.int64), "src": 0}, 1, 2) == (0, 32)


@pytest.mark.slow
def test_quick_run_on_two_ranks(tmp_path):
    results = scale.main(["--quick", "--sizes", "--ranks", "2", "--out", str(tmp_path)])
    rows = [r for r in results["rows"] if r["ranks"] == 2 and not r.get("na")]
    _check_rows(rows, 2)
    for row in rows:
        assert row["traffic_received"] > 0  # the ranks exchange record() losses at the epoch's end
        assert len(row["per_rank"]) == 2
    if not scale.has_shard_cache():
        assert any(r.get("na") for r in results["rows"] if r["ranks"] == 2)


def test_traffic_excludes_a_ranks_own_part_of_an_all_to_all():
    torch = scale.torch
    args = {"input": torch.zeros(6, dtype=torch.int64), "output": torch.zeros(5, dtype=torch.int64)}
    args.update(input_split_sizes=[2, 4], output_split_sizes=[2, 3])
    assert scale.payload("all_to_all_single", args, 0, 2) == (32, 24)
    reduce_scatter = {"output": torch.zeros(3), "input_list": [torch.zeros(3), torch.zeros(3)]}
    assert scale.payload("reduce_scatter", reduce_scatter, 1, 2) == (12, 12)
