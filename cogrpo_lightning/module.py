"""CoGRPOModule: the Co-GRPO reinforcement-learning loop as a LightningModule.

Each training step runs the algorithm of Co-GRPO (Zhou, Ni et al., arXiv 2512.22288):

1. roll out G samples for each of the B prompts of the batch with the current MDM and the
   current schedule policy (no gradient);
2. score the decoded images with the reward model and turn the rewards into group-relative
   advantages;
3. for ``num_inner_epochs`` epochs, replay the (optionally subsampled) steps of the rollout and
   update the model policy, the schedule policy or both, by clipped likelihood ratios only.

Shapes: B prompts, G samples per prompt, N = B*G, L image tokens, T sampling steps, S = 4 knobs.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from cogrpo_lightning.evaluation import HeldOutEvaluator
from cogrpo_lightning.grpo import (
    ADVANTAGE_SCALES,
    SURROGATE_LEVELS,
    clip_advantages,
    clipped_surrogate,
    group_advantages,
    kl_k3,
    masked_mean,
    validate_group_size,
)
from cogrpo_lightning.mdm.base import MaskedDiffusionModel
from cogrpo_lightning.rewards.base import RewardModel
from cogrpo_lightning.sampling import prepare_conditions, recompute_log_probs, rollout
from cogrpo_lightning.schedule.knobs import KNOB_NAMES
from cogrpo_lightning.schedule.policy import SchedulePolicy
from cogrpo_lightning.schedule.predefined import PredefinedSchedule
from cogrpo_lightning.trajectory import Trajectory

# checkpoints pickle the schedule in their hyper-parameters; allow it under torch.load(weights_only=True)
torch.serialization.add_safe_globals([PredefinedSchedule])

OPTIMIZATION_MODES = ("alternating", "joint", "model_only", "schedule_only")
Phase = Literal["model", "schedule", "joint"]


class CoGRPOModule(pl.LightningModule):
    """Co-GRPO: GRPO on a masked diffusion model and its inference schedule under one reward.

    Args:
        mdm: the masked diffusion model adapter; None loads the tiny shapes-world MDM shipped with
            the package.
        reward: the training reward model; None uses the exact shapes-world GenEval reward
            (1 for a correct image, 0 otherwise). Its weights are not saved in checkpoints.
        eval_reward: the correctness scorer of held-out evaluation (1 correct, 0 wrong); None uses
            the exact shapes-world GenEval reward.
        group_size: G, samples per prompt (linked to ``data.group_size`` by the CLI), at least 2.
        num_steps: T, sampling steps of every rollout.
        predefined_schedule: the hand-designed schedule that a zero schedule action reproduces;
            None uses the backend's ``default_schedule()``.
        mode: ``alternating`` (Co-GRPO: updates on the model, then on the schedule, repeated),
            ``joint`` (both every step), ``model_only`` (plain GRPO on the MDM), ``schedule_only``
            (only the schedule policy, AdaNAT-style).
        model_updates_per_phase: in ``alternating`` mode, training steps that update the model
            before switching to the schedule.
        schedule_updates_per_phase: in ``alternating`` mode, training steps that update the schedule
            before switching back to the model.
        model_lr: AdamW learning rate of the MDM parameter group.
        schedule_lr: AdamW learning rate of the schedule-policy parameter group.
        model_weight_decay: AdamW weight decay of the MDM group.
        schedule_weight_decay: AdamW weight decay of the schedule group.
        schedule_head: ``per_step`` (a learned mean per step and knob) or ``state`` (an MLP on pooled
            MDM features, the step and the prompt embedding).
        frozen_knobs: schedule knobs kept at their predefined value (remask_ratio,
            sampling_temperature, remask_temperature, cfg_scale).
        schedule_init_std: std of the schedule policy's Gaussian in pre-activation units.
        num_inner_epochs: mu, passes over each rollout per training step (one optimizer step each).
        train_steps_per_rollout: sampling steps replayed per epoch, drawn at random without
            replacement; None replays all T. Fewer steps cost less per update.
        clip_low: epsilon below 1 of the ratio clip range [1 - clip_low, 1 + clip_high].
        clip_high: epsilon above 1 of the ratio clip range.
        schedule_clip: epsilon of the symmetric ratio clip range of the schedule policy.
        loss_level: ``token`` (a ratio per filled token) or ``step`` (one ratio per sample and step)
            for the model policy. The schedule policy always has one ratio per sample and step.
        advantage_scale: ``group`` (divide by each group's reward std), ``batch`` or ``none``.
        advantage_clip: clip advantages to [-advantage_clip, advantage_clip]; None disables.
        kl_beta: weight of the k3 KL penalty to a frozen copy of the initial MDM; 0 keeps no copy.
        max_grad_norm: clip each parameter group's gradient norm to this value; None disables.
        negative_prompt: prompt of the unconditional branch of classifier-free guidance.
        eval_images_per_prompt: images per held-out prompt in evaluation (GenEval uses 4).
        eval_num_steps: step count of evaluation; None uses ``num_steps``. The table also shows a
            quarter of it.
        seed: seed of the rollout and evaluation random generators.
    """

    def __init__(
        self,
        mdm: MaskedDiffusionModel | None = None,
        reward: RewardModel | None = None,
        eval_reward: RewardModel | None = None,
        group_size: int = 8,
        num_steps: int = 16,
        predefined_schedule: PredefinedSchedule | None = None,
        mode: Literal["alternating", "joint", "model_only", "schedule_only"] = "alternating",
        model_updates_per_phase: int = 1,
        schedule_updates_per_phase: int = 1,
        model_lr: float = 1e-4,
        schedule_lr: float = 1e-2,
        model_weight_decay: float = 0.0,
        schedule_weight_decay: float = 0.0,
        schedule_head: Literal["per_step", "state"] = "per_step",
        frozen_knobs: Sequence[str] = (),
        schedule_init_std: float = 0.5,
        num_inner_epochs: int = 1,
        train_steps_per_rollout: int | None = None,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        schedule_clip: float = 0.2,
        loss_level: Literal["token", "step"] = "token",
        advantage_scale: Literal["group", "batch", "none"] = "group",
        advantage_clip: float | None = None,
        kl_beta: float = 0.0,
        max_grad_norm: float | None = 1.0,
        negative_prompt: str = "",
        eval_images_per_prompt: int = 4,
        eval_num_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _validate_options(
            group_size=group_size,
            num_steps=num_steps,
            mode=mode,
            model_updates_per_phase=model_updates_per_phase,
            schedule_updates_per_phase=schedule_updates_per_phase,
            num_inner_epochs=num_inner_epochs,
            train_steps_per_rollout=train_steps_per_rollout,
            loss_level=loss_level,
            advantage_scale=advantage_scale,
            kl_beta=kl_beta,
            eval_images_per_prompt=eval_images_per_prompt,
            eval_num_steps=eval_num_steps,
            rates={"model_lr": model_lr, "schedule_lr": schedule_lr},
            clips={"clip_low": clip_low, "clip_high": clip_high, "schedule_clip": schedule_clip},
        )
        self.save_hyperparameters(ignore=["mdm", "reward", "eval_reward"])
        self.automatic_optimization = False

        if mdm is None:
            from cogrpo_lightning.mdm.tiny import TinyMDM

            mdm = TinyMDM.from_pretrained()
        if reward is None or eval_reward is None:
            from cogrpo_lightning.rewards.shapes import ShapesGenEvalReward

            reward = reward if reward is not None else ShapesGenEvalReward()
            eval_reward = eval_reward if eval_reward is not None else ShapesGenEvalReward(mode="correct")
        _link_reward_group_size(reward, group_size)
        self.mdm = mdm
        # Reward models are frozen and can be large (HPS v2 is a ViT-H). They are kept out of the
        # module's submodules, and so out of checkpoints, and setup() moves them to the device.
        self._reward_models = (reward, eval_reward)
        self.predefined_schedule = predefined_schedule or mdm.default_schedule()
        self.policy = SchedulePolicy(
            num_steps,
            self.predefined_schedule,
            frozen_knobs=frozen_knobs,
            init_std=schedule_init_std,
            head=schedule_head,
            feature_dim=mdm.feature_dim if schedule_head == "state" else None,
            condition_dim=mdm.condition_dim if schedule_head == "state" else None,
        )
        if mode in ("alternating", "schedule_only") and not any(p.requires_grad for p in self.policy.parameters()):
            raise ValueError(
                f"model.mode={mode!r} trains the schedule policy, but model.frozen_knobs freezes all four knobs; "
                "unfreeze a knob or use mode=model_only"
            )
        # a frozen copy of the initial MDM for the KL penalty; kept out of the optimizer and checkpoint
        self._reference: list[MaskedDiffusionModel] = []
        if kl_beta > 0:
            reference = copy.deepcopy(mdm).eval().requires_grad_(False)
            self._reference.append(reference)
        self.evaluator = HeldOutEvaluator(
            num_steps=eval_num_steps or num_steps,
            images_per_prompt=eval_images_per_prompt,
            negative_prompt=negative_prompt,
            seed=seed,
            scorer=eval_reward,
        )
        self.num_updates = 0  # training steps taken, drives the alternating phases
        self._checkpoint_hparams: dict[str, Any] = {}

    @property
    def reward(self) -> RewardModel:
        """The training reward model."""
        return self._reward_models[0]

    @property
    def eval_reward(self) -> RewardModel:
        """The correctness scorer of held-out evaluation."""
        return self._reward_models[1]

    # ---------------------------------------------------------------- configuration

    def setup(self, stage: str) -> None:
        for reward in self._reward_models:
            reward.to(self.device)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        groups = [
            {"name": "model", "params": self.mdm.trainable_parameters(), "lr": hp.model_lr,
             "weight_decay": hp.model_weight_decay},
            {"name": "schedule", "params": [p for p in self.policy.parameters() if p.requires_grad],
             "lr": hp.schedule_lr, "weight_decay": hp.schedule_weight_decay},
        ]
        return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.999))

    def configure_model(self) -> None:
        """Shard the MDM with FSDP2 when the trainer uses ``ModelParallelStrategy``; otherwise do nothing.

        The adapter's ``fsdp_units()`` are sharded first, then the adapter itself. The schedule
        policy stays replicated: its gradients are averaged over ranks in each update.
        """
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        if self._reference:
            raise ValueError("model.kl_beta > 0 is not supported with ModelParallelStrategy (FSDP2); set it to 0")
        mesh = self.device_mesh["data_parallel"]
        for unit in self.mdm.fsdp_units():
            fully_shard(unit, mesh=mesh)
        fully_shard(self.mdm, mesh=mesh)
        # FSDP2 gathers the root's parameters only around forward(); the adapter's other entry
        # points read them too, so they get the same hooks.
        for method in ("encode_prompts", "forward_with_features"):
            register_fsdp_forward_method(self.mdm, method)

    def on_fit_start(self) -> None:
        for reference in self._reference:
            reference.to(self.device)
        if self.hparams.mode in ("model_only", "alternating", "joint") and not self.mdm.trainable_parameters():
            raise ValueError(f"model.mode={self.hparams.mode!r} trains the MDM, but it has no trainable parameter")
        world = self.trainer.world_size
        hp = self.hparams
        rank_zero_info(
            f"Co-GRPO: mode={hp.mode}, T={hp.num_steps} steps, group size G={hp.group_size} on "
            f"{world} device(s); each prompt's group stays on one device"
        )

    def on_train_start(self) -> None:
        # A resumed run restores the optimizer's learning rates from the checkpoint; options that
        # changed since are applied here, visibly, instead of being dropped.
        for group in self.optimizers().param_groups:
            requested = self.hparams[f"{group['name']}_lr"]
            if group["lr"] != requested:
                rank_zero_warn(
                    f"model.{group['name']}_lr is {requested} but the restored optimizer has {group['lr']}; "
                    f"training continues with {requested}"
                )
                group["lr"] = requested
        saved = self._checkpoint_hparams
        for name in ("group_size", "num_steps", "mode"):
            if saved and name in saved and saved[name] != self.hparams[name]:
                rank_zero_warn(
                    f"model.{name} is {self.hparams[name]!r} but the checkpoint was trained with "
                    f"{saved[name]!r}; the resumed run uses {self.hparams[name]!r}"
                )

    def _phase(self) -> Phase:
        mode = self.hparams.mode
        if mode == "model_only":
            return "model"
        if mode == "schedule_only":
            return "schedule"
        if mode == "joint":
            return "joint"
        cycle = self.hparams.model_updates_per_phase + self.hparams.schedule_updates_per_phase
        return "model" if self.num_updates % cycle < self.hparams.model_updates_per_phase else "schedule"

    # ---------------------------------------------------------------- training

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        prompts: list[str] = list(batch["prompts"])
        metadata: list[Mapping[str, Any]] = list(batch.get("metadata") or [{} for _ in prompts])
        group_size = hp.group_size
        generator = self._generator("rollout", batch_idx)

        # 1. rollout with the current policies, no gradient
        self.mdm.eval()
        with torch.no_grad():
            condition, negative = prepare_conditions(self.mdm, prompts, group_size, negative_prompt=hp.negative_prompt)
            trajectory = rollout(
                self.mdm, self.policy, prompts, group_size, hp.num_steps,
                generator=generator, condition=condition, negative_condition=negative,
            )

        # 2. reward and group-relative advantages
        with torch.no_grad():
            expanded_prompts = [p for p in prompts for _ in range(group_size)]
            expanded_metadata = [m for m in metadata for _ in range(group_size)]
            rewards = self.reward(trajectory.images, expanded_prompts, expanded_metadata).float()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            advantage = group_advantages(rewards, group_size, scale=hp.advantage_scale)
        self._report_reward_warnings(caught)
        advantages = clip_advantages(advantage.advantages, hp.advantage_clip)
        trajectory.rewards, trajectory.advantages = rewards, advantages

        # 3. policy updates by likelihood ratios, one optimizer step per inner epoch
        phase = self._phase()
        stats: dict[str, list[Tensor]] = {}
        for _ in range(hp.num_inner_epochs):
            self._update(trajectory, prompts, advantages, advantage.valid_mask, phase, generator, stats)
        self.num_updates += 1

        self._log_panel(rewards, advantage, trajectory, phase, stats)

    def _update(
        self,
        trajectory: Trajectory,
        prompts: list[str],
        advantages: Tensor,
        valid_mask: Tensor,
        phase: Phase,
        generator: torch.Generator,
        stats: dict[str, list[Tensor]],
    ) -> None:
        hp = self.hparams
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        steps = self._train_steps(generator)
        update_model = phase in ("model", "joint")
        update_schedule = phase in ("schedule", "joint") and any(p.requires_grad for p in self.policy.parameters())

        # the MDM stays in eval mode: dropout would make the replayed log-probs differ from the
        # rollout's, so the ratio before the first update would not be 1
        for step_index in steps:
            loss = advantages.new_zeros(())
            if update_model:
                # the prompt encoding is part of the graph, so it is rebuilt for each step's backward
                condition, negative = prepare_conditions(
                    self.mdm, prompts, hp.group_size, negative_prompt=hp.negative_prompt
                )
                token_log_probs, fill_mask, _ = recompute_log_probs(
                    self.mdm, trajectory, step_index, condition, negative
                )
                old = trajectory.old_token_log_probs
                if hp.loss_level == "token":
                    result = clipped_surrogate(
                        token_log_probs, old, advantages, hp.clip_low, hp.clip_high,
                        mask=fill_mask, sample_mask=valid_mask, level="token",
                    )
                else:
                    result = clipped_surrogate(
                        (token_log_probs * fill_mask).sum(1), (old * fill_mask).sum(1), advantages,
                        hp.clip_low, hp.clip_high, sample_mask=valid_mask & fill_mask.any(1), level="step",
                    )
                loss = loss + result.loss
                _append(stats, "model", result)
                if hp.kl_beta > 0:
                    kl = self._kl_to_reference(trajectory, step_index, token_log_probs, fill_mask, prompts)
                    loss = loss + hp.kl_beta * kl
                    stats.setdefault("kl/model", []).append(kl.detach())
            if update_schedule:
                features = None if trajectory.features is None else trajectory.features[step_index]
                prompt_embedding = None
                if self.policy.uses_prompt_embedding:
                    with torch.no_grad():
                        prompt_embedding = self.mdm.encode_prompts(prompts).repeat_interleave(hp.group_size).pooled
                schedule_log_probs = self.policy.log_prob(
                    trajectory.actions[step_index], step_index, trajectory.num_steps,
                    features=features, prompt_embedding=prompt_embedding,
                )
                # a sample whose canvas was already full at this step could not be affected by its action
                active = valid_mask & trajectory.active_samples(step_index)
                result = clipped_surrogate(
                    schedule_log_probs, trajectory.old_schedule_log_probs[step_index], advantages,
                    hp.schedule_clip, hp.schedule_clip, sample_mask=active, level="step",
                )
                loss = loss + result.loss
                _append(stats, "schedule", result)
            self.manual_backward(loss / len(steps))

        if self.device_mesh is not None:
            # ModelParallelStrategy wraps nothing in DDP, so the replicated schedule policy's gradients
            # are averaged here; the FSDP2-sharded MDM reduces its own
            for parameter in self.policy.parameters():
                if parameter.grad is not None:
                    parameter.grad = self.trainer.strategy.reduce(parameter.grad, reduce_op="mean")

        for group in optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            max_norm = hp.max_grad_norm if hp.max_grad_norm is not None else math.inf
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            stats.setdefault(f"grad_norm/{group['name']}", []).append(norm.detach())
        optimizer.step()

    def _kl_to_reference(
        self, trajectory: Trajectory, step_index: int, token_log_probs: Tensor, fill_mask: Tensor, prompts: list[str]
    ) -> Tensor:
        reference = self._reference[0]
        with torch.no_grad():
            condition, negative = prepare_conditions(
                reference, prompts, self.hparams.group_size, negative_prompt=self.hparams.negative_prompt
            )
            ref_log_probs, _, _ = recompute_log_probs(reference, trajectory, step_index, condition, negative)
        return masked_mean(kl_k3(token_log_probs, ref_log_probs, mask=fill_mask), fill_mask)

    def _train_steps(self, generator: torch.Generator) -> list[int]:
        total = self.hparams.num_steps
        count = self.hparams.train_steps_per_rollout
        if count is None or count >= total:
            return list(range(total))
        chosen = torch.randperm(total, generator=generator, device=generator.device)[:count]
        return sorted(int(i) for i in chosen)

    def _generator(self, purpose: str, batch_idx: int) -> torch.Generator:
        # distinct, reproducible streams per rank, training step and purpose
        offset = {"rollout": 0, "eval": 1}[purpose]
        seed = (self.hparams.seed * 1_000_003 + self.global_rank * 7919 + self.num_updates * 2 + offset) % (2**63)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        return generator

    def _report_reward_warnings(self, caught: list[warnings.WarningMessage]) -> None:
        for warning in caught:
            if self.num_updates < 5 or self.num_updates % 50 == 0:
                warnings.warn(f"step {self.global_step}: {warning.message}", warning.category, stacklevel=2)

    def _log_panel(
        self,
        rewards: Tensor,
        advantage: Any,
        trajectory: Trajectory,
        phase: Phase,
        stats: dict[str, list[Tensor]],
    ) -> None:
        finite = rewards[torch.isfinite(rewards)]
        # The per-step head's std is the same at every step, so step 0 gives the schedule's entropy;
        # a head that reads features or prompts has no single value to log.
        schedule_entropy = torch.tensor(0.0)
        if self.policy.free_knobs and not self.policy.uses_features and not self.policy.uses_prompt_embedding:
            schedule_entropy = self.policy.entropy(0, trajectory.num_steps, 1).mean()

        panel: dict[str, float | Tensor] = {
            "reward/mean": finite.mean() if finite.numel() else torch.tensor(float("nan")),
            "reward/std": finite.std(unbiased=False) if finite.numel() else torch.tensor(float("nan")),
            "reward/frac_reward_zero_std": advantage.frac_reward_zero_std,
            "reward/num_nan": float(advantage.num_nan_rewards),
            "train/phase_is_model": float(phase in ("model", "joint")),
            "entropy/model_sampled_nll": -trajectory.old_token_log_probs.mean(),
            "entropy/schedule": schedule_entropy,
        }

        # Per-policy statistics go straight to the loggers: through self.log, a policy idle in this
        # alternating phase would re-send its value from the previous step.
        per_policy = {name: torch.stack(values).float().mean().item() for name, values in stats.items()}
        if self.trainer.is_global_zero and per_policy:
            for logger in self.loggers:
                # the step that self.log uses for this batch; global_step has already counted the update
                logger.log_metrics(per_policy, step=self.trainer.fit_loop.epoch_loop._batches_that_stepped)

        for group in self.optimizers().param_groups:
            panel[f"lr/{group['name']}"] = group["lr"]
        knobs = trajectory.knobs.float().mean(dim=1)  # [T, S], mean over samples
        for k, name in enumerate(KNOB_NAMES):
            panel[f"schedule/{name}/mean"] = knobs[:, k].mean()
            panel[f"schedule/{name}/first_step"] = knobs[0, k]
            panel[f"schedule/{name}/last_step"] = knobs[-1, k]
        log_metrics = getattr(self.reward, "log_metrics", None)
        if callable(log_metrics):
            panel.update(log_metrics())  # rewards/<name>/mean and std of a weighted combination
        self.log_dict(panel, prog_bar=False, batch_size=trajectory.num_samples)
        self.log("reward", panel["reward/mean"], prog_bar=True, batch_size=trajectory.num_samples)

    # ---------------------------------------------------------------- evaluation

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self.evaluator.evaluate_batch(self, batch, batch_idx)

    def on_validation_epoch_start(self) -> None:
        self.evaluator.reset()

    def on_validation_epoch_end(self) -> None:
        # the sanity check before training measures the base model; a resumed run keeps the stored one
        sanity = self.trainer.sanity_checking
        table = self.evaluator.finish(self, store_as_baseline=sanity and self.evaluator.baseline is None)
        if table is not None and not sanity:
            # the values are already reduced over devices; sync_dist only keeps Lightning from warning
            self.log_dict(table.metrics(), sync_dist=True)

    # ---------------------------------------------------------------- checkpoints and export

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cogrpo"] = {
            "num_updates": self.num_updates,
            "baseline": self.evaluator.baseline,
            "learned_schedule": self.policy.export_schedule() if self.policy.head == "per_step" else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._checkpoint_hparams = dict(checkpoint.get("hyper_parameters", {}))
        state = checkpoint.get("cogrpo", {})
        self.num_updates = int(state.get("num_updates", 0))
        self.evaluator.baseline = state.get("baseline")

    def export_schedule(self, num_steps: int | None = None) -> dict[str, list[float]]:
        """Return the learned mean schedule as plain per-step knob values (see SchedulePolicy)."""
        return self.policy.export_schedule(num_steps)


def _link_reward_group_size(reward: RewardModel, group_size: int) -> None:
    """Give a reward that normalises per group (``normalize_then_sum``) the module's group size."""
    if not hasattr(reward, "group_size"):
        return
    current = reward.group_size
    if current is None:
        reward.group_size = group_size
    elif current != group_size:
        raise ValueError(
            f"model.reward has group_size={current} but data.group_size is {group_size}; "
            "remove the reward's group_size so that it follows data.group_size"
        )


def _append(stats: dict[str, list[Tensor]], policy: str, result: Any) -> None:
    stats.setdefault(f"loss/{policy}", []).append(result.loss.detach())
    stats.setdefault(f"ratio/{policy}", []).append(result.ratio_mean)
    stats.setdefault(f"clip_fraction/{policy}", []).append(result.clip_fraction)
    stats.setdefault(f"approx_kl/{policy}", []).append(result.approx_kl)


def _validate_options(
    *,
    group_size: int,
    num_steps: int,
    mode: str,
    model_updates_per_phase: int,
    schedule_updates_per_phase: int,
    num_inner_epochs: int,
    train_steps_per_rollout: int | None,
    loss_level: str,
    advantage_scale: str,
    kl_beta: float,
    eval_images_per_prompt: int,
    eval_num_steps: int | None,
    rates: dict[str, float],
    clips: dict[str, float],
) -> None:
    problems: list[str] = []
    try:
        validate_group_size(group_size)
    except ValueError as error:
        problems.append(f"model.group_size: {error}")
    if num_steps < 1:
        problems.append(f"model.num_steps must be >= 1, got {num_steps}")
    if mode not in OPTIMIZATION_MODES:
        problems.append(f"model.mode must be one of {', '.join(OPTIMIZATION_MODES)}, got {mode!r}")
    for name, value in (
        ("model_updates_per_phase", model_updates_per_phase),
        ("schedule_updates_per_phase", schedule_updates_per_phase),
        ("num_inner_epochs", num_inner_epochs),
        ("eval_images_per_prompt", eval_images_per_prompt),
    ):
        if value < 1:
            problems.append(f"model.{name} must be >= 1, got {value}")
    if train_steps_per_rollout is not None and not 1 <= train_steps_per_rollout:
        problems.append(f"model.train_steps_per_rollout must be >= 1 or null, got {train_steps_per_rollout}")
    if eval_num_steps is not None and eval_num_steps < 1:
        problems.append(f"model.eval_num_steps must be >= 1 or null, got {eval_num_steps}")
    if loss_level not in SURROGATE_LEVELS:
        problems.append(f"model.loss_level must be one of {', '.join(SURROGATE_LEVELS)}, got {loss_level!r}")
    if advantage_scale not in ADVANTAGE_SCALES:
        problems.append(
            f"model.advantage_scale must be one of {', '.join(ADVANTAGE_SCALES)}, got {advantage_scale!r}"
        )
    if kl_beta < 0:
        problems.append(f"model.kl_beta must be >= 0, got {kl_beta}")
    for name, value in rates.items():
        if not value >= 0:
            problems.append(f"model.{name} must be >= 0, got {value}")
    for name, value in clips.items():
        if not value > 0:
            problems.append(f"model.{name} must be > 0, got {value}")
    if problems:
        raise ValueError("invalid CoGRPOModule options:\n  " + "\n  ".join(problems))
