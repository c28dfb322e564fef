"""FedAvg's arithmetic, fast and in process (the end-to-end template test only checks accuracy, which an
unweighted mean passes too)."""

from __future__ import annotations

import pytest
import torch

from runtime.workloads.federate import bytes_to_state, fedavg, state_to_bytes

pytestmark = pytest.mark.unit  # in process, no servers: `make test-unit` (under 10 s)


def test_updates_are_weighted_by_their_sample_counts() -> None:
    a = {"w": torch.tensor([0.0, 10.0]), "b": torch.tensor(1.0)}
    b = {"w": torch.tensor([4.0, 2.0]), "b": torch.tensor(5.0)}
    out = fedavg([(1, a), (3, b)])  # b saw three times the data
    assert torch.allclose(out["w"], torch.tensor([3.0, 4.0]))  # not the unweighted [2, 6]
    assert torch.allclose(out["b"], torch.tensor(4.0))
    assert out["w"].dtype == torch.float32


def test_integer_counters_come_from_the_biggest_update_and_dtypes_are_kept() -> None:
    small = {"bn.num_batches_tracked": torch.tensor(7), "h": torch.tensor([1.0], dtype=torch.float16)}
    big = {"bn.num_batches_tracked": torch.tensor(90), "h": torch.tensor([3.0], dtype=torch.float16)}
    out = fedavg([(10, small), (30, big)])
    assert out["bn.num_batches_tracked"].item() == 90  # not averaged into a fraction
    assert out["h"].dtype == torch.float16 and torch.allclose(out["h"].float(), torch.tensor([2.5]))


def test_no_samples_at_all_is_a_plain_mean_and_no_updates_is_an_error() -> None:
    out = fedavg([(0, {"w": torch.tensor(2.0)}), (0, {"w": torch.tensor(4.0)})])
    assert out["w"].item() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        fedavg([])


def test_weights_travel_as_bytes_and_come_back_equal() -> None:
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor(3)}
    back = bytes_to_state(state_to_bytes(state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
