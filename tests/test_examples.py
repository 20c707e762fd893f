"""The custom-MDM example and image generation from a checkpoint, run as a user runs them.

The example runs in a subprocess. Generation uses a checkpoint of a random 1-layer TinyMDM trained
for one joint step (so the learned schedule differs from the predefined one), through the Python
functions and through ``python -m cogrpo_lightning.generate``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from cogrpo_lightning.data import PromptDataModule, safe_filename
from cogrpo_lightning.generate import (
    generate_images,
    load_module,
    main,
    schedule_values,
    write_images,
)
from cogrpo_lightning.mdm.tiny import DEFAULT_CHECKPOINT, TinyMDM, TinyMDMConfig
from cogrpo_lightning.module import CoGRPOModule
from cogrpo_lightning.rewards.base import RewardModel
from cogrpo_lightning.schedule.knobs import KNOB_NAMES

REPO = Path(__file__).resolve().parent.parent
SMALL = TinyMDMConfig(hidden_size=32, num_layers=1, num_heads=2)
NUM_STEPS = 4
IMAGE_SIZE = 32  # TinyMDM decodes an 8 x 8 token grid into 4 x 4 pixel patches
PROMPTS = ["a red circle", "two blue squares / left", "红色的圆"]
TIMEOUT_S = 300


class BrightnessReward(RewardModel):
    """Mean pixel value of each image, so the samples of a group get different rewards."""

    def score(self, images: Tensor, prompts: list[str], metadata: list[Mapping[str, Any]]) -> Tensor:
        return images.mean(dim=(1, 2, 3))


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # Several OpenMP threads made these tiny models much slower on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_python(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"exit code {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
        f"--- stderr\n{result.stderr[-4000:]}"
    )


def make_module(**options: Any) -> CoGRPOModule:
    torch.manual_seed(0)
    return CoGRPOModule(
        mdm=TinyMDM(SMALL), reward=BrightnessReward(), group_size=2, num_steps=NUM_STEPS, **options
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One joint Co-GRPO step, saved as a Lightning checkpoint plus the TinyMDM directory."""
    root = tmp_path_factory.mktemp("trained")
    module = make_module(mode="joint", schedule_lr=0.1)
    data = PromptDataModule(prompts_per_batch=2, group_size=2, max_train_prompts=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    trainer.fit(module, data)
    checkpoint = root / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    mdm_dir = root / "tiny_mdm"
    module.mdm.save_pretrained(mdm_dir)
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return {"module": module, "checkpoint": checkpoint, "mdm_dir": mdm_dir, "prompt_file": prompt_file}


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB", f"{path.name} has mode {image.mode}"
        return np.asarray(image)


def expected_names(images_per_prompt: int) -> list[str]:
    return [
        f"{safe_filename(prompt, index)}_{k}.png"
        for index, prompt in enumerate(PROMPTS)
        for k in range(images_per_prompt)
    ]


# ---------------------------------------------------------------- the custom-MDM example


def test_custom_mdm_example_runs() -> None:
    result = run_python([str(REPO / "examples" / "custom_mdm.py")])

    assert result.returncode == 0, describe(result)
    assert "Held-out table" in result.stdout, describe(result)
    assert "| overall |" in result.stdout, describe(result)
    assert "trained_T8" in result.stdout, describe(result)
    for name in KNOB_NAMES:
        assert name in result.stdout, describe(result)


# ---------------------------------------------------------------- generate_images


def test_generate_images_shape_and_range(trained: dict[str, Any]) -> None:
    images = generate_images(trained["module"], PROMPTS, images_per_prompt=2)

    assert images.shape == (len(PROMPTS) * 2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert images.dtype == torch.float32
    assert float(images.min()) >= 0.0
    assert float(images.max()) <= 1.0


def test_generate_images_seed_reproducible(trained: dict[str, Any]) -> None:
    module = trained["module"]

    first = generate_images(module, PROMPTS, seed=3)
    again = generate_images(module, PROMPTS, seed=3)
    other = generate_images(module, PROMPTS, seed=4)

    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_generate_images_batches_match_rows(trained: dict[str, Any]) -> None:
    module = trained["module"]

    whole = generate_images(module, PROMPTS, images_per_prompt=2, prompts_per_batch=8)
    split = generate_images(module, PROMPTS, images_per_prompt=2, prompts_per_batch=1)

    assert split.shape == whole.shape
    # one prompt per batch gives a single-prompt rollout, so the first prompt's images agree
    assert torch.equal(split[:2], generate_images(module, PROMPTS[:1], images_per_prompt=2))


def test_untrained_learned_equals_predefined() -> None:
    module = make_module()  # a zero schedule action reproduces the predefined schedule exactly

    learned = generate_images(module, PROMPTS, schedule="learned", seed=1)
    predefined = generate_images(module, PROMPTS, schedule="predefined", seed=1)

    assert torch.equal(learned, predefined)


def test_trained_schedule_differs_from_predefined(trained: dict[str, Any]) -> None:
    module = trained["module"]

    learned = schedule_values(module, schedule="learned")
    predefined = schedule_values(module, schedule="predefined")

    assert learned == module.export_schedule()
    assert learned != predefined, "the joint step did not change the schedule, so the CLI checks prove less"


def test_schedule_values_step_counts(trained: dict[str, Any]) -> None:
    module = trained["module"]

    for num_steps, expected in ((None, NUM_STEPS), (1, 1), (9, 9)):
        for kind in ("learned", "predefined"):
            values = schedule_values(module, num_steps, kind)
            assert list(values) == list(KNOB_NAMES), (kind, num_steps)
            assert all(len(column) == expected for column in values.values()), (kind, num_steps)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prompts": "a red circle"}, "single string"),
        ({"prompts": []}, "prompts is empty"),
        ({"prompts": ["ok", 3]}, r"prompts\[1\] must be a string"),
        ({"num_steps": 0}, "num_steps must be an integer >= 1"),
        ({"images_per_prompt": 0}, "images_per_prompt must be an integer >= 1"),
        ({"prompts_per_batch": 2.5}, "prompts_per_batch must be an integer >= 1"),
        ({"schedule": "cosine"}, "schedule must be one of learned, predefined"),
    ],
)
def test_generate_images_rejects_bad_arguments(
    trained: dict[str, Any], options: dict[str, Any], message: str
) -> None:
    arguments = {"prompts": PROMPTS, **options}

    with pytest.raises(ValueError, match=message):
        generate_images(trained["module"], **arguments)


# ---------------------------------------------------------------- files and loading


def test_load_module_restores_weights(trained: dict[str, Any]) -> None:
    loaded = load_module(trained["checkpoint"], trained["mdm_dir"])

    assert loaded.export_schedule() == trained["module"].export_schedule()
    reference = generate_images(trained["module"], PROMPTS, seed=5)
    assert torch.equal(generate_images(loaded, PROMPTS, seed=5), reference)


def test_write_images_files(trained: dict[str, Any], tmp_path: Path) -> None:
    module = trained["module"]

    output = write_images(module, PROMPTS, tmp_path / "out", images_per_prompt=2, seed=2)

    assert [path.name for path in output.image_paths] == expected_names(2)
    images = generate_images(module, PROMPTS, images_per_prompt=2, seed=2)
    for path, image in zip(output.image_paths, images, strict=True):
        expected = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(read_png(path), expected, err_msg=path.name)
    assert output.schedule_path == tmp_path / "out" / "schedule.json"
    assert json.loads(output.schedule_path.read_text()) == module.export_schedule()


def test_write_images_invalid_writes_nothing(trained: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="images_per_prompt must be an integer >= 1"):
        write_images(trained["module"], PROMPTS, tmp_path / "out", images_per_prompt=0)

    assert not (tmp_path / "out").exists()


def test_write_images_state_head_skips_schedule(tmp_path: Path) -> None:
    module = make_module(schedule_head="state")

    output = write_images(module, PROMPTS[:1], tmp_path, num_steps=2)

    assert output.schedule_path is None
    assert not (tmp_path / "schedule.json").exists()
    assert len(output.image_paths) == 1


# ---------------------------------------------------------------- command line


def test_cli_writes_pngs_and_schedule(trained: dict[str, Any], tmp_path: Path) -> None:
    out_dir = tmp_path / "images"
    num_steps = 6

    result = run_python(
        [
            "-m", "cogrpo_lightning.generate",
            "--ckpt", str(trained["checkpoint"]),
            "--prompts", str(trained["prompt_file"]),
            "--out-dir", str(out_dir),
            "--num-steps", str(num_steps),
            "--images-per-prompt", "2",
            "--seed", "7",
            "--mdm-checkpoint-dir", str(trained["mdm_dir"]),
            "--device", "cpu",
        ]
    )

    assert result.returncode == 0, describe(result)
    assert "wrote 6 images (3 prompts x 2)" in result.stdout, describe(result)
    pngs = sorted(path.name for path in out_dir.glob("*.png"))
    assert pngs == sorted(expected_names(2))
    assert len(set(pngs)) == 6
    assert all(name.isascii() for name in pngs)
    assert "00002_0.png" in pngs, "the CJK-only prompt should be named by its index alone"

    images = generate_images(trained["module"], PROMPTS, num_steps, images_per_prompt=2, seed=7)
    for name, image in zip(expected_names(2), images, strict=True):
        pixels = read_png(out_dir / name)
        assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3), name
        expected = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(pixels, expected, err_msg=name)

    schedule = json.loads((out_dir / "schedule.json").read_text())
    assert list(schedule) == list(KNOB_NAMES)
    for name, values in schedule.items():
        assert len(values) == num_steps, name
        assert all(isinstance(value, float) for value in values), name
    assert schedule == trained["module"].export_schedule(num_steps)


def test_cli_predefined_schedule(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        [
            "--ckpt", str(trained["checkpoint"]),
            "--prompts", str(trained["prompt_file"]),
            "--out-dir", str(tmp_path),
            "--schedule", "predefined",
            "--mdm-checkpoint-dir", str(trained["mdm_dir"]),
            "--device", "cpu",
        ]
    )

    assert status == 0, capsys.readouterr().err
    assert "wrote the predefined schedule" in capsys.readouterr().out
    schedule = json.loads((tmp_path / "schedule.json").read_text())
    assert schedule == schedule_values(trained["module"], NUM_STEPS, "predefined")
    assert len(list(tmp_path.glob("*.png"))) == len(PROMPTS)


@pytest.mark.parametrize("missing", ["--ckpt", "--prompts"])
def test_cli_missing_input_file(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    paths = {"--ckpt": str(trained["checkpoint"]), "--prompts": str(trained["prompt_file"])}
    paths[missing] = str(tmp_path / "absent.file")
    arguments = [part for option, path in paths.items() for part in (option, path)]

    with pytest.raises(SystemExit) as exit_info:
        main([*arguments, "--out-dir", str(tmp_path / "out")])

    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "not found" in error
    assert str(tmp_path / "absent.file") in error
    assert not (tmp_path / "out").exists()


def test_cli_wrong_mdm_explains_option(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # without --mdm-checkpoint-dir the shipped tiny MDM is rebuilt, which has another architecture
    status = main(
        [
            "--ckpt", str(trained["checkpoint"]),
            "--prompts", str(trained["prompt_file"]),
            "--out-dir", str(tmp_path / "out"),
            "--device", "cpu",
        ]
    )

    assert status == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ")
    assert "--mdm-checkpoint-dir" in error or "tiny MDM checkpoint file not found" in error
    assert not list(tmp_path.glob("out/*.png"))


def test_cli_out_dir_is_file(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "taken.png"
    out_file.write_bytes(b"")

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--ckpt", str(trained["checkpoint"]),
                "--prompts", str(trained["prompt_file"]),
                "--out-dir", str(out_file),
            ]
        )

    assert exit_info.value.code == 2
    assert f"--out-dir {out_file} is a file" in capsys.readouterr().err


@pytest.mark.skipif(
    not (DEFAULT_CHECKPOINT / "model.safetensors").is_file(),
    reason="the shipped tiny MDM checkpoint is missing",
)
def test_cli_default_shipped_mdm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a checkpoint trained with the default mdm=None loads without --mdm-checkpoint-dir
    module = CoGRPOModule(reward=BrightnessReward(), group_size=2, num_steps=NUM_STEPS)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, PromptDataModule(prompts_per_batch=1, group_size=2, max_train_prompts=1))
    trainer.save_checkpoint(tmp_path / "default.ckpt")
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")

    status = main(
        [
            "--ckpt", str(tmp_path / "default.ckpt"),
            "--prompts", str(prompt_file),
            "--out-dir", str(tmp_path / "out"),
        ]
    )

    assert status == 0, capsys.readouterr().err
    assert sorted(path.name for path in (tmp_path / "out").glob("*.png")) == sorted(expected_names(1))
    assert json.loads((tmp_path / "out" / "schedule.json").read_text()) == module.export_schedule()
