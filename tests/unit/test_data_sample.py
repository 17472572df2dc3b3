"""Sample batching: collate to [B, T] tensors and packing for the model, with offsets checked."""

from __future__ import annotations

import pytest
import torch

from orbit.data.sample import Sample, collate, group_samples, pack_samples, pad_2d


def _samples() -> list[Sample]:
    return [
        Sample(
            prompt_ids=[1, 2],
            response_ids=[3, 4, 5],
            rollout_logprobs=[-0.1, -0.2, -0.3],
            reward=1.0,
            group_id=4,
        ),
        Sample(
            prompt_ids=[6],
            response_ids=[7],
            rollout_logprobs=[-0.5],
            reward=0.0,
            group_id=9,
            index=0,
        ),
        Sample(
            prompt_ids=[8, 9, 10],
            response_ids=[11, 12],
            rollout_logprobs=[-1.0, -2.0],
            group_id=4,
            index=1,
        ),
    ]


def test_collate() -> None:
    b = collate(_samples())
    assert b.rewards.tolist() == [1.0, 0.0, 0.0] and b.group_ids.tolist() == [4, 9, 4]
    assert b.response_mask.tolist() == [
        [True, True, True],
        [True, False, False],
        [True, True, False],
    ]
    torch.testing.assert_close(
        b.rollout_logprobs, torch.tensor([[-0.1, -0.2, -0.3], [-0.5, 0, 0], [-1.0, -2.0, 0]])
    )
    assert b.response_lengths.tolist() == [3, 1, 2]
    assert list(group_samples(_samples())) == [4, 9]


def test_pack_and_to_padded_offsets() -> None:
    p = pack_samples(_samples())
    assert p.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert p.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4]
    assert p.cu_seqlens.tolist() == [0, 5, 7, 12]
    assert p.targets.tolist() == [2, 3, 4, 5, 0, 7, 0, 9, 10, 11, 12, 0]
    # the position that predicts each response token has that token as its target
    picked = p.to_padded(p.targets.float())
    assert picked.tolist() == [[3, 4, 5], [7, 0, 0], [11, 12, 0]]
    # trailing dims ride along: [N, 2] -> [B, T, 2]
    two = p.to_padded(torch.stack([p.targets.float(), -p.targets.float()], dim=-1))
    assert (
        two.shape == (3, 3, 2)
        and two[2, 1].tolist() == [12.0, -12.0]
        and two[1, 2].tolist() == [0.0, 0.0]
    )


def test_errors_name_the_sample() -> None:
    with pytest.raises(ValueError, match="rollout_logprobs has 1 entries for 2 response_ids"):
        Sample(prompt_ids=[1], response_ids=[2, 3], rollout_logprobs=[0.0], group_id=5)
    with pytest.raises(ValueError, match="group 2, index 1"):
        pack_samples([Sample(prompt_ids=[1], response_ids=[], group_id=2, index=1)])
    with pytest.raises(ValueError, match="per_position has 3 rows"):
        pack_samples(_samples()).to_padded(torch.zeros(3))
    assert pad_2d([[], [1, 2]]).tolist() == [[0, 0], [1, 2]]
