"""Every shipped search space loads, and every variant's points merge into known params."""

from __future__ import annotations

import pytest

from bench.registry import get_task
from bench.space import load_space, merge_params, spaces_dir

FILES = sorted(spaces_dir().glob("*.yaml"))


def test_spaces_are_shipped() -> None:
    assert {p.stem for p in FILES} >= {"vae", "synthetic"}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_shipped_space_is_valid(path) -> None:
    space = load_space(path)
    task = get_task(space.task)
    assert path.stem == space.task.replace("-", "_")
    for variant in space.variants.values():
        for point in variant.points():
            merged = merge_params(task, space, variant, point, {})
            assert set(merged) == set(task.defaults)
        assert (variant.metric or space.metric)
