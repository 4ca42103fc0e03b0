"""Draft-model drafter: tree-shape checks (the lossless-equality and sampling tests cover its output)."""

import pytest

from drafters.draft_model import DraftModelDrafter
from specdec.errors import ConfigError
from tests.tiny import tiny_llama


def test_choices_with_a_rank_gap_are_refused():
    # rank 1 missing under the root: sampling without replacement would skip a drawn sibling (lossy)
    with pytest.raises(ConfigError, match="without gaps"):
        DraftModelDrafter(model=tiny_llama(1), choices=[[0], [2]])


def test_default_shapes_are_accepted():
    d = DraftModelDrafter(model=tiny_llama(1), depth=3, width=2)
    assert d.grower.shape.parents == [-1, 0, 0, 1, 2, 3, 4] and d.grower.shape.ranks == [-1, 0, 1, 0, 0, 0, 0]


def test_missing_path_names_the_fix():
    with pytest.raises(ConfigError, match="drafter.path"):
        DraftModelDrafter()
