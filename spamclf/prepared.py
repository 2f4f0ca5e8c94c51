"""What a set-up `SpamDataModule` hands the model once per run (`SpamClassifier.use_data`): the encoded splits the
prefix cache runs over, the padding rule, the file's class shares, and what prediction must repeat."""

from __future__ import annotations

from dataclasses import dataclass, field

from spamclf.loaders import EncodedSplit


@dataclass(frozen=True)
class PreparedData:
    datasets: dict[str, EncodedSplit]  # split name -> its rows, indexed as the batches' `index` is
    pad_length: int | None  # every batch's width, or None when each batch pads to its own longest row
    tokenization: dict  # label names and padding rule, saved in checkpoints (SpamDataModule.describe)
    class_shares: dict[str, float] = field(default_factory=dict)  # each class's share of the file
    scored_with: dict[str, str] = field(default_factory=dict)  # split -> the split holding the same rows, scored once

    @property
    def label_names(self) -> list[str]:
        return list(self.tokenization["label_names"])
