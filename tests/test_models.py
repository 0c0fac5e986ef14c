"""Every registered model: forward shapes, gradients, padding independence. Plus VSE++ specifics."""

import dataclasses

import pytest
import torch

from itmatch.config import load_preset
from itmatch.modules.norm import l2norm
from itmatch.registry import create_model, list_models, method_spec
from tests.conftest import training_recipe

VOCAB, IMAGE_DIM, REGIONS = 30, 12, 5


def tiny_model(name: str, bert_path: str = "") -> torch.nn.Module:
    cfg = method_spec(name).config()
    fields = {f.name for f in dataclasses.fields(cfg)}
    small = {"vocab_size": VOCAB, "image_dim": IMAGE_DIM, "embed_dim": 16, "word_dim": 8, "bert_path": bert_path,
             # HREM: 2 heads for 16 dims, top-3 of the 5 regions, its relation graph on from the first step
             "nhead": 2, "relation_topk": 3, "warmup_iterations": 0}
    torch.manual_seed(0)
    return create_model(dataclasses.replace(cfg, **{k: v for k, v in small.items() if k in fields}))


def tiny_batch(b: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(b, REGIONS, IMAGE_DIM, generator=gen)
    lengths = torch.randint(3, 9, (b,), generator=gen)
    captions = torch.randint(4, VOCAB, (b, int(lengths.max())), generator=gen)
    captions[torch.arange(captions.shape[1])[None, :] >= lengths[:, None]] = 0
    return images, captions, lengths


def tiny_extras(model: torch.nn.Module, lengths: torch.Tensor, recipe=None) -> dict:
    """The extra inputs a model's method declares (GSMN: boxes, dependency pairs) and, with `recipe`, the batch
    fields its loss takes (HREM: image ids)."""
    gen = torch.Generator().manual_seed(1)
    xy = torch.rand(len(lengths), REGIONS, 2, generator=gen) * 0.7
    extras = {"boxes": torch.cat([xy, xy + 0.2], -1),
              "depends": [[[0, 1]] + [[k, k + 1] for k in range(1, n - 1)] for n in lengths.tolist()],
              "image_ids": torch.arange(len(lengths))}
    inputs = method_spec(model.cfg.name).inputs(model.cfg)
    names = () if inputs is None else inputs.image + inputs.caption
    names += () if recipe is None else recipe.batch_inputs
    return {k: extras[k] for k in names}


@pytest.mark.parametrize("name", list_models())
def test_every_parameter_gets_a_gradient(name: str, tiny_bert) -> None:
    model = tiny_model(name, str(tiny_bert))
    recipe = training_recipe(model)
    images, captions, lengths = tiny_batch()
    extra = tiny_extras(model, lengths, recipe)
    image_extra = {k: v for k, v in extra.items() if k == "boxes"}
    text_extra = {k: v for k, v in extra.items() if k == "depends"}
    sims = model.similarity(model.encode_image(images, **image_extra),
                            model.encode_text(captions, lengths, **text_extra))
    assert sims.shape == (6, 6)
    recipe.loss(images, captions, lengths, epoch=0, **extra)["loss"].backward()  # training-only parts included
    named = [*model.named_parameters(),
             *((f"{k}.{n}", p) for k, m in recipe.modules().items() for n, p in m.named_parameters())]
    missing = [n for n, p in named if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient for {missing[:3]}"


@pytest.mark.parametrize("name", list_models())
def test_padding_never_changes_text_embeddings(name: str, tiny_bert) -> None:
    model = tiny_model(name, str(tiny_bert)).eval()
    _, captions, lengths = tiny_batch()
    padded = torch.cat([captions, torch.zeros(len(captions), 7, dtype=torch.long)], dim=1)
    with torch.no_grad():
        batch = model.encode_text(captions, lengths).emb
        more_padding = model.encode_text(padded, lengths).emb
        for i, n in enumerate(lengths.tolist()):
            alone = model.encode_text(captions[i : i + 1, :n], lengths[i : i + 1]).emb[0]
            for other in (batch[i], more_padding[i]):
                if other.ndim == 2:  # per-word features (L, E): zero beyond the caption's length
                    assert not other[n:].any()
                    other = other[:n]
                torch.testing.assert_close(other, alone, rtol=1e-5, atol=1e-6)


def test_vsepp_matches_a_hand_written_forward() -> None:
    model = tiny_model("vsepp").eval()
    images, captions, lengths = tiny_batch()
    with torch.no_grad():
        img = model.encode_image(images).emb
        txt = model.encode_text(captions, lengths).emb
        # image: mean over regions -> fc -> x / ||x|| (no eps, as VSE++)
        fc = model.img_enc.fc
        x = images.mean(1) @ fc.weight.T + fc.bias
        torch.testing.assert_close(img, x / x.norm(dim=1, keepdim=True))
        # text: GRU step by step over the true length, state at the last valid step, l2-normalised
        rnn, emb = model.txt_enc.rnn, model.txt_enc.embed
        cell = torch.nn.GRUCell(rnn.input_size, rnn.hidden_size)
        cell.load_state_dict({"weight_ih": rnn.weight_ih_l0, "weight_hh": rnn.weight_hh_l0,
                              "bias_ih": rnn.bias_ih_l0, "bias_hh": rnn.bias_hh_l0})
        for i, n in enumerate(lengths.tolist()):
            h = torch.zeros(1, rnn.hidden_size)
            for t in range(n):
                h = cell(emb(captions[i : i + 1, t]), h)
            torch.testing.assert_close(txt[i], l2norm(h, dim=1)[0], rtol=1e-5, atol=1e-6)
    sims = model.similarity(model.encode_image(images), model.encode_text(captions, lengths))
    torch.testing.assert_close(sims, img @ txt.T)


def test_vsepp_init_follows_upstream() -> None:
    cfg = dataclasses.replace(load_preset("vsepp_synth").model, vocab_size=50, image_dim=2048)
    model = create_model(cfg)
    r = (6 / (2048 + 1024)) ** 0.5
    assert model.img_enc.fc.weight.abs().max() <= r and model.img_enc.fc.bias.abs().max() == 0
    assert model.txt_enc.embed.weight.abs().max() <= 0.1
