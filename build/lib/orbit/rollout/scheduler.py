"""Continuous-batching bookkeeping for the rollout engine, with no torch in it.

The scheduler owns the queues, the KV-slot free list and each sequence's token list; it
decides what the engine runs next and checks when a sequence is done. The engine owns the
tensors. Keeping this torch-free makes the policy testable in microseconds and keeps the
per-step Python cost visible.

Policy (one engine step at a time):
- If requests wait and slots are free, the next step is a *prefill*: waiting groups are taken
  in arrival order while slots and the prefill token budget last. A group is the pending
  samples of one prompt; its prompt is prefilled once into the first sample's slot and the
  engine copies that slot to the others (so n samples share one prefill). When fewer slots
  are free than samples pending, the group is split and the rest prefill again later.
- Otherwise the step is a *decode* of every running sequence (one new token each).
A finished sequence frees its slot at once, so the next step can hand it to a waiting request.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from orbit.rollout.types import Completion, SamplingParams


@dataclass(eq=False)
class Sequence:
    """One sample of one request: its prompt, generated tokens and KV slot."""

    request: int
    sample: int
    prompt: list[int]
    params: SamplingParams
    key: int  # counter-based sampling key (see orbit.rollout.sampling.sequence_key)
    stop_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    slot: int = -1
    finish_reason: str | None = None

    @property
    def length(self) -> int:
        """Tokens in the sequence so far (prompt + generated)."""
        return len(self.prompt) + len(self.tokens)

    @property
    def last_token(self) -> int:
        return self.tokens[-1]


@dataclass
class PrefillGroup:
    """A prompt to prefill once into `seqs[0].slot`, then copy to the other seqs' slots."""

    prompt: list[int]
    seqs: list[Sequence]


@dataclass
class Step:
    """What the engine runs next: a prefill of `groups` or a decode of `seqs`."""

    kind: str  # "prefill" | "decode"
    groups: list[PrefillGroup] = field(default_factory=list)
    seqs: list[Sequence] = field(default_factory=list)


@dataclass
class _Pending:
    request: int
    prompt: list[int]
    params: SamplingParams
    keys: list[int]
    stop_ids: frozenset[int]
    next_sample: int = 0


class Scheduler:
    """Queues + slot allocation + finish checks for one `Engine.generate` call."""

    def __init__(
        self,
        num_slots: int,
        max_model_len: int,
        max_prefill_tokens: int,
        eos_token_ids: list[int] | tuple[int, ...] = (),
        detokenize: Callable[[list[int]], str] | None = None,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.max_model_len = max_model_len
        self.max_prefill_tokens = max_prefill_tokens
        self.eos = frozenset(eos_token_ids)
        self.detokenize = detokenize
        self.free_slots: list[int] = list(range(num_slots - 1, -1, -1))  # pop() gives slot 0 first
        self.waiting: deque[_Pending] = deque()
        self.running: list[Sequence] = []
        self.finished: list[Sequence] = []

    def add(self, request: int, prompt: list[int], n: int, params: SamplingParams, keys: list[int]) -> None:
        """Queue request `request` for `n` samples. The caller has validated it."""
        assert prompt and n >= 1 and len(keys) == n, (len(prompt), n, len(keys))
        assert len(prompt) < self.max_model_len, (len(prompt), self.max_model_len)
        if params.stop_strings and self.detokenize is None:
            raise ValueError(
                f"request {request}: stop_strings need a tokenizer or decode function on the engine"
            )
        stop = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos)
        self.waiting.append(_Pending(request, list(prompt), params, list(keys), stop))

    def done(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> Step:
        """The next step; call only while `not done()`."""
        assert not self.done()
        if self.waiting and self.free_slots:
            groups: list[PrefillGroup] = []
            budget = self.max_prefill_tokens
            while self.waiting and self.free_slots:
                p = self.waiting[0]
                if groups and len(p.prompt) > budget:
                    break  # the first group always goes, even if it alone exceeds the budget
                n_pending = len(p.keys) - p.next_sample
                take = min(n_pending, len(self.free_slots))
                seqs = []
                for j in range(p.next_sample, p.next_sample + take):
                    s = Sequence(p.request, j, p.prompt, p.params, p.keys[j], p.stop_ids)
                    s.slot = self.free_slots.pop()
                    seqs.append(s)
                p.next_sample += take
                if p.next_sample == len(p.keys):
                    self.waiting.popleft()
                self.running.extend(seqs)
                groups.append(PrefillGroup(p.prompt, seqs))
                budget -= len(p.prompt)
            return Step("prefill", groups=groups)
        return Step("decode", seqs=list(self.running))

    def append(self, seqs: list[Sequence], tokens: list[int], logprobs: list[float]) -> None:
        """Record one new token per sequence, finish and free the ones that are done."""
        assert len(seqs) == len(tokens) == len(logprobs)
        done = False
        for s, t, lp in zip(seqs, tokens, logprobs):
            s.tokens.append(t)
            s.logprobs.append(lp)
            reason = self._finish_reason(s, t)
            if reason is not None:
                s.finish_reason = reason
                self.free_slots.append(s.slot)
                s.slot = -1
                self.finished.append(s)
                done = True
        if done:
            self.running = [s for s in self.running if s.finish_reason is None]

    def _finish_reason(self, s: Sequence, token: int) -> str | None:
        if token in s.stop_ids:
            return "stop"
        if s.params.stop_strings and self._hits_stop_string(s):
            return "stop_string"
        if len(s.tokens) >= s.params.max_new_tokens or s.length >= self.max_model_len:
            return "length"
        return None

    def _hits_stop_string(self, s: Sequence) -> bool:
        # Decode only a tail window: any match that lies wholly in earlier tokens was found on
        # an earlier step, so the window only needs to cover the longest stop string. A token
        # is at least one byte, so (bytes of the longest string + 2) tokens always suffice.
        assert self.detokenize is not None
        longest = max(len(x.encode("utf-8")) for x in s.params.stop_strings)
        tail = self.detokenize(s.tokens[-(longest + 2) :])
        return any(x in tail for x in s.params.stop_strings)

    def results(self, num_requests: int, n: int) -> list[list[Completion | None]]:
        """Completions indexed [request][sample]; None where a request was never added."""
        out: list[list[Completion | None]] = [[None] * n for _ in range(num_requests)]
        for s in self.finished:
            out[s.request][s.sample] = Completion(list(s.tokens), list(s.logprobs), s.finish_reason or "")
        return out
