"""Request/result types of the rollout engine, kept torch-free so the scheduler can use them.

`SamplingParams` says how one request is sampled and validates itself with `ValueError`s that
name the field; `Completion` is one sampled continuation. Both are plain dataclasses so they
cross process boundaries (Ray) without torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Integral, Real

FINISH_REASONS = ("stop", "length", "stop_string", "error")
LOGPROBS_MODES = ("processed", "scaled", "raw")
GREEDY_TEMPERATURE = 1e-5  # temperatures below this sample greedily (vLLM's rule)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request.

    temperature: 0 (or anything below GREEDY_TEMPERATURE = 1e-5) means greedy (argmax);
    otherwise logits are divided by it.
    top_p: nucleus mass in (0, 1]; 1 keeps everything. top_k: keep the k most likely tokens;
    0 (or -1) keeps everything. min_p: drop tokens whose probability is below min_p times the
    top token's (after temperature); 0 keeps everything.
    max_new_tokens: cap on generated tokens ("length" finish).
    stop_token_ids: extra stop tokens (on top of the engine's EOS ids unless ignore_eos).
    stop_strings: stop when the decoded output contains one (needs a tokenizer/decode fn).
    seed: None draws a fresh seed per request from the engine's RNG; an int makes the
    request's samples reproducible (see orbit/rollout/sampling.py for the counter scheme).
    ignore_eos: keep going past the engine's EOS ids (stop_token_ids still stop).
    logprobs_mode: which log-prob `Completion.logprobs` holds for each sampled token:
      "processed" - under the distribution actually sampled from: temperature applied, then
                    top-k/top-p/min-p truncation, renormalised (0.0 for greedy);
      "scaled"    - log_softmax(logits / temperature), untruncated (temperature 1 for greedy):
                    what the RL trainer computes (orbit.models.logprobs), so RL uses this;
      "raw"       - log_softmax(logits), temperature 1, untruncated.
    Without truncation (top_p=1, top_k off, min_p=0) "processed" equals "scaled".
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    logprobs_mode: str = "processed"

    def __post_init__(self) -> None:
        # Accept lists (and, as vLLM does, a lone id or string) but store tuples so the params
        # stay hashable/frozen. `tuple("VZ")` would be ('V', 'Z'): two one-letter stops.
        for name, one in (("stop_token_ids", _int), ("stop_strings", lambda v: isinstance(v, str))):
            v = getattr(self, name)
            if one(v):
                object.__setattr__(self, name, (v,))
            elif isinstance(v, Iterable):
                object.__setattr__(self, name, tuple(v))
            # anything else stays as given: check() names it
        # numpy integers pass check() (numbers.Integral), but the 64-bit key mixing needs
        # Python ints (np.int32 arithmetic overflows): store the seed as one
        if _int(self.seed):
            object.__setattr__(self, "seed", int(self.seed))

    @property
    def greedy(self) -> bool:
        """Temperature 0, or below GREEDY_TEMPERATURE: a softmax at 1e-40 is 0/0 in float32
        (NaN log-probs), so such rows take the argmax, as vLLM does below 1e-5."""
        return _real(self.temperature) and self.temperature < GREEDY_TEMPERATURE

    @property
    def truncates(self) -> bool:
        """True when top-k/top-p/min-p actually remove tokens (sampling needs a sort)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0)

    def check(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first invalid field and its value.

        bool is an int subclass in Python, so `temperature=True` or `max_new_tokens=True` would
        pass a plain isinstance check and sample at temperature 1 / one token: rejected here.
        numpy scalars pass (numbers.Real / numbers.Integral)."""
        t = self.temperature
        if not _real(t) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if not _real(self.top_p) or not (0.0 < self.top_p <= 1.0):  # NaN fails the comparison too
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= -1 (0 or -1 = off), got {self.top_k!r}")
        if not _real(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be a number in [0, 1], got {self.min_p!r}")
        if not _int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        for name in ("stop_token_ids", "stop_strings"):
            if not isinstance(getattr(self, name), tuple):
                raise ValueError(f"{name} must be a list (or a single value), got "  # noqa: TRY004
                                 f"{getattr(self, name)!r}")
        for t_id in self.stop_token_ids:
            if not _int(t_id) or t_id < 0 or (vocab_size is not None and t_id >= vocab_size):
                raise ValueError(f"stop_token_ids holds {t_id!r}, not a token id in [0, {vocab_size})")
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop_strings must be non-empty strings, got {s!r}")
        if self.seed is not None and (not _int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")  # noqa: TRY004
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")


def _real(x: object) -> bool:
    """A real number that is not a bool."""
    return isinstance(x, Real) and not isinstance(x, bool)


def _int(x: object) -> bool:
    """An integer that is not a bool."""
    return isinstance(x, Integral) and not isinstance(x, bool)


@dataclass
class Completion:
    """One sampled continuation of a prompt.

    tokens: generated ids (the stop token / the token completing a stop string included).
    logprobs: one float per token, in the request's `logprobs_mode`.
    finish_reason: "stop" (a stop/EOS token), "length" (max_new_tokens or the context is
    full), "stop_string", or "error" (the request was invalid and `on_error="skip"`; `error`
    holds the message, "request <i>: <what is wrong>", and tokens are empty).
    text: the decoded tokens when the engine has a tokenizer/decode fn, else None.
    """

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str | None = None
    error: str | None = None
