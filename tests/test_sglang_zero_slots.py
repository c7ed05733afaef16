"""The SGLang backend's zero-slot hand-off and per-request slot counts (pure functions)."""

import base64

import numpy as np
import pytest
import torch

from zeda_core import ZedaError
from zeda_server.sglang_models.zero_slots import SKIPPED_SLOT, hand_off_zero_slots, routed_slot_counts


def test_zero_slots_become_skipped_with_zero_weight() -> None:
    ids = torch.tensor([[0, 9], [8, 11], [3, 7]], dtype=torch.int32)  # N = 8: ids 8.. are zero slots
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    new_ids, new_weights = hand_off_zero_slots(ids, weights, num_experts=8)
    assert new_ids.tolist() == [[0, SKIPPED_SLOT], [SKIPPED_SLOT, SKIPPED_SLOT], [3, 7]]
    torch.testing.assert_close(new_weights, torch.tensor([[0.6, 0.0], [0.0, 0.0], [0.5, 0.5]]))
    assert new_ids.dtype == torch.int32 and ids[0, 1] == 9  # inputs untouched
    assert not (new_ids == 0)[new_weights == 0].any()  # never remapped onto expert 0


def test_routed_experts_payload_counts_real_and_zero_slots() -> None:
    ids = np.array([[[0, 9], [8, 1]], [[2, 3], [10, 11]], [[12, 4], [5, 6]]], dtype="<i4")  # [3 tokens, 2 layers, K=2]
    encoded = base64.b64encode(ids.tobytes()).decode()
    counts = routed_slot_counts(encoded, num_layers=2, top_k=2, num_experts=8, moe_layers=[0, 1])
    assert counts.tolist() == [[4, 2], [3, 3]]


def test_rows_of_dense_layers_are_not_counted() -> None:
    """The capture holds a row per decoder layer; a dense layer's row is never written (zeros)."""
    ids = np.zeros((2, 3, 2), dtype="<i4")  # [2 tokens, 3 layers (layer 0 dense), K=2]
    ids[:, 1] = [[9, 1], [2, 3]]
    ids[:, 2] = [[10, 11], [4, 12]]
    counts = routed_slot_counts(base64.b64encode(ids.tobytes()).decode(), 3, 2, 8, moe_layers=[1, 2])
    assert counts.tolist() == [[3, 1], [1, 3]]


@pytest.mark.parametrize(("payload", "message"), [("%%%", "not base64"), (base64.b64encode(b"abc").decode(), "bytes")])
def test_bad_routed_experts_payload(payload: str, message: str) -> None:
    with pytest.raises(ZedaError, match=message):
        routed_slot_counts(payload, num_layers=2, top_k=2, num_experts=8, moe_layers=[0, 1])
