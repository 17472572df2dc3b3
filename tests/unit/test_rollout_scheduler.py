"""The rollout scheduler's policy (slots, prefill groups, finish checks), without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orbit.rollout.scheduler import Scheduler
from orbit.rollout.types import SamplingParams


def _drain_decode(s: Scheduler, token: int = 7) -> None:
    step = s.schedule()
    assert step.kind == "decode"
    s.append(step.seqs, [token] * len(step.seqs), [-1.0] * len(step.seqs))


def test_scheduler_imports_no_torch() -> None:
    code = (
        "import sys, orbit.rollout.scheduler, orbit.rollout.types; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_group_prefilled_once_and_slots_recycled() -> None:
    s = Scheduler(num_slots=3, max_model_len=64, max_prefill_tokens=100)
    p = SamplingParams(max_new_tokens=2)
    s.add(0, [1, 2, 3], 2, p, keys=[10, 11])
    s.add(1, [4, 5], 2, p, keys=[12, 13])
    step = s.schedule()
    assert step.kind == "prefill"
    # request 0 takes 2 slots; request 1 only fits 1 sample now, the other waits
    assert [len(g.seqs) for g in step.groups] == [2, 1]
    assert [g.prompt for g in step.groups] == [[1, 2, 3], [4, 5]]
    assert sorted(x.slot for g in step.groups for x in g.seqs) == [0, 1, 2]
    seqs = [x for g in step.groups for x in g.seqs]
    s.append(seqs, [9, 9, 9], [0.0, 0.0, 0.0])
    assert not s.free_slots  # waiting sample but no slot: decode next
    _drain_decode(s)  # every sequence reaches max_new_tokens=2 and frees its slot
    assert len(s.free_slots) == 3
    step = s.schedule()
    assert step.kind == "prefill" and len(step.groups) == 1
    (g,) = step.groups
    assert g.prompt == [4, 5] and [x.sample for x in g.seqs] == [1] and g.seqs[0].key == 13
    s.append(g.seqs, [1], [0.0])
    _drain_decode(s)
    assert s.done()
    res = s.results(2, 2)
    assert all(c is not None and c.finish_reason == "length" and len(c.tokens) == 2 for r in res for c in r)


def test_prefill_token_budget_splits_steps() -> None:
    s = Scheduler(num_slots=8, max_model_len=64, max_prefill_tokens=10)
    p = SamplingParams(max_new_tokens=1)
    for i in range(3):
        s.add(i, list(range(1, 7)), 1, p, keys=[i])  # 6 tokens each
    first = s.schedule()
    assert [g.seqs[0].request for g in first.groups] == [0]  # 6 + 6 > 10
    s.append(first.groups[0].seqs, [5], [0.0])
    second = s.schedule()
    assert second.kind == "prefill" and [g.seqs[0].request for g in second.groups] == [1]


def test_finish_reasons() -> None:
    s = Scheduler(num_slots=4, max_model_len=6, max_prefill_tokens=100, eos_token_ids=[2],
                  detokenize=lambda ids: "".join(chr(ord("a") + t) for t in ids))
    s.add(0, [1], 1, SamplingParams(max_new_tokens=10), keys=[0])  # stops on EOS 2
    s.add(1, [1], 1, SamplingParams(max_new_tokens=10, ignore_eos=True, stop_token_ids=(4,)), keys=[1])
    s.add(2, [1], 1, SamplingParams(max_new_tokens=10, stop_strings=("dd",)), keys=[2])
    s.add(3, [1, 1, 1], 1, SamplingParams(max_new_tokens=10), keys=[3])  # context 6 is full first
    step = s.schedule()
    seqs = [g.seqs[0] for g in step.groups]
    s.append(seqs, [2, 2, 3, 0], [0.0] * 4)
    assert seqs[0].finish_reason == "stop"
    assert seqs[1].finish_reason is None  # EOS ignored
    s.append(seqs[1:], [4, 3, 0], [0.0] * 3)
    assert seqs[1].finish_reason == "stop" and seqs[2].finish_reason == "stop_string"
    assert seqs[3].finish_reason is None and seqs[3].length == 5
    s.append(seqs[3:], [0], [0.0])
    assert seqs[3].finish_reason == "length" and seqs[3].length == 6
    assert s.done() and sorted(s.free_slots) == [0, 1, 2, 3]


def test_stop_strings_need_a_detokenizer() -> None:
    s = Scheduler(num_slots=1, max_model_len=8, max_prefill_tokens=8)
    with pytest.raises(ValueError, match="request 5: stop_strings"):
        s.add(5, [1], 1, SamplingParams(stop_strings=("x",)), keys=[0])


@pytest.mark.parametrize(
    "kw, field",
    [({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
     ({"top_k": -2}, "top_k"), ({"min_p": 2.0}, "min_p"), ({"max_new_tokens": 0}, "max_new_tokens"),
     ({"stop_token_ids": (-1,)}, "stop_token_ids"), ({"stop_strings": ("",)}, "stop_strings"),
     ({"seed": -3}, "seed"), ({"logprobs_mode": "foo"}, "logprobs_mode"),
     ({"temperature": float("nan")}, "temperature")],
)
def test_sampling_params_check_names_field(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw).check(vocab_size=100)
