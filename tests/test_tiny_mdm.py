"""The built-in tiny MDM: adapter contract, save/load, shipped checkpoint."""

import pytest
import torch

from cogrpo_lightning.benchmarks.shapes import world
from cogrpo_lightning.mdm.tiny import DEFAULT_CHECKPOINT, TinyMDM, TinyMDMConfig, WordTokenizer

SMALL = TinyMDMConfig(hidden_size=32, num_layers=1, num_heads=2)


def test_forward_returns_float32_log_probs_over_codebook():
    model = TinyMDM(SMALL).eval()
    ids = torch.full((3, model.num_tokens), model.mask_token_id)

    log_probs = model(ids, model.encode_prompts(["a photo of a circle", "", "a photo of two red squares"]))

    assert log_probs.shape == (3, 64, world.CODEBOOK_SIZE)
    assert log_probs.dtype == torch.float32
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3, 64), rtol=0, atol=1e-5)


def test_log_probs_stay_float32_under_bf16_autocast():
    model = TinyMDM(SMALL).eval()
    ids = torch.randint(0, model.codebook_size, (2, model.num_tokens))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_probs = model(ids, model.encode_prompts(["a photo of a cross", "a photo of a square"]))
    assert log_probs.dtype == torch.float32
    assert torch.isfinite(log_probs).all()


def test_tokenizer_maps_unknown_words_and_pads():
    tokenizer = WordTokenizer(max_length=6)
    ids = tokenizer(["a photo of a zebra", ""])
    unk, pad = tokenizer.unk_id, tokenizer.pad_id
    assert ids[0].tolist() == [tokenizer.index["a"], tokenizer.index["photo"], tokenizer.index["of"],
                               tokenizer.index["a"], unk, pad]
    assert ids[1].tolist() == [pad] * 6


def test_decode_matches_renderer_and_rejects_masks():
    model = TinyMDM(SMALL)
    scene = [world.SceneObject("triangle", "blue", 1, 2)]
    tokens = world.scene_tokens(scene).unsqueeze(0)
    torch.testing.assert_close(model.decode(tokens)[0], world.render(scene))
    with pytest.raises(ValueError, match="still the mask token"):
        model.decode(torch.full_like(tokens, model.mask_token_id))


def test_save_and_load_round_trip(tmp_path):
    model = TinyMDM(SMALL).eval()
    model.save_pretrained(tmp_path)
    loaded = TinyMDM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, model.codebook_size, (2, model.num_tokens))
    condition = ["a photo of an orange circle", "a photo of a cross above a square"]
    torch.testing.assert_close(loaded(ids, loaded.encode_prompts(condition)), model(ids, model.encode_prompts(condition)))


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        TinyMDM.from_pretrained(tmp_path)


def test_shipped_checkpoint_loads_and_is_small():
    size = sum(p.stat().st_size for p in DEFAULT_CHECKPOINT.iterdir())
    assert size < 20 * 1024 * 1024
    model = TinyMDM.from_pretrained()
    assert model.codebook_size == world.CODEBOOK_SIZE
