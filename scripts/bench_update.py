"""Measure one rollout against one GRPO update of the model over all T steps, side by side.

The update replays every step with gradients (forward plus backward, conditional and
unconditional branches), so it should cost about 3x the rollout's forwards. Also reports the
trajectory's memory next to the [N, L, V] float32 log-probs that are never stored.

    python scripts/bench_update.py --prompts 8 --group-size 8 --steps 16 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time

import torch

from cogrpo_lightning.grpo import clipped_surrogate, group_advantages
from cogrpo_lightning.mdm.tiny import TinyMDM
from cogrpo_lightning.sampling import prepare_conditions, recompute_log_probs, rollout
from cogrpo_lightning.schedule.policy import SchedulePolicy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = TinyMDM.from_pretrained().eval()
    policy = SchedulePolicy(args.steps, model.default_schedule())
    prompts = ["a photo of three red circles"] * args.prompts
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rollout_times, update_times = [], []
    for repeat in range(args.repeats + 1):
        generator = torch.Generator().manual_seed(repeat)
        started = time.perf_counter()
        trajectory = rollout(model, policy, prompts, args.group_size, args.steps, generator=generator)
        rollout_time = time.perf_counter() - started

        rewards = torch.rand(trajectory.num_samples, generator=generator)
        advantages = group_advantages(rewards, args.group_size).advantages
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for step in range(args.steps):
            condition, negative = prepare_conditions(model, prompts, args.group_size)
            log_probs, fill_mask, _ = recompute_log_probs(model, trajectory, step, condition, negative)
            loss = clipped_surrogate(log_probs, trajectory.old_token_log_probs, advantages, mask=fill_mask).loss
            (loss / args.steps).backward()
        optimizer.step()
        update_time = time.perf_counter() - started
        if repeat > 0:  # the first round warms up allocators and kernels
            rollout_times.append(rollout_time)
            update_times.append(update_time)

    n, length, vocab = trajectory.num_samples, model.num_tokens, model.codebook_size
    stored = sum(
        t.numel() * t.element_size()
        for t in (trajectory.final_ids, trajectory.fill_step, trajectory.actions, trajectory.knobs,
                  trajectory.old_token_log_probs, trajectory.old_schedule_log_probs)
    )
    rollout_median, update_median = statistics.median(rollout_times), statistics.median(update_times)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"B={args.prompts} G={args.group_size} N={n} T={args.steps} L={length} V={vocab}")
    print(f"rollout (median of {args.repeats}): {rollout_median:.3f} s")
    print(f"update over all {args.steps} steps (median of {args.repeats}): {update_median:.3f} s")
    print(f"update / rollout: {update_median / rollout_median:.2f}")
    print(f"trajectory tensors: {stored / 1024:.1f} KiB; one step's [N, L, V] float32 log-probs: "
          f"{n * length * vocab * 4 / 1024:.1f} KiB; T steps of them: {args.steps * n * length * vocab * 4 / 1024**2:.1f} MiB")
    print(f"peak resident memory of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
