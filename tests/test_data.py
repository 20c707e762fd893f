"""Tests for the prompt-file readers, safe_filename and PromptDataModule."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from cogrpo_lightning.data import (
    PromptDataModule,
    PromptFileError,
    PromptRecord,
    check_batch_layout,
    detect_format,
    read_csv_prompts,
    read_dpg_prompts,
    read_geneval_metadata,
    read_jsonl_prompts,
    read_prompts,
    read_txt_prompts,
    safe_filename,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LONG_LINE = ("a long prompt " * 143)[:1994] + "end!!!"  # 2,000 characters

GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {
        "tag": "counting",
        "include": [{"class": "cat", "count": 2}],
        "exclude": [{"class": "cat", "count": 3}],
        "prompt": "a photo of two cats",
    },
    {
        "tag": "position",
        "include": [{"class": "dog", "count": 1}, {"class": "car", "count": 1, "position": ["left of", 0]}],
        "prompt": "a photo of a car left of a dog",
    },
]


def write_jsonl(path: Path, objects: list[dict]) -> Path:
    path.write_text("".join(json.dumps(obj) + "\n" for obj in objects), encoding="utf-8")
    return path


def write_prompts(path: Path, count: int) -> Path:
    return write_jsonl(path, [{"prompt": f"prompt {i}", "number": i} for i in range(count)])


# ---- readers ------------------------------------------------------------------------------------


def test_txt_blank_bom_cjk_long_lines(tmp_path: Path) -> None:
    lines = [
        "a red circle  ",
        "",
        "   ",
        "\t",
        "  une pomme rôtie sur la table",
        "一只红色的猫和两只蓝色的狗",
        LONG_LINE,
        "",
    ]
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8"))

    records = read_txt_prompts(path)
    prompts = [record.prompt for record in records]

    assert len(LONG_LINE) == 2000
    assert prompts == [
        "a red circle  ",
        "  une pomme rôtie sur la table",
        "一只红色的猫和两只蓝色的狗",
        LONG_LINE,
    ]
    assert all(record.metadata == {} for record in records)
    assert read_prompts(path) == records

    # logging and output file names must cope with every prompt
    logging.getLogger("test_data").warning("prompts: %s", prompts)
    names = [safe_filename(prompt, index) for index, prompt in enumerate(prompts)]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[a-z0-9_]{1,80}", name) for name in names)
    for name in names:
        (tmp_path / f"{name}.png").write_bytes(b"")


def test_txt_keeps_spaces_and_lf_endings(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text(" leading\ntrailing \n\nlast line without newline", encoding="utf-8")
    assert [record.prompt for record in read_txt_prompts(path)] == [
        " leading",
        "trailing ",
        "last line without newline",
    ]


def test_jsonl_keeps_other_keys(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "a cat", "tag": "animals", "seed": 3}\n'
        "\n"
        '{"prompt": "a dog", "extra": {"nested": [1, 2]}}\n',
        encoding="utf-8",
    )
    records = read_jsonl_prompts(path)
    assert [record.prompt for record in records] == ["a cat", "a dog"]
    assert records[0].metadata == {"prompt": "a cat", "tag": "animals", "seed": 3}
    assert records[1].metadata["extra"] == {"nested": [1, 2]}


def test_geneval_records_kept_whole(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "evaluation_metadata.jsonl", GENEVAL_LINES)
    for records in (read_prompts(path), read_prompts(path, "geneval"), read_geneval_metadata(path)):
        assert [record.metadata for record in records] == GENEVAL_LINES
        assert [record.prompt for record in records] == [line["prompt"] for line in GENEVAL_LINES]


def test_geneval_missing_tag_names_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "meta.jsonl", [GENEVAL_LINES[0], {"include": [], "prompt": "no tag"}])
    with pytest.raises(PromptFileError, match=r"meta\.jsonl:2: missing or non-string 'tag'"):
        read_geneval_metadata(path)


def test_csv_prompt_column_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "prompts.csv"
    path.write_text(
        '\ufeffid,prompt,category\n1,"a cat, sitting",animals\n\n2,"two lines\nof text",misc\n',
        encoding="utf-8",
    )
    records = read_csv_prompts(path)
    assert [record.prompt for record in records] == ["a cat, sitting", "two lines\nof text"]
    assert records[0].metadata == {"id": "1", "prompt": "a cat, sitting", "category": "animals"}
    assert read_prompts(path) == records


def test_csv_errors_name_line(tmp_path: Path) -> None:
    path = tmp_path / "no_prompt.csv"
    path.write_text("text,category\na cat,animals\n", encoding="utf-8")
    with pytest.raises(
        PromptFileError, match=r"no_prompt\.csv:1: missing 'prompt' column.*\['text', 'category'\]"
    ):
        read_csv_prompts(path)

    path = tmp_path / "ragged.csv"
    path.write_text("prompt,category\na cat,animals\na dog\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"ragged\.csv:3: row has 1 fields but the header has 2"):
        read_csv_prompts(path)

    path = tmp_path / "blank_prompt.csv"
    path.write_text("prompt,category\na cat,animals\n  ,misc\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"blank_prompt\.csv:3: empty 'prompt'"):
        read_csv_prompts(path)

    path = tmp_path / "header_only.csv"
    path.write_text("prompt,category\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"header_only\.csv: contains no prompts"):
        read_csv_prompts(path)


def test_dpg_folder_sorted_naturally(tmp_path: Path) -> None:
    folder = tmp_path / "prompts"
    folder.mkdir()
    texts = {
        "10": "ten",
        "2": "two\n",
        "1": "one",
        "partiprompts10": "p10",
        "partiprompts9": "p9",
        "COCOval7": "coco",
    }
    for item_id, text in texts.items():
        (folder / f"{item_id}.txt").write_text(text, encoding="utf-8")
    (folder / "README.md").write_text("not a prompt", encoding="utf-8")

    records = read_dpg_prompts(folder)
    item_ids = [record.metadata["item_id"] for record in records]
    assert item_ids == ["1", "2", "10", "COCOval7", "partiprompts9", "partiprompts10"]
    assert [record.prompt for record in records][:3] == ["one", "two", "ten"]
    assert all(record.metadata == {"item_id": record.metadata["item_id"]} for record in records)
    assert detect_format(folder) == "dpg"
    assert read_prompts(folder) == records


def test_dpg_folder_errors(tmp_path: Path) -> None:
    folder = tmp_path / "empty_folder"
    folder.mkdir()
    with pytest.raises(PromptFileError, match=r"empty_folder: no <item_id>\.txt prompt files"):
        read_dpg_prompts(folder)

    (folder / "5.txt").write_text(" \n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"5\.txt: empty DPG-Bench prompt file"):
        read_dpg_prompts(folder)

    with pytest.raises(FileNotFoundError, match="DPG-Bench prompt folder not found: .*missing_folder"):
        read_dpg_prompts(tmp_path / "missing_folder")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "bad.jsonl",
            "".join(f'{{"prompt": "p{i}"}}\n' for i in range(6)) + '{"prompt": "p6",}\n',
            r"bad\.jsonl:7: invalid JSON \(.*\); each line must be one JSON object",
        ),
        (
            "nokey.jsonl",
            '{"prompt": "a"}\n{"prompt": "b"}\n{"text": "c", "tag": "x"}\n',
            r"nokey\.jsonl:3: missing 'prompt' key; found keys \['tag', 'text'\]",
        ),
        ("number.jsonl", '{"prompt": 12}\n', r"number\.jsonl:1: 'prompt' must be a string, got int"),
        ("list.jsonl", '{"prompt": "a"}\n["b"]\n', r"list\.jsonl:2: expected a JSON object, got list"),
        ("blank.jsonl", '{"prompt": "   "}\n', r"blank\.jsonl:1: empty 'prompt'"),
        ("empty.jsonl", "", r"empty\.jsonl: contains no prompts"),
        ("empty.txt", "", r"empty\.txt: contains no prompts"),
        ("spaces.txt", "\n   \n\t\n", r"spaces\.txt: contains no prompts"),
        (
            "prompts.json",
            '{"prompt": "a"}',
            r"prompts\.json: cannot tell the prompt format from the suffix '\.json'",
        ),
    ],
)
def test_bad_file_names_file_and_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptFileError, match=message):
        read_prompts(path)


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("first\nsecond\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match=r"latin1\.txt:3: invalid UTF-8 at byte 16"):
        read_txt_prompts(path)


def test_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "prompts.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(f"prompt file not found: {missing}")):
        read_prompts(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        read_txt_prompts(missing)


def test_explicit_format_overrides_suffix(tmp_path: Path) -> None:
    path = tmp_path / "prompts.data"
    path.write_text("a cat\na dog\n", encoding="utf-8")
    assert [record.prompt for record in read_prompts(path, "txt")] == ["a cat", "a dog"]
    with pytest.raises(ValueError, match="unknown prompt file format 'yaml'; expected one of txt, jsonl"):
        read_prompts(path, "yaml")  # type: ignore[arg-type]


# ---- safe_filename ------------------------------------------------------------------------------


def test_safe_filename_cases() -> None:
    assert safe_filename("A red circle", 12) == "00012_a_red_circle"
    assert safe_filename("Crème brûlée à côté", 0) == "00000_creme_brulee_a_cote"
    assert safe_filename("一只红色的猫", 3) == "00003"
    assert safe_filename("../../etc/passwd", 1) == "00001_etc_passwd"
    assert safe_filename('a<b>c:d"e/f\\g|h?i*j', 2) == "00002_a_b_c_d_e_f_g_h_i_j"
    assert safe_filename("x" * 2000, 123456) == "123456_" + "x" * 73


def test_safe_filename_unique_and_bounded() -> None:
    prompts = ["same prompt"] * 3 + ["一只猫", "一只狗", "a/b", "a\\b", "a b", LONG_LINE, LONG_LINE + "!"]
    names = [safe_filename(prompt, index, max_length=40) for index, prompt in enumerate(prompts)]
    assert len(set(names)) == len(names)
    for name in names:
        assert 1 <= len(name) <= 40
        assert re.fullmatch(r"[a-z0-9_]+", name)
        assert not name.endswith("_")


def test_safe_filename_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="index must be >= 0, got -1"):
        safe_filename("a cat", -1)
    with pytest.raises(ValueError, match="max_length=3 is too short for the index '00007'; use at least 5"):
        safe_filename("a cat", 7, max_length=3)


# ---- PromptDataModule ---------------------------------------------------------------------------


def make_datamodule(tmp_path: Path, num_train: int = 10, num_val: int = 5, **options) -> PromptDataModule:
    train = write_prompts(tmp_path / "train.jsonl", num_train)
    val = write_prompts(tmp_path / "val.jsonl", num_val)
    return PromptDataModule(train_file=str(train), val_file=str(val), **options)


def test_train_batches_have_b_prompts(tmp_path: Path) -> None:
    datamodule = make_datamodule(tmp_path, prompts_per_batch=4, group_size=2, shuffle=False)
    batches = list(datamodule.train_dataloader())

    assert len(batches) == 2  # 10 prompts, full batches of 4 only
    assert batches[0]["prompts"] == ["prompt 0", "prompt 1", "prompt 2", "prompt 3"]
    assert batches[0]["metadata"][1] == {"prompt": "prompt 1", "number": 1}
    assert batches[1]["index"].dtype == torch.long
    assert batches[1]["index"].tolist() == [4, 5, 6, 7]


def test_train_shuffle_seeded_per_epoch(tmp_path: Path) -> None:
    def epoch_order(seed: int, epoch: int) -> list[int]:
        loader = make_datamodule(tmp_path, num_train=12, prompts_per_batch=4, seed=seed).train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [i for batch in loader for i in batch["index"].tolist()]

    assert epoch_order(0, 0) == epoch_order(0, 0)
    assert sorted(epoch_order(0, 0)) == list(range(12))
    assert epoch_order(0, 0) != epoch_order(0, 1)
    assert epoch_order(0, 0) != epoch_order(1, 0)


def test_val_batches_in_order(tmp_path: Path) -> None:
    datamodule = make_datamodule(tmp_path, prompts_per_batch=4, val_prompts_per_batch=2)
    batches = list(datamodule.val_dataloader())
    assert [batch["prompts"] for batch in batches] == [
        ["prompt 0", "prompt 1"],
        ["prompt 2", "prompt 3"],
        ["prompt 4"],
    ]


def test_batch_metadata_is_a_copy(tmp_path: Path) -> None:
    datamodule = make_datamodule(tmp_path, prompts_per_batch=2, shuffle=False)
    next(iter(datamodule.train_dataloader()))["metadata"][0]["number"] = -1
    assert next(iter(datamodule.train_dataloader()))["metadata"][0]["number"] == 0


def test_max_train_prompts_takes_first(tmp_path: Path) -> None:
    datamodule = make_datamodule(tmp_path, prompts_per_batch=2, max_train_prompts=4, shuffle=False)
    assert len(datamodule.train_dataset) == 4
    assert [b["prompts"] for b in datamodule.train_dataloader()] == [
        ["prompt 0", "prompt 1"],
        ["prompt 2", "prompt 3"],
    ]


def test_group_size_one_rejected(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"data\.group_size=1 is invalid: GRPO needs at least 2 samples per prompt"
    ):
        make_datamodule(tmp_path, group_size=1)


def test_invalid_options_reported_together(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as raised:
        make_datamodule(
            tmp_path, prompts_per_batch=0, num_workers=-1, val_prompts_per_batch=0, file_format="yaml"
        )
    message = str(raised.value)
    assert "data.prompts_per_batch=0 is invalid; use an integer >= 1" in message
    assert "data.num_workers=-1 is invalid; use an integer >= 0" in message
    assert "data.val_prompts_per_batch=0 is invalid" in message
    assert "data.file_format='yaml' is invalid; use one of txt, jsonl, geneval, csv, dpg" in message


def test_bad_files_named_by_option(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops\n', encoding="utf-8")
    missing = tmp_path / "missing.txt"
    with pytest.raises(ValueError) as raised:
        PromptDataModule(train_file=str(bad), val_file=str(missing))
    message = str(raised.value)
    assert re.search(r"data\.train_file: .*bad\.jsonl:2: invalid JSON", message)
    assert f"data.val_file: prompt file not found: {missing}" in message


def test_too_few_prompts_at_construction(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"has 3 prompts, but 1 device x 4 prompts per batch need at least 4.*"
        r"lower data\.prompts_per_batch, or add",
    ):
        make_datamodule(tmp_path, num_train=3, prompts_per_batch=4)
    with pytest.raises(ValueError, match=r"has 2 prompts \(limited by data\.max_train_prompts=2\)"):
        make_datamodule(tmp_path, prompts_per_batch=4, max_train_prompts=2)


def test_batch_layout_two_devices() -> None:
    message = check_batch_layout(num_train_prompts=14, prompts_per_batch=3, group_size=4, world_size=2)
    assert message.startswith(
        "2 devices x 3 prompts per batch x group size 4 = 24 samples per step (12 per device); "
        "groups never span devices."
    )
    # 7 prompts per rank -> 2 full batches of 3 -> 12 prompts used, 2 sit out
    assert "14 training prompts give 2 steps per epoch, and 2 prompts sit out each epoch" in message


def test_batch_layout_too_few_prompts() -> None:
    with pytest.raises(ValueError) as raised:
        check_batch_layout(num_train_prompts=5, prompts_per_batch=3, group_size=4, world_size=2)
    message = str(raised.value)
    assert "the training set has 5 prompts" in message
    assert "2 devices x 3 prompts per batch need at least 6 for one step" in message
    assert "data.prompts_per_batch" in message
    assert "trainer.devices" in message


def test_ranks_draw_disjoint_prompts(tmp_path: Path) -> None:
    datamodule = make_datamodule(tmp_path, num_train=13, prompts_per_batch=3, group_size=4)
    seen: list[list[int]] = []
    for rank in range(2):
        datamodule.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # type: ignore[assignment]
        batches = list(datamodule.train_dataloader())
        assert [len(batch["prompts"]) for batch in batches] == [3, 3]
        seen.append([i for batch in batches for i in batch["index"].tolist()])
    assert not set(seen[0]) & set(seen[1])

    datamodule.trainer = SimpleNamespace(world_size=5, global_rank=0)  # type: ignore[assignment]
    with pytest.raises(
        ValueError,
        match=r"5 devices x 3 prompts per batch need at least 15.*"
        r"data\.prompts_per_batch or trainer\.devices",
    ):
        datamodule.setup("fit")


class PromptCountingModule(LightningModule):
    """Minimal module that records the prompt batches it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.train_prompts: list[list[str]] = []
        self.val_prompts: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.train_prompts.append(batch["prompts"])
        return (self.weight - len(batch["prompts"])).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.val_prompts.append(batch["prompts"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_logs_layout_and_batches(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    datamodule = make_datamodule(tmp_path, num_train=10, num_val=3, prompts_per_batch=4, group_size=2)
    module = PromptCountingModule()
    trainer = Trainer(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        trainer.fit(module, datamodule=datamodule)

    assert "1 device x 4 prompts per batch x group size 2 = 8 samples per step (8 per device)" in caplog.text
    assert [len(prompts) for prompts in module.train_prompts] == [4, 4, 4, 4]
    assert module.train_prompts[0] != module.train_prompts[2]  # reshuffled in the second epoch
    assert module.val_prompts[0] == ["prompt 0", "prompt 1", "prompt 2"]


class RankRecordingModule(PromptCountingModule):
    """Writes the dataset indices each rank trains on to ``<out_dir>/rank<r>.json`` at the end of fit."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.train_indices: list[int] = []

    def training_step(self, batch, batch_idx):
        self.train_indices.extend(batch["index"].tolist())
        return super().training_step(batch, batch_idx)

    def on_train_end(self) -> None:
        record = {"indices": self.train_indices, "batch_sizes": [len(p) for p in self.train_prompts]}
        Path(self.out_dir, f"rank{self.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_ddp_two_ranks_distinct_prompts(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    datamodule = make_datamodule(tmp_path, num_train=14, num_val=3, prompts_per_batch=3, group_size=4)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(RankRecordingModule(str(tmp_path)), datamodule=datamodule)
    # the spawned ranks log to the inherited stderr, which caplog cannot see
    output = capfd.readouterr()

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [rank["batch_sizes"] for rank in ranks] == [[3, 3], [3, 3]]
    assert not set(ranks[0]["indices"]) & set(ranks[1]["indices"])
    assert (output.out + output.err).count("2 devices x 3 prompts per batch x group size 4 = 24 samples") == 1


def test_builtin_prompt_files_by_default() -> None:
    pytest.importorskip("cogrpo_lightning.benchmarks.shapes.prompts")
    datamodule = PromptDataModule(prompts_per_batch=2, group_size=2)
    assert len(datamodule.train_dataset) >= 2
    assert len(datamodule.val_dataset) >= 1
    _, record = datamodule.train_dataset[0]
    assert record.metadata["prompt"] == record.prompt


# ---- benchmark prompt files, when present -------------------------------------------------------


def test_geneval_official_metadata() -> None:
    path = SHARED_DATA / "geneval" / "evaluation_metadata.jsonl"
    if not path.exists():
        pytest.skip(f"GenEval metadata not found at {path}")
    records = read_geneval_metadata(path)
    assert len(records) == 553
    assert len({record.metadata["tag"] for record in records}) == 6
    assert all(record.metadata["prompt"] == record.prompt for record in records)
    assert read_prompts(path) == records


def test_dpg_bench_prompt_folder() -> None:
    folder = SHARED_DATA / "dpg_bench" / "prompts"
    if not folder.is_dir():
        pytest.skip(f"DPG-Bench prompt folder not found at {folder}")
    records = read_dpg_prompts(folder)
    item_ids = [record.metadata["item_id"] for record in records]
    assert len(records) == 1065
    assert len(set(item_ids)) == 1065
    assert item_ids[:3] == ["0", "1", "2"]
    assert all(record.prompt.strip() for record in records)
    assert not any(record.prompt.endswith(("\n", "\r")) for record in records)
    assert records[item_ids.index("diffusiondb25")].prompt.startswith(" an elaborate")  # kept as written
    assert isinstance(records[0], PromptRecord)

    datamodule = PromptDataModule(
        train_file=str(folder), val_file=str(folder), prompts_per_batch=8, group_size=2
    )
    batch = next(iter(datamodule.val_dataloader()))
    assert [metadata["item_id"] for metadata in batch["metadata"]] == item_ids[:8]
