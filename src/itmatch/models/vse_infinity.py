"""VSE-infinity — Chen, Deng, Liu, Wang and Chuang, "Learning the Best Pooling Strategy for Visual Semantic
Embedding", CVPR 2021.

Port of github.com/woodfrog/vse_infty @ 29df9d6 (branch master: BERT text) and @ 8600f89 (branch bigru), region
features path (`precomp_enc_type basic`). Image: `fc(v) + MLP(v)` per region (MLP = Linear -> BatchNorm -> ReLU
-> Linear, its second BatchNorm `bns.1` is created but never applied, kept for strict loading), GPO over the
regions, l2norm (+1e-8). Text: BERT last hidden states -> Linear -> GPO, or a BiGRU (directions averaged) -> GPO,
l2norm. Similarity = dot product. Training: hinge loss, VSE0 during `vse_mean_warmup_epochs` then hardest
negatives; AdamW as upstream per branch; region dropping and word noise come from the data pipeline
(`itmatch.data.augment`, switched on by `train.region_drop` / `train.word_noise`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from itmatch.errors import ConfigError, DataError
from itmatch.models.base import Encoded, RetrievalModel, check_data_sizes
from itmatch.modules.gpo import Gpo
from itmatch.modules.norm import l2norm
from itmatch.modules.region_mlp import RegionMlp
from itmatch.modules.text_bert import bert_tokens, load_bert
from itmatch.modules.text_gru import GruTextEncoder
from itmatch.registry import register_model

_EPS = 1e-8  # upstream l2norm adds 1e-8 to the norm


@dataclass(frozen=True, slots=True)
class VseInfinityConfig:
    name: Literal["vse_infinity"] = "vse_infinity"
    image_dim: int = 0  # 0 = taken from the data at training time
    embed_dim: int = 1024
    text_encoder: Literal["bigru", "bert"] = "bigru"
    vocab_size: int = 0  # bigru: taken from the vocabulary (+ <mask>) at training time
    word_dim: int = 300  # bigru word embedding size
    bert_path: str = ""  # bert: local BERT directory (config, weights, vocab.txt) or pkg:PACKAGE/SUBDIR
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    vse_mean_warmup_epochs: int = 0  # epochs with the VSE0 loss before hardest negatives (upstream scripts: 1)

    # The bigru branch appends <mask> to the loaded vocabulary (vocab_size = words in the JSON + 1).
    extra_tokens: ClassVar[tuple[str, ...]] = ("<mask>",)


class RegionEncoder(nn.Module):
    """Region features (B, K, image_dim) + lengths -> (B, embed_dim) (upstream `EncoderImageAggr`, basic)."""

    def __init__(self, image_dim: int, embed_dim: int, *, no_imgnorm: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc = nn.Linear(image_dim, embed_dim, **dd)
        self.mlp = RegionMlp(image_dim, embed_dim // 2, embed_dim, **dd)
        self.gpool = Gpo(32, 32, **dd)
        self.no_imgnorm = no_imgnorm
        r = math.sqrt(6.0) / math.sqrt(image_dim + embed_dim)  # Xavier-uniform fc, zero bias, as upstream
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)

    def forward(self, images: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.gpool(self.fc(images) + self.mlp(images), lengths)
        return pooled if self.no_imgnorm else l2norm(pooled, eps=_EPS)


class BiGruGpoText(nn.Module):
    """BiGRU text encoder (bigru branch `EncoderText`): embed -> packed BiGRU, directions averaged -> GPO."""

    def __init__(self, vocab_size: int, word_dim: int, embed_dim: int, *, no_txtnorm: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gru = GruTextEncoder(vocab_size, word_dim, embed_dim, bidirectional=True, output="all", device=device,
                                  dtype=dtype)
        self.gpool = Gpo(32, 32, device=device, dtype=dtype)
        self.no_txtnorm = no_txtnorm

    def forward(self, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.gpool(self.gru(captions, lengths), lengths)  # lengths include <start>/<end>
        return pooled if self.no_txtnorm else l2norm(pooled, eps=_EPS)


class BertGpoText(nn.Module):
    """BERT text encoder (master `EncoderText`): BERT -> Linear(hidden_size, embed_dim) -> GPO."""

    def __init__(self, bert_path: str, embed_dim: int, *, no_txtnorm: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.bert = load_bert(bert_path, device=device, dtype=dtype)
        # Upstream hard-codes 768 (bert-base); the size comes from the BERT config here.
        self.linear = nn.Linear(self.bert.config.hidden_size, embed_dim, device=device, dtype=dtype)
        self.gpool = Gpo(32, 32, device=device, dtype=dtype)
        self.no_txtnorm = no_txtnorm

    def forward(self, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.linear(bert_tokens(self.bert, captions))
        pooled, _ = self.gpool(x, lengths)  # lengths include [CLS]/[SEP]
        return pooled if self.no_txtnorm else l2norm(pooled, eps=_EPS)


class VseInfinity(RetrievalModel):
    def __init__(self, cfg: VseInfinityConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        dd = {"device": device, "dtype": dtype}
        self.img_enc = RegionEncoder(cfg.image_dim, cfg.embed_dim, no_imgnorm=cfg.no_imgnorm, **dd)
        self.txt_enc: nn.Module
        match cfg.text_encoder:
            case "bigru":
                self.txt_enc = BiGruGpoText(cfg.vocab_size, cfg.word_dim, cfg.embed_dim, no_txtnorm=cfg.no_txtnorm,
                                            **dd)
            case "bert":
                self.txt_enc = BertGpoText(cfg.bert_path, cfg.embed_dim, no_txtnorm=cfg.no_txtnorm, **dd)

    def encode_image(self, images: torch.Tensor, lengths: torch.Tensor | None = None) -> Encoded:
        """images (B, K, image_dim); lengths (B,) valid regions (default: all K, as at evaluation)."""
        if images.ndim != 3:
            raise DataError(f"vse_infinity needs region features (N, regions, dim), got {tuple(images.shape)}")
        if lengths is None:
            lengths = torch.full((len(images),), images.shape[1], dtype=torch.long, device=images.device)
        return Encoded(self.img_enc(images, lengths))

    def encode_text(self, captions: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        return Encoded(self.txt_enc(captions, lengths))

    def on_epoch_start(self, epoch: int) -> None:
        # Upstream train.py: from epoch `vse_mean_warmup_epochs` on, hardest negatives (and they stay on).
        if epoch >= self.cfg.vse_mean_warmup_epochs:
            self.max_violation = True

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """AdamW as upstream: bert branch groups (text w/o BERT lr, BERT 0.1 lr, image lr) with weight decay 1e-4;
        bigru branch one group with torch's default weight decay 0.01 (it passes none)."""
        if self.cfg.text_encoder == "bigru":
            return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.01)
        bert = {id(p) for p in self.txt_enc.bert.parameters()}
        trainable = [p for p in self.txt_enc.parameters() if p.requires_grad]
        return torch.optim.AdamW([
            {"params": [p for p in trainable if id(p) not in bert], "lr": lr},
            {"params": [p for p in trainable if id(p) in bert], "lr": 0.1 * lr},
            {"params": list(self.img_enc.parameters()), "lr": lr},
        ], lr=lr, weight_decay=1e-4)


@register_model("vse_infinity", VseInfinityConfig)
def build(cfg: VseInfinityConfig, *, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> VseInfinity:
    check_data_sizes(cfg, vocab=False)
    if cfg.text_encoder == "bigru" and cfg.vocab_size <= 0:
        raise ConfigError("vse_infinity: text_encoder 'bigru' needs model.vocab_size > 0 (set from the vocabulary)")
    return VseInfinity(cfg, device=device, dtype=dtype)
