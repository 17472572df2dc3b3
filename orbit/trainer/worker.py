"""PolicyWorker: one device's model, adapter, optimizer and rollout engine, as a plain class.

The frozen (quantized) base is loaded once; the adapter is injected into it; the native engine
samples from the same modules with the adapter's *serve* slot (1) active while the trainer
computes gradients through the *train* slot (0). After an optimizer step `push_adapter` copies
slot 0 into slot 1 — a few MB — which is the whole "weight sync". Ray is not needed here: the
orchestration layer wraps this class in an actor, and tests drive it directly. When
torch.distributed is initialised, adapter gradients and step metrics are all-reduced.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from orbit.algorithms.losses import PolicyLossConfig, PolicyLossInputs, policy_loss
from orbit.config import TrainConfig
from orbit.data.sample import Sample, pack_samples
from orbit.models.attention import AttnBatch
from orbit.models.dtypes import resolve_compute_dtype
from orbit.models.logprobs import response_logprobs
from orbit.trainer import checkpoint as ckpt
from orbit.trainer.batching import micro_batches, padded, to_device
from orbit.trainer.schedule import build_scheduler

TRAIN_SLOT, SERVE_SLOT = 0, 1
log = logging.getLogger("orbit.trainer")


# Metrics every training micro-step reports (token-weighted means over the trained tokens).
_STEP_METRICS = ("train/pg_loss", "train/pg_clipfrac", "train/ppo_kl", "train/entropy",
                 "train/train_rollout_logprob_abs_diff_mean", "train/train_rollout_kl_k1",
                 "train/train_rollout_kl_k3")


class PolicyWorker:
    """Model + adapter + AdamW + engine on one device; see the module docstring."""

    def __init__(self, cfg: TrainConfig, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", total_optim_steps: int = 1) -> None:
        from orbit.adapters.inject import AdapterConfig, inject_adapters
        from orbit.models.loader import load_model

        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device(device)
        self.dtype = resolve_compute_dtype(cfg.precision.compute_dtype, self.device)
        path = cfg.ckpt.hf_checkpoint or str(_default_model_path())
        fmt = cfg.precision.quant_format
        weight_fmt = {"auto": None, "fp8-w8a8": "fp8"}.get(fmt, fmt)
        stored = _stored_quantization(path)
        if stored and weight_fmt is not None:
            # A pre-quantized checkpoint is read in its own format: the launchers name the
            # format they expect, and requantizing an already-quantized base would only lose bits.
            if rank == 0:
                print(f"{path} is stored quantized ({stored}); keeping that instead of --quant-format {fmt}")
            weight_fmt = None
        self.model, self.tokenizer = load_model(
            path, dtype=self.dtype, device=self.device, quant=weight_fmt,
            group_size=cfg.precision.quant_group_size if fmt in ("int4", "int8") else None,
        )
        if fmt == "fp8-w8a8":
            _enable_fp8_activations(self.model)
        a = cfg.adapter
        # Same seed on every rank -> identical adapter init (then broadcast to be certain).
        torch.manual_seed(cfg.data.seed)
        self.adapters = inject_adapters(self.model, AdapterConfig(
            kind=a.adapter, r=a.lora_rank, alpha=a.lora_alpha, dropout=a.lora_dropout,
            use_rslora=a.use_rslora, block_size=a.oft_block_size, targets=tuple(a.target_modules),
            dtype=torch.float32 if a.adapter_dtype == "float32" else torch.bfloat16,
        ))
        if cfg.precision.precision_mode == "exact":
            # Batch-invariant kernels on both sides (matmuls, attention, RMSNorm): the sampler's
            # log-probs then equal the trainer's bit for bit (docs/precision.md). Swaps classes in
            # place, so adapter parameters and slots stay where inject_adapters put them.
            from orbit.alignment.exact import convert_exact

            convert_exact(self.model)
        from orbit.kernels.qmm_routes import install_from_path
        from orbit.models.moe import set_fused_experts

        install_from_path(cfg.precision.qmm_routes)  # before any kernel runs or graph is captured

        set_fused_experts(self.model, cfg.precision.fused_moe)
        self.params = self.adapters.trainable_parameters()
        if self._distributed():
            for p in self.params:
                dist.broadcast(p.data, src=0)
        self.adapters.stage(TRAIN_SLOT, SERVE_SLOT)
        # float32 master copies: AdamW moments and updates of ~lr*1e-3 relative vanish in bf16,
        # and gradients accumulated over micro-batches in bf16 lose bits. The adapter is tiny.
        self.master = [p if p.dtype == torch.float32 else torch.nn.Parameter(p.detach().float().clone())
                       for p in self.params]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.master, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
                                           weight_decay=o.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, lr=o.lr, warmup=o.lr_warmup_steps,
                                         total=total_optim_steps, style=o.lr_decay_style, min_lr=o.min_lr)
        self.optim_step = 0
        self.engine = self._build_engine()
        self.reward = self._build_reward()

    # ---- construction seams (the packages they call are owned elsewhere) ----------------
    def _build_engine(self) -> Any:
        from orbit.rollout.engine import Engine

        r, e = self.cfg.rollout, self.cfg.eval
        longest = r.max_prompt_len + max(r.rollout_max_response_len, e.eval_max_response_len)
        max_len = min(longest, self.model.config.max_position_embeddings)
        # No more KV slots than sequences a rollout can hold: a CPU cache is sized up front.
        seqs = max(r.rollout_batch_size * r.n_samples_per_prompt, 1)
        return Engine(self.model, max_num_seqs=min(r.max_num_seqs, seqs), max_model_len=max_len,
                      kv_cache_memory=r.kv_cache_fraction if self.device.type == "cuda" else None,
                      device=self.device, exact=self.cfg.precision.precision_mode == "exact",
                      tokenizer=self.tokenizer, seed=self.cfg.data.seed + self.rank,
                      attn_backend=r.rollout_attn_backend,
                      overlap=None if r.rollout_overlap else False,  # None: on CUDA
                      pdl=None if r.rollout_pdl else False,  # None: where the GPU has it
                      fuse_lora=None if r.rollout_fuse_lora else False)  # None: CUDA, not exact

    def _build_reward(self) -> Any:
        from orbit.rewards.custom import make_reward_spec
        from orbit.rewards.runner import RewardRunner

        specs = []
        for term in self.cfg.data.reward.split(","):  # "math,format=0.1": name[=weight]
            name, _, weight = term.strip().partition("=")
            specs.append(make_reward_spec(name, weight=float(weight) if weight else 1.0))
        return RewardRunner(specs)

    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    # ---- rollout -------------------------------------------------------------------------
    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of a rendered prompt (chat template already applied by orbit.data)."""
        if self.tokenizer is None:
            raise ValueError(f"{self.cfg.ckpt.hf_checkpoint}: the model ships no tokenizer")
        # A rendered chat template carries its own special tokens (BOS included) as text.
        return list(self.tokenizer.encode(text, add_special_tokens=not self.cfg.data.apply_chat_template))

    def _generate(self, rows: list[dict[str, Any]], sampling: Any, n: int,
                  eval_mode: bool = False) -> list[Sample]:
        """n scored samples per row, in row order. A prompt the engine refuses (empty, longer
        than the context) comes back as n samples with finish_reason "error", no tokens, reward
        0, unscored, and the engine's message in metadata["rollout_error"]: the caller decides
        (the driver drops them, `drop_failed_samples`; eval counts them as misses)."""
        ids = [self.prompt_ids(r["text"]) for r in rows]
        # One seed per prompt (the step's seed and the row's group id): a seeded request's
        # samples depend on its seed alone, so one seed for the whole step would give every
        # prompt the same uniforms.
        params = sampling if sampling.seed is None else [
            dataclasses.replace(sampling, seed=(sampling.seed * 1_000_003 + int(r["group_id"]))
                                % (2**62)) for r in rows]
        self.model.eval()  # no adapter dropout while sampling
        with torch.no_grad(), self.adapters.use_slot(SERVE_SLOT):
            # "skip": one bad prompt must not fail every other prompt of the training step.
            groups = self.engine.generate(ids, params, n, on_error="skip")
        samples = []
        for k, (row, p_ids, comps) in enumerate(zip(rows, ids, groups)):
            for j, c in enumerate(comps):
                smp = Sample(
                    prompt_ids=p_ids, response_ids=list(c.tokens), rollout_logprobs=list(c.logprobs),
                    group_id=int(row["group_id"]), index=j, label=row.get("label"),
                    finish_reason=c.finish_reason, prompt_text=row["text"],
                    response_text=c.text if c.text is not None else self.tokenizer.decode(c.tokens),
                )
                if c.finish_reason == "error":  # "request k" is this worker's shard index: drop it
                    smp.metadata["rollout_error"] = str(c.error).removeprefix(f"request {k}: ")
                samples.append(smp)
        # Reward functions never see a refused prompt's empty response (it would count as a
        # wrong answer, or as a reward failure of a verifier that expects text).
        scored = [smp for smp in samples if smp.finish_reason != "error"]
        if not scored:
            return samples
        result = self.reward.apply(scored, eval_mode=eval_mode)  # fills reward and rewards_by_fn
        for f in result.failures:  # surfaced as reward/failures/<fn> in the step metrics
            hit = scored if f.sample_index is None else [scored[f.sample_index]]
            for smp in hit:
                smp.metadata.setdefault("reward_failures", []).append(f.fn)
        return samples

    def rollout(self, rows: list[dict[str, Any]], step: int = 0) -> list[Sample]:
        """n responses per prompt row ({text, label, group_id}) from the serve slot, scored."""
        from orbit.rollout.types import SamplingParams

        r = self.cfg.rollout
        t0 = time.perf_counter()
        sampling = SamplingParams(temperature=r.rollout_temperature, top_p=r.rollout_top_p,
                                  max_new_tokens=r.rollout_max_response_len,
                                  seed=self._seed(step, rows), logprobs_mode="scaled")
        samples = self._generate(rows, sampling, r.n_samples_per_prompt)
        for s in samples:
            s.metadata["rollout_time"] = time.perf_counter() - t0
        return samples

    def _seed(self, step: int, rows: list[dict[str, Any]]) -> int:
        # Deterministic per (run seed, step, first group): a resumed run samples the same tokens
        # (each prompt then gets its own seed from this one and its group id, `_generate`).
        first = int(rows[0]["group_id"]) if rows else 0
        return (self.cfg.data.seed * 1_000_003 + step * 10_007 + first) % (2**31 - 1)

    def compute_logprobs(self, samples: list[Sample]) -> list[list[float]]:
        """Train-slot log-probs of each response (no grad): the "old" policy of a rollout."""
        temp = self.cfg.rollout.rollout_temperature
        out: list[list[float]] = [[] for _ in samples]
        self.adapters.set_active(TRAIN_SLOT)
        self.model.eval()
        with torch.no_grad():
            for idx in micro_batches(samples, self.cfg.optim.max_tokens_per_micro_batch):
                batch = to_device(pack_samples([samples[i] for i in idx]), self.device)
                h = self.model(batch.input_ids, batch.positions, AttnBatch.packed(batch.cu_seqlens))
                lp = response_logprobs(self.model, h, batch, temp).cpu()
                for row, i in enumerate(idx):
                    out[i] = lp[row, : len(samples[i].response_ids)].tolist()
        return out

    # ---- training ------------------------------------------------------------------------
    def train_step(self, samples: list[Any], total_tokens: int, num_samples: int) -> dict[str, float]:
        """One optimizer step on this worker's share of a global batch.

        `total_tokens` is the response-token count of the *global* batch: each micro-batch's
        token-mean loss is divided by it, so summed over micro-batches and all-reduced over
        workers the gradient equals the single-worker gradient of the whole batch.
        """
        cfg, a = self.cfg, self.cfg.algo
        t0 = time.perf_counter()
        self.adapters.set_active(TRAIN_SLOT)
        self.model.train()
        loss_cfg = PolicyLossConfig(
            policy_loss="gspo" if a.advantage_estimator == "gspo" else "ppo_clip",
            eps_clip=a.eps_clip, eps_clip_high=a.eps_clip_high,
            dual_clip_c=a.eps_clip_c or None, loss_agg_mode="token-mean",
            num_tokens=float(max(total_tokens, 1)), kl_coef=a.kl_coef, kl_estimator=a.kl_estimator,
            entropy_coef=a.entropy_coef, tis_cap=a.tis_clip if a.use_tis else None,
        )
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None
        # Token-weighted metric sums, reduced below. Every key a micro-step can add is present
        # from the start: a worker whose samples were all skipped must all-reduce a vector of
        # the same length as the others, and the metrics keep their names on such a step.
        sums = dict.fromkeys(_STEP_METRICS, 0.0)
        maxes = {"train_rollout_logprob_abs_diff_max": 0.0}
        if loss_cfg.kl_coef:
            sums["train/kl"] = 0.0
        if loss_cfg.tis_cap is not None:
            sums.update(dict.fromkeys(("train/is_ratio_mean", "train/tis_clipfrac"), 0.0))
            maxes["is_ratio_max"] = 0.0
        trained = [s for s in samples if not self._skippable(s, loss_cfg)]
        sums["_skipped_samples"] = float(len(samples) - len(trained))
        sums["_trained_tokens"] = 0.0
        for idx in micro_batches(trained, cfg.optim.max_tokens_per_micro_batch):
            mb = [trained[i] for i in idx]
            sums["_trained_tokens"] += self._micro_step(mb, loss_cfg, sums, maxes)
            self._accumulate_grads()
        self._allreduce_grads()
        clip = cfg.optim.clip_grad
        grad_norm = torch.nn.utils.clip_grad_norm_(self.master, clip if clip > 0 else float("inf"))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self._copy_master_to_params()
        self.optim_step += 1
        metrics = self._reduce_metrics(sums, maxes, num_samples)
        metrics.update({"train/grad_norm": float(grad_norm), "train/lr": lr,
                        "perf/train_time": time.perf_counter() - t0,
                        "perf/train_tokens": float(sum(len(s.prompt_ids) + len(s.response_ids)
                                                       for s in trained))})
        if self.device.type == "cuda":
            metrics["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    def _skippable(self, s: Sample, loss_cfg: PolicyLossConfig) -> bool:
        """True when `s` adds exactly zero gradient: every advantage is 0 (a group whose
        rewards all agree, under GRPO) and the loss has no term that does not scale with the
        advantage (KL, entropy). The token-mean denominator stays the global token count, so the
        gradient is the same sum less its zero terms; on a small model's hard task most groups agree, and
        this is most of a CPU step's training time."""
        if not self.cfg.algo.skip_zero_advantage or loss_cfg.kl_coef or loss_cfg.entropy_coef:
            return False
        return not any(a != 0.0 for a in s.metadata["advantages"])

    def _micro_step(self, mb: list[Sample], loss_cfg: PolicyLossConfig, sums: dict[str, float],
                    maxes: dict[str, float]) -> int:
        temp = self.cfg.rollout.rollout_temperature
        batch = to_device(pack_samples(mb), self.device)
        attn = AttnBatch.packed(batch.cu_seqlens)
        ref = None
        if self.cfg.algo.kl_coef > 0:  # reference = same base, adapter off: no second model
            with torch.no_grad(), self.adapters.adapter_disabled():
                h_ref = self.model(batch.input_ids, batch.positions, attn)
                ref = response_logprobs(self.model, h_ref, batch, temp)
        hidden = self.model(batch.input_ids, batch.positions, attn)  # [N, D]
        logp, entropy = response_logprobs(self.model, hidden, batch, temp, with_entropy=True)  # [B, T]
        mask = batch.response_mask
        adv = padded([s.metadata["advantages"] for s in mb], batch)
        rollout_lp = padded([s.rollout_logprobs for s in mb], batch)
        old = None  # on-policy: the current log-probs, detached
        if all("old_logprobs" in s.metadata for s in mb):
            old = padded([s.metadata["old_logprobs"] for s in mb], batch)
        out = policy_loss(PolicyLossInputs(
            logprobs=logp, advantages=adv, response_mask=mask, old_logprobs=old,
            rollout_logprobs=rollout_lp, ref_logprobs=ref,
            entropy=entropy if loss_cfg.entropy_coef else entropy.detach(),
        ), loss_cfg)
        out.loss.backward()
        n = int(mask.sum())
        # Trainer vs sampler on the same weights: the pre-update log-probs when this rollout
        # feeds several optimizer steps (later ones also see the policy move), else the current.
        trainer_lp = old if old is not None else logp.detach()
        d = trainer_lp - rollout_lp  # log(pi_train / pi_rollout) on tokens sampled from rollout
        diff = d.abs()[mask]
        per_tok = {
            "train/pg_loss": out.metrics["pg_loss"] * loss_cfg.num_tokens / max(n, 1),
            "train/pg_clipfrac": out.metrics["pg_clipfrac"],
            "train/ppo_kl": out.metrics["ppo_kl"],
            "train/entropy": (entropy.detach() * mask).sum() / max(n, 1),
            "train/train_rollout_logprob_abs_diff_mean": diff.mean() if n else torch.zeros(()),
            "train/train_rollout_kl_k1": (-d)[mask].mean() if n else torch.zeros(()),
            "train/train_rollout_kl_k3": (torch.exp(d) - 1 - d)[mask].mean() if n else torch.zeros(()),
        }
        if "kl_loss" in out.metrics:
            per_tok["train/kl"] = out.metrics["kl_loss"] * loss_cfg.num_tokens / max(n, 1)
        for k in ("is_ratio_mean", "tis_clipfrac"):
            if k in out.metrics:
                per_tok[f"train/{k}"] = out.metrics[k]
        for k, v in per_tok.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        if n:
            maxes["train_rollout_logprob_abs_diff_max"] = max(maxes["train_rollout_logprob_abs_diff_max"],
                                                              float(diff.max()))
            if "is_ratio_max" in out.metrics:
                maxes["is_ratio_max"] = max(maxes.get("is_ratio_max", 0.0), float(out.metrics["is_ratio_max"]))
        return n

    def _accumulate_grads(self) -> None:
        """Add this micro-batch's adapter grads into the float32 master grads."""
        for p, m in zip(self.params, self.master):
            if m is p:
                continue
            if p.grad is not None:
                g = p.grad.float()
                m.grad = g if m.grad is None else m.grad.add_(g)
            p.grad = None

    def _copy_master_to_params(self) -> None:
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                if m is not p:
                    p.copy_(m)  # rounds to the adapter dtype the forward uses

    def _allreduce_grads(self) -> None:
        """Sum adapter gradients over workers (adapter params only: a few MB)."""
        for m in self.master:
            if m.grad is None:  # a target unused by this batch still takes part
                m.grad = torch.zeros_like(m)
        if self._distributed():
            flat = torch.cat([m.grad.reshape(-1) for m in self.master]).to(self._comm_device())  # [N]
            dist.all_reduce(flat)
            off = 0
            for m in self.master:
                m.grad.copy_(flat[off: off + m.numel()].view_as(m))
                off += m.numel()

    def _reduce_metrics(self, sums: dict[str, float], maxes: dict[str, float],
                        num_samples: int) -> dict[str, float]:
        """Token-weighted sums -> means over the trained tokens of all workers."""
        keys = sorted(sums)
        vec = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        mx_keys = sorted(maxes)
        mx = torch.tensor([maxes[k] for k in mx_keys], dtype=torch.float64)
        if self._distributed():
            vec, mx = vec.to(self._comm_device()), mx.to(self._comm_device())
            dist.all_reduce(vec)
            dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        total = dict(zip(keys, vec.tolist()))
        n_tok, skipped = total.pop("_trained_tokens"), total.pop("_skipped_samples")
        out = {k: float(v) / max(n_tok, 1.0) for k, v in total.items()}
        out["train/skipped_zero_adv_frac"] = skipped / max(num_samples, 1)
        out.update({f"train/{k}": float(v) for k, v in zip(mx_keys, mx.tolist())})
        return out

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    # ---- sync, eval, checkpoint -----------------------------------------------------------
    def push_adapter(self) -> float:
        """Stage the train slot into the serve slot; returns the seconds it took."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        self.adapters.stage(TRAIN_SLOT, SERVE_SLOT, wait=True)
        return time.perf_counter() - t0

    def evaluate(self, rows: list[dict[str, Any]], step: int = 0) -> list[list[float]]:
        """k samples per test row from the serve slot -> per-row reward lists (pass@k input)."""
        from orbit.rollout.types import SamplingParams

        e = self.cfg.eval
        sampling = SamplingParams(
            temperature=e.eval_temperature, top_p=e.eval_top_p,
            max_new_tokens=e.eval_max_response_len or self.cfg.rollout.rollout_max_response_len,
            seed=self._seed(step + 1_000_000, rows))
        samples = self._generate(rows, sampling, e.n_samples_per_eval_prompt, eval_mode=True)
        k = e.n_samples_per_eval_prompt
        for i in range(len(rows)):  # a refused prompt stays in the table as k misses
            err = samples[i * k].metadata.get("rollout_error")
            if err is not None:
                log.warning("eval prompt (group %s) failed in the rollout engine, counted as "
                            "reward 0: %s", rows[i]["group_id"], err)
        return [[float(s.reward) for s in samples[i * k:(i + 1) * k]] for i in range(len(rows))]

    def close(self) -> None:
        """Free the KV cache and the reward runner's threads."""
        self.engine.release_kv_cache()
        self.reward.close()

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Train-slot adapter tensors by name, on CPU (for tests and comparisons)."""
        return {n: p.detach().float().cpu().clone() for n, p in self.adapters.named_trainable_parameters()}

    def save(self, ckpt_dir: str) -> None:
        d = Path(ckpt_dir)
        if self.rank == 0:
            self.adapters.save_peft(d / "adapter", base_model_name_or_path=self.cfg.ckpt.hf_checkpoint)
            ckpt.save_optim(d, self.optimizer, self.scheduler, self.optim_step, self.master)
        ckpt.save_rng(d, self.rank)

    def load(self, ckpt_dir: str) -> None:
        d = Path(ckpt_dir)
        self.adapters.load_peft(d / "adapter", slot=TRAIN_SLOT)
        self.optim_step = ckpt.load_optim(d, self.optimizer, self.scheduler, self.master)
        self._copy_master_to_params()
        ckpt.load_rng(d, self.rank)
        self.adapters.stage(TRAIN_SLOT, SERVE_SLOT)


def _stored_quantization(path: str) -> str | None:
    """The quant_method of a HF checkpoint's quantization_config (None for float or GGUF)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    qcfg = json.loads(cfg.read_text()).get("quantization_config")
    return str(qcfg.get("quant_method", "quantized")) if qcfg else None


def _enable_fp8_activations(model: torch.nn.Module) -> None:
    """W8A8: FP8 weights and per-token FP8 activations (orbit.kernels.dispatch act_quant)."""
    from orbit.quant.linear import QuantLinear

    qlinears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not qlinears or not all(hasattr(m, "act_quant") for m in qlinears):
        raise ValueError("--quant-format fp8-w8a8: this build's QuantLinear has no `act_quant` "
                         "setting yet; use --quant-format fp8 (weight-only FP8)")
    for m in qlinears:
        m.act_quant = "fp8"


def _default_model_path() -> Path:
    from orbit.assets import default_gguf_path

    return default_gguf_path()
