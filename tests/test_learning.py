"""Every method learns: a short run on a small synthetic set (300 training images, 60 dev) ends with dev rsum
clearly above chance (52 for 60 images), so a change that breaks learning fails CI.

Each threshold sits well under the measured value (CPU, one thread, torch 2.13: in the comment) and well over
chance. Small models, lr 2e-3 (1e-3 for VSE-infinity, whose hardest negatives at 2e-3 start to collapse), the VSE0
loss or the method's VSE0 warm-up (hardest negatives from scratch collapse on this data: see itmatch.collapse).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from itmatch.collapse import chance_rsum

COMMON = ["data.batch_size=32", "model.embed_dim=64", "train.lr=2e-3", "train.lr_update=100", "data.train_images=0"]
# method: (preset, overrides, threshold on the best dev rsum; measured best in the comment)
RUNS = {
    "vsepp": ("vsepp_synth", ["model.word_dim=32", "train.max_violation=false", "train.epochs=4"], 120),  # 174.0
    "scan": ("scan_synth_t2i_avg", ["model.word_dim=32", "train.max_violation=false", "train.epochs=3"], 120),  # 184.0
    "gsmn": ("gsmn_synth_sparse", ["model.word_dim=32", "model.embed_dim=32", "data.train_images=150",
                                   "data.batch_size=16", "train.lr=3e-3", "train.max_violation=false",
                                   "train.epochs=3", "model.hid_dim=16", "model.num_block=8"], 75),  # 97.0
    "vsrn": ("vsrn_synth", ["model.word_dim=32", "model.caption_hidden=32", "model.caption_word_dim=16",
                            "train.val_every=0", "model.vse_mean_warmup_epochs=3", "train.epochs=4"], 80),  # 106.7
    "vse_infinity": ("vse_infinity_synth_bigru", ["model.word_dim=32", "train.lr=1e-3", "train.epochs=4",
                                                  "model.vse_mean_warmup_epochs=2"], 80),  # 107.0
    "hrem": ("hrem_synth_minilm", ["train.epochs=4", "model.nhead=4", "model.warmup_iterations=20",
                                   "model.vse_mean_warmup_epochs=2"], 85),  # 120.7 (tiny random BERT)
}


def test_every_registered_method_has_a_learning_test() -> None:
    from itmatch.config import load_preset
    from itmatch.registry import list_models

    assert {load_preset(preset).model.name for preset, _, _ in RUNS.values()} == set(list_models())


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(RUNS))
def test_training_lifts_dev_rsum_well_above_chance(method: str, synth_data: Path, tiny_bert: Path,
                                                   tmp_path: Path) -> None:
    from itmatch.config import load_preset
    from itmatch.training import fit

    preset, sets, threshold = RUNS[method]
    overrides = [*COMMON, *sets, f"data.path={json.dumps(str(synth_data))}"]
    if method == "hrem":
        overrides.append(f"model.bert_path={json.dumps(str(tiny_bert))}")
    summary = fit(load_preset(preset, overrides), tmp_path / "run")
    rsums = [h["rsum"] for h in summary["history"] if "rsum" in h]
    assert len(rsums) == summary["epochs"] >= 2, "one dev evaluation per epoch"
    chance = chance_rsum(60)
    assert threshold >= 1.4 * chance
    assert max(rsums) > threshold, f"{method}: dev rsum per epoch {rsums}, chance {chance:.1f}"
    assert max(rsums) > rsums[0] or rsums[0] > threshold, "it learns beyond its first epoch"
