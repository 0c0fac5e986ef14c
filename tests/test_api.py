"""The public Python API: the README's example runs as written, and the Matcher scores what evaluation scores."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import itmatch
from itmatch.errors import DataError

README = Path(__file__).parent.parent / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_python_example_runs_as_written(tmp_path: Path, monkeypatch, capsys) -> None:
    from itmatch.data.synthetic import generate
    from itmatch.data.vocab import write_vocab

    data = tmp_path / "data" / "synth_f30k"
    generate(data, variant="f30k", seed=0, dim=16, sizes={"train": 60, "dev": 20, "test": 100})
    write_vocab(data)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    printed = capsys.readouterr().out.splitlines()
    assert namespace["scores"].shape == (100, 2)
    assert printed[0].startswith("[") and printed[1].endswith("(100, 500)")
    assert namespace["summary"]["epochs"] == 1
    saved = np.load(tmp_path / "runs" / "api" / "test_sims.npz")
    np.testing.assert_array_equal(saved["sims"], namespace["result"].sims)


def test_matcher_scores_equal_the_evaluation_matrix(synth_data: Path, tmp_path: Path) -> None:
    from itmatch.cli import main

    out = tmp_path / "run"
    assert main(["-q", "train", "--preset", "vsepp_synth", "--data", str(synth_data), "--out", str(out),
                 "--set", "model.embed_dim=16", "--set", "model.word_dim=8", "--set", "train.epochs=1"]) == 0
    test = itmatch.open_dataset(synth_data, "test")
    matcher = itmatch.load(out / "model_best.pt")
    images = matcher.encode_images(test.image_features())
    texts = matcher.encode_texts(test.captions)
    evaluation = itmatch.evaluate(matcher, test)
    np.testing.assert_array_equal(matcher.similarity(images, texts), evaluation.sims)
    # the vocabulary's ids, as training reads them
    assert matcher.tokenize(test.captions[0]) == matcher.tokenizer.encode(test.captions[0])
    assert evaluation.image_ids == test.image_ids and len(evaluation.caption_ids) == len(test.captions)
    with pytest.raises(DataError, match="empty"):
        matcher.encode_texts(["  "])
