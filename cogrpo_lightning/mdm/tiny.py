"""The built-in tiny MDM: a small bidirectional transformer over shapes-world codes.

Three plain modules sit behind the :class:`MaskedDiffusionModel` adapter:

- a word-level prompt encoder (fixed vocabulary of the GenEval prompt grammar, embedding plus one
  transformer layer),
- a transformer that reads the prompt tokens and the L image tokens in one sequence and predicts
  every image position,
- a fixed patch decoder: each code is one 4x4 RGB patch of the shapes world (see
  :mod:`cogrpo_lightning.benchmarks.shapes.world`).

Shapes: N samples, L image tokens, K text tokens, D hidden size, V codebook size.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cogrpo_lightning.benchmarks.shapes import world
from cogrpo_lightning.mdm.base import Condition, MaskedDiffusionModel
from cogrpo_lightning.schedule.predefined import PredefinedSchedule

_GRAMMAR_WORDS = (
    "a an photo of and left right above below two three four".split()
    + list(world.SHAPES)
    + list(world.PLURALS.values())
    + list(world.COLOR_NAMES)
)
PAD, UNK = "[PAD]", "[UNK]"
VOCABULARY: tuple[str, ...] = (PAD, UNK, *_GRAMMAR_WORDS)
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "tiny_mdm"


class WordTokenizer:
    """Lower-cases, splits on non-letters and maps words to ids; unknown words map to [UNK]."""

    def __init__(self, vocabulary: Sequence[str] = VOCABULARY, max_length: int = 16) -> None:
        self.vocabulary = tuple(vocabulary)
        self.index = {word: i for i, word in enumerate(self.vocabulary)}
        self.max_length = max_length
        self.pad_id = self.index[PAD]
        self.unk_id = self.index[UNK]

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        """Tokenize prompts into ids [N, K], padded with [PAD] and truncated to max_length."""
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = re.findall(r"[a-z]+", prompt.lower())[: self.max_length]
            ids[row, : len(words)] = torch.tensor(
                [self.index.get(word, self.unk_id) for word in words], dtype=torch.long
            )
        return ids


@dataclass
class TinyMDMConfig:
    """Architecture of :class:`TinyMDM` (saved as ``config.json`` beside the weights)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    text_layers: int = 1
    max_text_tokens: int = 16
    dropout: float = 0.0


class TinyMDM(MaskedDiffusionModel):
    """Tiny text-to-image MDM over the shapes world; see the module docstring.

    Args:
        config: architecture sizes; None uses the defaults, or the checkpoint's when
            `checkpoint_dir` is given.
        checkpoint_dir: directory written by :meth:`save_pretrained` whose weights are loaded;
            ``"shipped"`` loads the checkpoint that ships with the package. None keeps random weights.
    """

    def __init__(self, config: TinyMDMConfig | None = None, checkpoint_dir: str | None = None) -> None:
        super().__init__()
        directory = None
        if checkpoint_dir is not None:
            directory = DEFAULT_CHECKPOINT if checkpoint_dir == "shipped" else Path(checkpoint_dir)
            saved = _read_config(directory)
            if config is not None and config != saved:
                raise ValueError(
                    f"config {config} differs from the checkpoint's {saved} in {directory}; pass only checkpoint_dir"
                )
            config = saved
        self.config = config = config or TinyMDMConfig()
        self.codebook_size = world.CODEBOOK_SIZE
        self.mask_token_id = world.CODEBOOK_SIZE
        self.latent_shape = (world.GRID, world.GRID)
        self.tokenizer = WordTokenizer(max_length=config.max_text_tokens)
        d = config.hidden_size

        def layer() -> nn.TransformerEncoderLayer:
            return nn.TransformerEncoderLayer(
                d, config.num_heads, 4 * d, config.dropout, activation="gelu", batch_first=True, norm_first=True
            )

        self.word_embedding = nn.Embedding(len(self.tokenizer.vocabulary), d)
        self.text_position = nn.Parameter(torch.zeros(config.max_text_tokens, d))
        self.text_encoder = nn.TransformerEncoder(layer(), config.text_layers, enable_nested_tensor=False)

        self.token_embedding = nn.Embedding(self.codebook_size + 1, d)  # + 1 for the mask token
        self.image_position = nn.Parameter(torch.zeros(self.num_tokens, d))
        self.text_type = nn.Parameter(torch.zeros(d))
        self.backbone = nn.TransformerEncoder(layer(), config.num_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, self.codebook_size)
        self.register_buffer("patches", world.codebook_patches(), persistent=False)

        nn.init.normal_(self.text_position, std=0.02)
        nn.init.normal_(self.image_position, std=0.02)
        if directory is not None:
            from safetensors.torch import load_file

            self.load_state_dict(load_file(str(directory / "model.safetensors")))

    @property
    def feature_dim(self) -> int:
        return self.config.hidden_size

    @property
    def condition_dim(self) -> int:
        return self.config.hidden_size

    def fsdp_units(self) -> list[nn.Module]:
        return [*self.text_encoder.layers, *self.backbone.layers]

    def default_schedule(self) -> PredefinedSchedule:
        """MaskGIT's schedule (cosine ratio, tau_s = 1, tau_r from 2 to 0) with CFG scale 3."""
        return PredefinedSchedule(cfg_scale=3.0)

    def encode_prompts(self, prompts: Sequence[str]) -> Condition:
        ids = self.tokenizer(prompts).to(self.text_position.device)  # [N, K]
        mask = ids != self.tokenizer.pad_id  # [N, K], True = real word
        # Padding positions are attended to like words (as CLIP-style text encoders do), so the empty
        # negative prompt, all padding, is a learned null condition for classifier-free guidance.
        hidden = self.text_encoder(self.word_embedding(ids) + self.text_position)  # [N, K, D]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # [N, D]
        return Condition(hidden, mask, pooled)

    def forward_with_features(self, token_ids: Tensor, condition: Condition) -> tuple[Tensor, Tensor]:
        n, length = token_ids.shape
        image = self.token_embedding(token_ids) + self.image_position  # [N, L, D]
        text = condition.hidden + self.text_type  # [N, K, D]
        sequence = torch.cat([text, image], dim=1)  # [N, K + L, D]
        hidden = self.backbone(sequence)
        hidden = self.final_norm(hidden[:, -length:])  # [N, L, D]
        logits = self.head(hidden)  # [N, L, V]
        log_probs = F.log_softmax(logits.float(), dim=-1)
        features = hidden.float().mean(dim=1)  # [N, D]
        return log_probs, features

    def forward(self, token_ids: Tensor, condition: Condition) -> Tensor:
        return self.forward_with_features(token_ids, condition)[0]

    def decode(self, token_ids: Tensor) -> Tensor:
        if bool((token_ids == self.mask_token_id).any()):
            raise ValueError("decode needs complete token grids, but some positions are still the mask token")
        return world.decode_tokens(token_ids, self.patches)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into `directory`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None) -> TinyMDM:
        """Load a model written by :meth:`save_pretrained`; None loads the checkpoint shipped in the package."""
        return cls(checkpoint_dir=str(directory) if directory is not None else "shipped")


def _read_config(directory: Path) -> TinyMDMConfig:
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"tiny MDM checkpoint file not found: {directory / name}; pass a directory written by "
                "TinyMDM.save_pretrained, or 'shipped' for the checkpoint in the package"
            )
    return TinyMDMConfig(**json.loads((directory / "config.json").read_text()))
