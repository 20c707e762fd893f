"""Command line: ``python -m cogrpo_lightning fit --config configs/shapes/cogrpo.yaml``.

A LightningCLI in subclass mode: every config names its model and data classes with ``class_path``,
so Co-GRPO runs and masked-token pretraining share one entry point. The group size is set once, as
``data.group_size``, and copied into ``model.group_size`` before the classes are built.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

_DATA_GROUP_KEY = "group_size"


class CoGRPOCLI(LightningCLI):
    """LightningCLI that links the data module's group size to the model's."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        _link_group_size(config)


def _link_group_size(config: Any) -> None:
    model_args = config.model.get("init_args") if hasattr(config.model, "get") else None
    data = config.get("data")
    data_args = data.get("init_args") if data is not None and hasattr(data, "get") else None
    if model_args is None or data_args is None:
        return
    if _DATA_GROUP_KEY not in data_args or _DATA_GROUP_KEY not in model_args:
        return
    data_value, model_value = data_args[_DATA_GROUP_KEY], model_args[_DATA_GROUP_KEY]
    if model_value != data_value and model_value != _default_group_size(config.model):
        raise ValueError(
            f"model.group_size={model_value} differs from data.group_size={data_value}; the group size "
            "is set once, as data.group_size, and linked to the model: remove model.group_size"
        )
    model_args[_DATA_GROUP_KEY] = data_value


def _default_group_size(model_config: Any) -> Any:
    import importlib
    import inspect

    module_name, _, class_name = str(model_config.get("class_path", "")).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        return inspect.signature(cls.__init__).parameters[_DATA_GROUP_KEY].default
    except (ImportError, AttributeError, KeyError, ValueError):
        return None


def main(args: list[str] | None = None) -> CoGRPOCLI:
    """Run the CLI (``args`` None reads ``sys.argv``)."""
    return CoGRPOCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
