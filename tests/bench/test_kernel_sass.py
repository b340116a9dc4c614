"""The round-2 forward row kernel issues fewer instructions per element than round 1's, counted in its sm90
SASS (compiled ahead of time, no GPU), and spills nothing."""
import pytest


def test_round2_row_kernel_issues_fewer_instructions():
    pytest.importorskip("triton.backends.nvidia")
    from bench.kernel_sass import stats
    rows = {r["kernel"]: r for r in stats()}
    assert all(r["stack_bytes"] == 0 for r in rows.values()), rows
    # measured: 15.75 / 10.75 per element (round 1: 23.94 / 18.94)
    assert rows["round2_lanes_entropy"]["per_element"] <= 17, rows
    assert rows["round2_lanes"]["per_element"] <= 12, rows
    assert rows["round2_lanes_entropy"]["per_element"] < 0.75 * rows["round1_blocks_entropy"]["per_element"]
    assert rows["round2_lanes"]["per_element"] < 0.65 * rows["round1_blocks"]["per_element"]
