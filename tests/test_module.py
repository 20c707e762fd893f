"""CoGRPOModule end to end: tiny Trainer.fit runs in every mode, the health panel, reward edge cases,
option validation, the ratio before the first update, and checkpoints.

Every run uses a random 1-layer TinyMDM, 2 prompts x 4 samples and 4 sampling steps, so a fit takes
about a second on one CPU thread. The rewards are defined here so that each test controls whether
groups have spread, are flat or contain NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import Tensor

from cogrpo_lightning.data import PromptDataModule
from cogrpo_lightning.grpo import RewardWarning
from cogrpo_lightning.mdm.tiny import TinyMDM, TinyMDMConfig
from cogrpo_lightning.module import CoGRPOModule
from cogrpo_lightning.rewards.base import RewardModel
from cogrpo_lightning.sampling import prepare_conditions, recompute_log_probs, rollout
from cogrpo_lightning.schedule.knobs import KNOB_NAMES
from cogrpo_lightning.schedule.predefined import PredefinedSchedule

SMALL = TinyMDMConfig(hidden_size=32, num_layers=1, num_heads=2)
GROUP_SIZE = 4
NUM_STEPS = 4
PROMPTS_PER_BATCH = 2


class BrightnessReward(RewardModel):
    """Mean pixel value of each image: differs between samples, so no group is flat."""

    def score(self, images: Tensor, prompts: list[str], metadata: list[Mapping[str, Any]]) -> Tensor:
        return images.mean(dim=(1, 2, 3))


class ConstantReward(RewardModel):
    """0.5 for every image, so every group has zero reward std."""

    def score(self, images: Tensor, prompts: list[str], metadata: list[Mapping[str, Any]]) -> Tensor:
        return torch.full((images.shape[0],), 0.5)


class FirstOfGroupNaNReward(BrightnessReward):
    """Brightness, but NaN for the first sample of every group of GROUP_SIZE."""

    def score(self, images: Tensor, prompts: list[str], metadata: list[Mapping[str, Any]]) -> Tensor:
        scores = super().score(images, prompts, metadata).clone()
        scores[::GROUP_SIZE] = float("nan")
        return scores


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call in memory as (step, metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.history.append((step, dict(metrics)))

    def keys(self) -> set[str]:
        return {key for _, metrics in self.history for key in metrics}

    def values(self, key: str) -> list[float]:
        return [metrics[key] for _, metrics in self.history if key in metrics]


class StepChanges(pl.Callback):
    """Records, for every training step, whether it changed the MDM and the schedule policy."""

    def __init__(self) -> None:
        self.changes: list[dict[str, bool]] = []
        self._before: dict[str, dict[str, Tensor]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        self._before = {"model": trainable(module.mdm), "schedule": trainable(module.policy)}

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.changes.append(
            {
                "model": bool(changed_names(self._before["model"], module.mdm)),
                "schedule": bool(changed_names(self._before["schedule"], module.policy)),
            }
        )


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # With several OpenMP threads, a rollout of these tiny models took about 100x longer on a
    # 2-core machine shared with other jobs. Module scope sets it before the module-scoped runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_module(reward: RewardModel | None = None, **options: Any) -> CoGRPOModule:
    torch.manual_seed(0)
    options = {
        "group_size": GROUP_SIZE,
        "num_steps": NUM_STEPS,
        "eval_images_per_prompt": 1,
        "model_lr": 1e-3,
        **options,
    }
    return CoGRPOModule(mdm=TinyMDM(SMALL), reward=reward or BrightnessReward(), **options)


def fit(
    module: CoGRPOModule,
    num_updates: int,
    root: Any,
    max_epochs: int = 1,
    ckpt_path: Any = None,
    callbacks: list[pl.Callback] | None = None,
) -> tuple[pl.Trainer, RecordingLogger]:
    """Run ``num_updates`` training steps per epoch plus the baseline sanity check and one validation
    batch per epoch."""
    data = PromptDataModule(
        prompts_per_batch=PROMPTS_PER_BATCH,
        group_size=GROUP_SIZE,
        val_prompts_per_batch=2,
        max_train_prompts=PROMPTS_PER_BATCH * num_updates,
    )
    logger = RecordingLogger()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        limit_train_batches=num_updates,
        limit_val_batches=1,
        num_sanity_val_steps=-1,
        log_every_n_steps=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=callbacks,
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, logger


def trainable(module: torch.nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def changed_names(before: dict[str, Tensor], module: torch.nn.Module) -> set[str]:
    after = dict(module.named_parameters())
    return {name for name, value in before.items() if not torch.equal(value, after[name])}


def assert_all_finite(logger: RecordingLogger) -> None:
    for step, metrics in logger.history:
        for key, value in metrics.items():
            assert math.isfinite(value), f"{key} = {value} at step {step}"


@pytest.fixture(scope="module")
def alternating_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three alternating updates (model, schedule, model), shared by the panel and checkpoint tests."""
    module = make_module(mode="alternating")
    before_model = trainable(module.mdm)
    before_schedule = trainable(module.policy)
    root = tmp_path_factory.mktemp("alternating")
    step_changes = StepChanges()
    trainer, logger = fit(module, num_updates=3, root=root, callbacks=[step_changes])
    return {
        "step_changes": step_changes.changes,
        "module": module,
        "trainer": trainer,
        "logger": logger,
        "before_model": before_model,
        "before_schedule": before_schedule,
        "root": root,
    }


# ---------------------------------------------------------------- which parameters each mode trains


def test_alternating_changes_every_parameter(alternating_run: dict[str, Any]) -> None:
    module = alternating_run["module"]
    before_model, before_schedule = alternating_run["before_model"], alternating_run["before_schedule"]

    assert module.num_updates == 3
    assert before_model, "the tiny MDM has no trainable parameter"
    assert before_schedule, "the schedule policy has no trainable parameter"
    assert set(before_model) - changed_names(before_model, module.mdm) == set()
    assert set(before_schedule) - changed_names(before_schedule, module.policy) == set()


def test_alternating_phases_take_turns(alternating_run: dict[str, Any]) -> None:
    logger = alternating_run["logger"]

    assert logger.values("train/phase_is_model") == [1.0, 0.0, 1.0]


def test_alternating_updates_one_policy_per_step(alternating_run: dict[str, Any]) -> None:
    # The idle policy must get no gradient at all: a zero gradient would still let AdamW's
    # momentum from its last phase move it.
    assert alternating_run["step_changes"] == [
        {"model": True, "schedule": False},
        {"model": False, "schedule": True},
        {"model": True, "schedule": False},
    ]


def test_panel_logs_only_updated_policy(alternating_run: dict[str, Any]) -> None:
    logger = alternating_run["logger"]
    steps = [metrics for _, metrics in logger.history if "train/phase_is_model" in metrics]

    assert len(steps) == 3
    for metrics in steps:
        idle = "schedule" if metrics["train/phase_is_model"] == 1.0 else "model"
        assert f"loss/{idle}" not in metrics
        assert f"grad_norm/{idle}" not in metrics


# ---------------------------------------------------------------- health panel


def test_panel_logs_health_keys(alternating_run: dict[str, Any]) -> None:
    keys = alternating_run["logger"].keys()
    expected = {
        "reward/mean",
        "reward/std",
        "reward/frac_reward_zero_std",
        "reward/num_nan",
        "loss/model",
        "loss/schedule",
        "clip_fraction/model",
        "clip_fraction/schedule",
        "ratio/model",
        "ratio/schedule",
        "approx_kl/model",
        "approx_kl/schedule",
        "grad_norm/model",
        "grad_norm/schedule",
        "lr/model",
        "lr/schedule",
        "entropy/model_sampled_nll",
        "entropy/schedule",
    }
    expected |= {f"schedule/{knob}/mean" for knob in KNOB_NAMES}

    assert expected - keys == set()


def test_panel_values_are_finite(alternating_run: dict[str, Any]) -> None:
    logger = alternating_run["logger"]

    assert_all_finite(logger)
    assert logger.values("reward/frac_reward_zero_std") == [0.0, 0.0, 0.0]
    assert logger.values("reward/num_nan") == [0.0, 0.0, 0.0]
    assert logger.values("lr/model") == pytest.approx([1e-3, 1e-3, 1e-3])


def test_first_update_ratio_is_one(alternating_run: dict[str, Any]) -> None:
    # One inner epoch: each policy's ratio is measured before its first optimizer step.
    logger = alternating_run["logger"]

    assert logger.values("ratio/model")[0] == pytest.approx(1.0, abs=1e-5)
    assert logger.values("ratio/schedule")[0] == pytest.approx(1.0, abs=1e-5)
    assert logger.values("clip_fraction/model")[0] == 0.0


def test_held_out_table_after_fit(alternating_run: dict[str, Any]) -> None:
    module = alternating_run["module"]
    keys = alternating_run["logger"].keys()
    baseline = module.evaluator.baseline

    assert baseline is not None
    assert set(baseline["scores"]) == {f"base_T{NUM_STEPS}", "base_T1"}
    assert sum(baseline["counts"].values()) == 2  # 2 held-out prompts x 1 image
    assert {f"eval/trained_T{NUM_STEPS}/overall", f"eval/base_T{NUM_STEPS}/overall"} <= keys


# ---------------------------------------------------------------- reward edge cases


def test_constant_reward_warns_flat_groups(tmp_path) -> None:
    module = make_module(reward=ConstantReward(), mode="joint")
    before = trainable(module)

    with pytest.warns(RewardWarning, match=r"all 2 groups have zero reward std"):
        _, logger = fit(module, num_updates=1, root=tmp_path)

    assert logger.values("reward/frac_reward_zero_std") == [1.0]
    assert logger.values("reward/std") == [0.0]
    assert logger.values("loss/model") == [0.0]
    assert logger.values("loss/schedule") == [0.0]
    assert_all_finite(logger)
    # every advantage is 0, so the update has zero gradient and AdamW without weight decay moves nothing
    assert changed_names(before, module) == set()


def test_nan_rewards_are_counted_and_skipped(tmp_path) -> None:
    module = make_module(reward=FirstOfGroupNaNReward(), mode="joint")
    before = trainable(module)

    with pytest.warns(RewardWarning, match=r"2 of 8 rewards are NaN or infinite"):
        _, logger = fit(module, num_updates=1, root=tmp_path)

    assert logger.values("reward/num_nan") == [2.0]
    assert logger.values("reward/frac_reward_zero_std") == [0.0]
    assert_all_finite(logger)
    assert set(before) - changed_names(before, module) == set()
    for name, parameter in module.named_parameters():
        assert torch.isfinite(parameter).all(), name


# ---------------------------------------------------------------- option variants


@pytest.mark.parametrize(
    "options",
    [
        {"loss_level": "step"},
        {"advantage_scale": "batch", "advantage_clip": 1.0},
        {"advantage_scale": "none"},
        {"num_inner_epochs": 2, "train_steps_per_rollout": 2},
        {"predefined_schedule": PredefinedSchedule(cfg_scale=3.0)},
        {"frozen_knobs": ["cfg_scale", "remask_temperature"]},
    ],
    ids=["step_level", "batch_scale_clipped", "no_scale", "two_epochs_two_steps", "cfg", "two_frozen"],
)
def test_option_variant_trains(options: dict[str, Any], tmp_path) -> None:
    module = make_module(mode="joint", **options)
    before = trainable(module)

    _, logger = fit(module, num_updates=1, root=tmp_path)

    assert_all_finite(logger)
    assert set(before) - changed_names(before, module) == set()


def test_state_head_trains_every_layer(tmp_path) -> None:
    # The head's last layer starts at zero, so the layers below it first move on the second update.
    module = make_module(mode="schedule_only", schedule_head="state")
    before = trainable(module.policy)

    _, logger = fit(module, num_updates=2, root=tmp_path)

    assert_all_finite(logger)
    assert set(before) - changed_names(before, module.policy) == set()


def test_kl_penalty_trains(tmp_path) -> None:
    module = make_module(mode="model_only", kl_beta=0.1)

    _, logger = fit(module, num_updates=2, root=tmp_path)

    kl = logger.values("kl/model")
    assert len(kl) == 2
    assert kl[0] == pytest.approx(0.0, abs=1e-6)  # the model equals its reference before the first update
    assert kl[1] > 0.0
    assert_all_finite(logger)


@pytest.mark.parametrize("mode", ["schedule_only", "alternating"])
def test_all_knobs_frozen_rejected(mode: str, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"model\.frozen_knobs"):
        module = make_module(mode=mode, frozen_knobs=list(KNOB_NAMES))
        fit(module, num_updates=2, root=tmp_path)


# ---------------------------------------------------------------- option validation


def test_group_size_one_rejected() -> None:
    with pytest.raises(ValueError, match=r"model\.group_size: GRPO needs at least 2 samples per prompt"):
        make_module(group_size=1)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("mode", "sequential", r"model\.mode must be one of alternating, joint, model_only, schedule_only"),
        ("loss_level", "sequence", r"model\.loss_level must be one of token, step"),
        ("advantage_scale", "global", r"model\.advantage_scale must be one of group, batch, none"),
        ("kl_beta", -0.1, r"model\.kl_beta must be >= 0, got -0\.1"),
        ("num_steps", 0, r"model\.num_steps must be >= 1"),
        ("num_inner_epochs", 0, r"model\.num_inner_epochs must be >= 1"),
        ("schedule_clip", 0.0, r"model\.schedule_clip must be > 0"),
        ("model_lr", -1.0, r"model\.model_lr must be >= 0"),
    ],
)
def test_invalid_option_rejected(option: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_module(**{option: value})


def test_all_invalid_options_reported_together() -> None:
    with pytest.raises(ValueError) as error:
        make_module(group_size=1, mode="sequential", kl_beta=-1.0)

    text = str(error.value)
    assert "model.group_size" in text
    assert "model.mode" in text
    assert "model.kl_beta" in text


# ---------------------------------------------------------------- ratio before the first update


@pytest.mark.parametrize("mdm_training", [False, True], ids=["eval", "train"])
def test_replay_matches_rollout(mdm_training: bool) -> None:
    """Replaying a rollout with unchanged parameters gives token and schedule ratios of 1.

    The module rolls out in eval mode under no_grad and replays in train mode with gradient, so
    both replay modes must match the rollout.
    """
    module = make_module()
    prompts = ["a photo of a red circle", "a photo of two squares"]
    module.eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        condition, negative = prepare_conditions(module.mdm, prompts, GROUP_SIZE)
        trajectory = rollout(
            module.mdm, module.policy, prompts, GROUP_SIZE, NUM_STEPS,
            generator=generator, condition=condition, negative_condition=negative,
        )

    module.mdm.train(mdm_training)
    filled = torch.zeros_like(trajectory.fill_step, dtype=torch.bool)
    for step_index in range(NUM_STEPS):
        token_log_probs, fill_mask, schedule_log_probs = recompute_log_probs(
            module.mdm, trajectory, step_index, condition, negative, policy=module.policy
        )
        token_ratio = (token_log_probs - trajectory.old_token_log_probs)[fill_mask].exp()
        schedule_ratio = (schedule_log_probs - trajectory.old_schedule_log_probs[step_index]).exp()
        filled |= fill_mask

        assert token_log_probs.requires_grad
        torch.testing.assert_close(token_ratio, torch.ones_like(token_ratio), rtol=0, atol=1e-5)
        torch.testing.assert_close(schedule_ratio, torch.ones_like(schedule_ratio), rtol=0, atol=1e-5)
    assert filled.all(), "some token was never filled, so its ratio was never checked"


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_stores_cogrpo_state(alternating_run: dict[str, Any]) -> None:
    module, trainer = alternating_run["module"], alternating_run["trainer"]
    path = alternating_run["root"] / "stored.ckpt"

    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)

    state = checkpoint["cogrpo"]
    assert state["num_updates"] == 3
    assert state["baseline"] == module.evaluator.baseline
    assert state["learned_schedule"] == module.export_schedule()
    assert set(state["learned_schedule"]) == set(KNOB_NAMES)
    assert len(state["learned_schedule"]["cfg_scale"]) == NUM_STEPS


def test_checkpoint_round_trip_keeps_schedule(alternating_run: dict[str, Any]) -> None:
    module, trainer = alternating_run["module"], alternating_run["trainer"]
    path = alternating_run["root"] / "round_trip.ckpt"
    trainer.save_checkpoint(path)

    # the default weights_only of torch >= 2.6 (True) must accept the checkpoint
    loaded = CoGRPOModule.load_from_checkpoint(path, mdm=TinyMDM(SMALL), reward=BrightnessReward())

    assert loaded.num_updates == module.num_updates
    assert loaded.evaluator.baseline == module.evaluator.baseline
    assert loaded.hparams.mode == "alternating"
    assert loaded.export_schedule() == module.export_schedule()
    for name, parameter in module.policy.named_parameters():
        torch.testing.assert_close(dict(loaded.policy.named_parameters())[name], parameter, rtol=0, atol=0)
    for name, parameter in module.mdm.named_parameters():
        torch.testing.assert_close(dict(loaded.mdm.named_parameters())[name], parameter, rtol=0, atol=0)


def test_checkpoint_keeps_predefined_schedule(tmp_path) -> None:
    schedule = PredefinedSchedule(cfg_scale=2.0, remask_ratio="linear")
    module = make_module(mode="joint", predefined_schedule=schedule, frozen_knobs=["cfg_scale"])
    trainer, _ = fit(module, num_updates=1, root=tmp_path)
    path = tmp_path / "predefined.ckpt"
    trainer.save_checkpoint(path)

    loaded = CoGRPOModule.load_from_checkpoint(
        path, mdm=TinyMDM(SMALL), reward=BrightnessReward(), weights_only=False
    )

    assert loaded.predefined_schedule == schedule
    assert loaded.policy.frozen_knobs == ("cfg_scale",)
    assert loaded.export_schedule() == module.export_schedule()


def test_checkpoint_with_schedule_loads_by_default(tmp_path) -> None:
    module = make_module(mode="schedule_only", predefined_schedule=PredefinedSchedule(cfg_scale=2.0))
    trainer, _ = fit(module, num_updates=1, root=tmp_path)
    path = tmp_path / "predefined.ckpt"
    trainer.save_checkpoint(path)

    loaded = CoGRPOModule.load_from_checkpoint(path, mdm=TinyMDM(SMALL), reward=BrightnessReward())

    assert loaded.predefined_schedule == PredefinedSchedule(cfg_scale=2.0)


@pytest.fixture(scope="module")
def resumed_run(alternating_run: dict[str, Any]) -> dict[str, Any]:
    """The alternating run resumed from its end-of-epoch checkpoint for one more epoch of 3 updates."""
    path = alternating_run["root"] / "resume.ckpt"
    alternating_run["trainer"].save_checkpoint(path)
    module = make_module(mode="alternating")
    _, logger = fit(module, num_updates=3, root=alternating_run["root"], max_epochs=2, ckpt_path=path)
    return {"module": module, "logger": logger}


def test_resume_continues_phases(resumed_run: dict[str, Any]) -> None:
    module, logger = resumed_run["module"], resumed_run["logger"]

    assert module.num_updates == 6
    # the run stopped after model, schedule, model, so it resumes with a schedule update
    assert logger.values("train/phase_is_model") == [0.0, 1.0, 0.0]
    assert_all_finite(logger)


def test_resume_keeps_baseline(alternating_run: dict[str, Any], resumed_run: dict[str, Any]) -> None:
    assert resumed_run["module"].evaluator.baseline == alternating_run["module"].evaluator.baseline
