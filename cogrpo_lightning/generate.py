"""Generate images for a prompt file with a trained Co-GRPO checkpoint and its learned schedule.

Command line::

    python -m cogrpo_lightning.generate --ckpt PATH --prompts FILE --out-dir DIR

writes ``<safe_filename(prompt, index)>_<k>.png`` for image k of every prompt, and ``schedule.json``
with the per-step knob values that the images were sampled with. In Python, :func:`generate_images`
returns the images as one tensor.

Sampling uses the schedule policy's mean action at every step (no schedule noise), like the
held-out evaluation, so a fixed seed, step count and ``prompts_per_batch`` give the same images.
Shapes: B prompts, K images per prompt, N = B * K images, T sampling steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cogrpo_lightning.data.readers import (
    PROMPT_FILE_FORMATS,
    PromptFileError,
    read_prompts,
    safe_filename,
)
from cogrpo_lightning.evaluation import predefined_policy
from cogrpo_lightning.module import CoGRPOModule
from cogrpo_lightning.sampling import rollout
from cogrpo_lightning.schedule.knobs import KNOB_NAMES
from cogrpo_lightning.schedule.policy import SchedulePolicy

SCHEDULE_KINDS: tuple[str, ...] = ("learned", "predefined")
SCHEDULE_FILENAME = "schedule.json"


@dataclass
class GenerationOutput:
    """Files written by :func:`write_images`.

    Attributes:
        image_paths: PNG paths in prompt order, K per prompt.
        schedule_path: the ``schedule.json`` path, or None when the schedule has no single per-step
            table (a learned state-head policy, whose knobs depend on the prompt and the canvas).
    """

    image_paths: list[Path]
    schedule_path: Path | None


def generate_images(
    module: CoGRPOModule,
    prompts: Sequence[str],
    num_steps: int | None = None,
    images_per_prompt: int = 1,
    seed: int = 0,
    schedule: str = "learned",
    prompts_per_batch: int = 8,
) -> Tensor:
    """Generate K images per prompt: [B * K, 3, H, W] float in [0, 1], rows b*K .. b*K+K-1 for prompt b.

    Args:
        module: the trained module, e.g. from ``CoGRPOModule.load_from_checkpoint``. It is put in
            eval mode. Images are generated on ``module.device``.
        prompts: B prompt strings.
        num_steps: T, sampling steps; None uses the step count the module was trained with
            (``module.hparams.num_steps``). A learned per-step schedule is interpolated for another T.
        images_per_prompt: K, images per prompt.
        seed: seed of the random generator that draws the tokens and the re-masking noise.
        schedule: ``"learned"`` samples with the trained schedule policy's mean action,
            ``"predefined"`` with the hand-designed schedule the policy started from.
        prompts_per_batch: prompts sampled together. The images depend on it, because one
            generator draws for every prompt of a batch.
    """
    batches = iter_image_batches(
        module, prompts, num_steps, images_per_prompt, seed, schedule, prompts_per_batch
    )
    return torch.cat(list(batches))


def iter_image_batches(
    module: CoGRPOModule,
    prompts: Sequence[str],
    num_steps: int | None = None,
    images_per_prompt: int = 1,
    seed: int = 0,
    schedule: str = "learned",
    prompts_per_batch: int = 8,
) -> Iterator[Tensor]:
    """Yield the images of :func:`generate_images` one batch of prompts at a time.

    Each item is [b * K, 3, H, W] for the next b <= ``prompts_per_batch`` prompts, so a long
    prompt file never keeps all its images in memory. The arguments are those of
    :func:`generate_images`, which concatenates the items.
    """
    # The checks run here, when the function is called, and not at the first next() of a generator.
    prompts = _check_prompts(prompts)
    num_steps = _resolve_num_steps(module, num_steps)
    _check_positive_int("images_per_prompt", images_per_prompt)
    _check_positive_int("prompts_per_batch", prompts_per_batch)
    policy = _schedule_policy(module, schedule, num_steps)
    return _rollout_batches(module, policy, prompts, num_steps, images_per_prompt, seed, prompts_per_batch)


def _rollout_batches(
    module: CoGRPOModule,
    policy: SchedulePolicy,
    prompts: list[str],
    num_steps: int,
    images_per_prompt: int,
    seed: int,
    prompts_per_batch: int,
) -> Iterator[Tensor]:
    module.eval()
    generator = torch.Generator(device=module.device)
    generator.manual_seed(seed)
    for start in range(0, len(prompts), prompts_per_batch):
        trajectory = rollout(
            module.mdm,
            policy,
            prompts[start : start + prompts_per_batch],
            images_per_prompt,
            num_steps,
            negative_prompt=module.hparams.negative_prompt,
            deterministic_schedule=True,
            generator=generator,
        )
        assert trajectory.images is not None  # rollout decodes by default
        yield trajectory.images


def schedule_values(
    module: CoGRPOModule, num_steps: int | None = None, schedule: str = "learned"
) -> dict[str, list[float]]:
    """Return the per-step knob values of a schedule as plain floats: knob name -> T values.

    ``"learned"`` is :meth:`CoGRPOModule.export_schedule`, which raises ValueError for a state-head
    policy. ``"predefined"`` is the hand-designed schedule. ``num_steps`` None uses the training T.
    """
    num_steps = _resolve_num_steps(module, num_steps)
    _check_schedule_kind(schedule)
    if schedule == "learned":
        return module.export_schedule(num_steps)
    table = module.predefined_schedule.values(num_steps, dtype=torch.float64)  # [T, S]
    return {name: table[:, index].tolist() for index, name in enumerate(KNOB_NAMES)}


def write_images(
    module: CoGRPOModule,
    prompts: Sequence[str],
    out_dir: str | Path,
    num_steps: int | None = None,
    images_per_prompt: int = 1,
    seed: int = 0,
    schedule: str = "learned",
    prompts_per_batch: int = 8,
) -> GenerationOutput:
    """Generate images as in :func:`generate_images` and write them as PNGs plus ``schedule.json``.

    Image k of prompt i is ``<out_dir>/<safe_filename(prompt, i)>_<k>.png``, where i is the
    prompt's 0-based position in `prompts`. Existing files with these names are overwritten.
    """
    prompts = _check_prompts(prompts)
    num_steps = _resolve_num_steps(module, num_steps)
    batches = iter_image_batches(
        module, prompts, num_steps, images_per_prompt, seed, schedule, prompts_per_batch
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    schedule_path: Path | None = out_dir / SCHEDULE_FILENAME
    if schedule == "learned" and module.policy.head != "per_step":
        schedule_path = None
    else:
        values = schedule_values(module, num_steps, schedule)
        schedule_path.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")

    image_paths: list[Path] = []
    for batch_number, images in enumerate(batches):
        first_prompt = batch_number * prompts_per_batch
        for row, image in enumerate(images):
            prompt_index = first_prompt + row // images_per_prompt
            image_number = row % images_per_prompt
            stem = safe_filename(prompts[prompt_index], prompt_index)
            path = out_dir / f"{stem}_{image_number}.png"
            save_png(image, path)
            image_paths.append(path)
    return GenerationOutput(image_paths=image_paths, schedule_path=schedule_path)


def save_png(image: Tensor, path: str | Path) -> None:
    """Write one image [3, H, W] float in [0, 1] as an 8-bit RGB PNG."""
    from PIL import Image

    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape [3, H, W], got {list(image.shape)}")
    pixels = (image.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).cpu().numpy()  # [H, W, 3]
    Image.fromarray(array).save(path, format="PNG")


def load_module(
    checkpoint: str | Path, mdm_checkpoint_dir: str | Path | None = None, device: str | torch.device = "cpu"
) -> CoGRPOModule:
    """Load a CoGRPOModule checkpoint for generation and move it to `device`.

    The MDM is not stored in the checkpoint's hyper-parameters, so it is rebuilt before the weights
    are loaded: the tiny MDM shipped with the package by default, or ``TinyMDM(checkpoint_dir=
    mdm_checkpoint_dir)`` for a checkpoint trained with another TinyMDM architecture. A checkpoint
    trained with another MDM class needs ``CoGRPOModule.load_from_checkpoint(path, mdm=...)``.
    The reward models are not stored in checkpoints either and are rebuilt from their defaults;
    generation never calls them.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {checkpoint}; pass a .ckpt file written by Trainer.fit "
            "(under <default_root_dir>/lightning_logs/version_*/checkpoints/) or by trainer.save_checkpoint"
        )
    from cogrpo_lightning.mdm.tiny import TinyMDM

    if mdm_checkpoint_dir is None:
        mdm = TinyMDM.from_pretrained()
        mdm_source = "the tiny MDM shipped with the package"
    else:
        mdm = TinyMDM(checkpoint_dir=str(mdm_checkpoint_dir))
        mdm_source = f"TinyMDM(checkpoint_dir={str(mdm_checkpoint_dir)!r})"
    try:
        module = CoGRPOModule.load_from_checkpoint(checkpoint, map_location="cpu", mdm=mdm)
    except RuntimeError as error:
        if "state_dict" not in str(error):
            raise
        # torch lists every missing and mismatched key, which runs to pages for a whole model
        details = str(error)
        if len(details) > 500:
            details = details[:500] + " ..."
        raise ValueError(
            f"the MDM weights in {checkpoint} do not fit {mdm_source}: {details}\n"
            "Pass the TinyMDM directory of the training run (written by TinyMDM.save_pretrained) as "
            "--mdm-checkpoint-dir, or for another MDM class load the checkpoint in Python with "
            "CoGRPOModule.load_from_checkpoint(path, mdm=YourMDM()) and call generate_images."
        ) from None
    return module.to(device)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``python -m cogrpo_lightning.generate``."""
    parser = argparse.ArgumentParser(
        prog="python -m cogrpo_lightning.generate",
        description=(
            "Generate images for a prompt file with a trained CoGRPOModule checkpoint and write them "
            "as PNGs, plus schedule.json with the per-step knob values used. The default tiny MDM is "
            "rebuilt from the package. A checkpoint trained with another TinyMDM needs "
            "--mdm-checkpoint-dir. One trained with another MDM class must be loaded in Python with "
            "CoGRPOModule.load_from_checkpoint(path, mdm=YourMDM()) and "
            "cogrpo_lightning.generate.write_images(module, prompts, out_dir)."
        ),
    )

    parser.add_argument("--ckpt", required=True, help="CoGRPOModule checkpoint (.ckpt) to load")
    parser.add_argument(
        "--prompts",
        required=True,
        help="prompt file: .txt (one prompt per line), .jsonl or .csv with a 'prompt' field, "
        "or a DPG-Bench folder",
    )
    parser.add_argument(
        "--prompt-format",
        choices=PROMPT_FILE_FORMATS,
        default=None,
        help="format of --prompts (default: detected from the suffix, a folder is dpg)",
    )
    parser.add_argument(
        "--out-dir",
        required=True,
        help="output folder, created if missing; files of the same name are overwritten",
    )

    parser.add_argument(
        "--num-steps",
        type=int,
        default=None,
        help="sampling steps T (default: the checkpoint's training num_steps); a learned per-step "
        "schedule is interpolated for another T",
    )
    parser.add_argument(
        "--images-per-prompt", type=int, default=1, help="images generated per prompt (default: 1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the token sampling (default: 0)")
    parser.add_argument(
        "--schedule",
        choices=SCHEDULE_KINDS,
        default="learned",
        help="learned: the trained schedule policy's mean action; predefined: the hand-designed "
        "schedule it started from (default: learned)",
    )
    parser.add_argument(
        "--prompts-per-batch",
        type=int,
        default=8,
        help="prompts sampled together; the images depend on it through the shared generator (default: 8)",
    )

    parser.add_argument(
        "--mdm-checkpoint-dir",
        default=None,
        help="TinyMDM directory written by TinyMDM.save_pretrained whose config.json matches the "
        "checkpoint's MDM; the weights come from --ckpt (default: the tiny MDM shipped with the package)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device to generate on, e.g. cpu or cuda:0 (default: cuda when available, else cpu)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (``argv`` None reads ``sys.argv``) and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not Path(args.ckpt).is_file():
        parser.error(
            f"checkpoint not found: {args.ckpt}; pass a .ckpt file written by Trainer.fit or "
            "trainer.save_checkpoint"
        )
    if not Path(args.prompts).exists():
        parser.error(
            f"prompt file not found: {args.prompts}; pass a .txt file with one prompt per line, a .jsonl "
            "or .csv file with a 'prompt' field, or a DPG-Bench folder"
        )
    if Path(args.out_dir).is_file():
        parser.error(f"--out-dir {args.out_dir} is a file; pass a folder path")

    try:
        records = read_prompts(args.prompts, args.prompt_format)
        module = load_module(args.ckpt, args.mdm_checkpoint_dir, args.device)
        output = write_images(
            module,
            [record.prompt for record in records],
            args.out_dir,
            num_steps=args.num_steps,
            images_per_prompt=args.images_per_prompt,
            seed=args.seed,
            schedule=args.schedule,
            prompts_per_batch=args.prompts_per_batch,
        )
    except (FileNotFoundError, PromptFileError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    print(
        f"wrote {len(output.image_paths)} images ({len(records)} prompts x {args.images_per_prompt}) "
        f"to {args.out_dir}"
    )
    if output.schedule_path is not None:
        print(f"wrote the {args.schedule} schedule to {output.schedule_path}")
    else:
        print(
            f"no {SCHEDULE_FILENAME} written: the learned state-head schedule depends on the prompt and "
            "the canvas, so it has no single per-step table"
        )
    return 0


def _schedule_policy(module: CoGRPOModule, schedule: str, num_steps: int) -> SchedulePolicy:
    """Return the module's learned policy, or one with every knob frozen at the predefined schedule."""
    _check_schedule_kind(schedule)
    if schedule == "learned":
        return module.policy
    return predefined_policy(module, num_steps)


def _resolve_num_steps(module: CoGRPOModule, num_steps: int | None) -> int:
    if num_steps is None:
        return int(module.hparams.num_steps)
    _check_positive_int("num_steps", num_steps)
    return num_steps


def _check_schedule_kind(schedule: str) -> None:
    if schedule not in SCHEDULE_KINDS:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULE_KINDS)}, got {schedule!r}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of strings, got a single string; wrap it in a list")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{index}] must be a string, got {type(prompt).__name__}")
    return prompts


if __name__ == "__main__":
    sys.exit(main())
