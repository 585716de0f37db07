"""What a record is: its modalities, the columns every stage after the read sees, and which input
column holds which field. No I/O here; mmembed/inputs/discover.py recognises inputs, the readers fill records."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

MODALITY_COLUMNS = ("text", "image", "audio", "video")
# Every modality a record may hold; `--modalities` picks among them.
MODALITIES = (*MODALITY_COLUMNS, "message")
MEDIA_MODALITIES = ("image", "audio", "video")
# `messages` is a chat-message list; it is its own modality in ST ("message").
MESSAGE_COLUMN = "messages"

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
AUDIO_EXTENSIONS = {".wav", ".mp3", ".flac", ".ogg", ".m4a", ".opus", ".aac"}
VIDEO_EXTENSIONS = {".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v"}
TEXT_EXTENSIONS = {".txt", ".md"}
# A document is not a record: each of its pages is one, id `<document id>#page=<n>` (mmembed/media/pdf.py).
DOCUMENT_EXTENSIONS = {".pdf"}
PAGE_MARK = "#page="

EXTENSION_MODALITY = {
    **{ext: "image" for ext in IMAGE_EXTENSIONS},
    **{ext: "audio" for ext in AUDIO_EXTENSIONS},
    **{ext: "video" for ext in VIDEO_EXTENSIONS},
    **{ext: "text" for ext in TEXT_EXTENSIONS},
    **{ext: "pdf" for ext in DOCUMENT_EXTENSIONS},
}

# The columns every stage after `read` sees. Media cells are URIs (`*_uri`) or bytes
# (`*_bytes`), kept apart so that one Arrow type holds per column.
RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("text_uri", pa.string()),
        ("image_uri", pa.string()),
        ("image_bytes", pa.binary()),
        ("audio_uri", pa.string()),
        ("audio_bytes", pa.binary()),
        ("video_uri", pa.string()),
        ("video_bytes", pa.binary()),
        ("pdf_uri", pa.string()),
        ("pdf_bytes", pa.binary()),
        ("cell_error", pa.string()),
    ]
)
# Why a cell could not become a record's input (e.g. a Hugging Face Image struct holding neither
# bytes nor a path): set by the read stage, turned into the record's error row by preprocess.
CELL_ERROR = "cell_error"


def input_modality(modality: str) -> str:
    """What a model must take for a record of this modality: a PDF's pages are images."""
    return "image" if modality == "pdf" else modality


@dataclass(frozen=True)
class Columns:
    """Which manifest column holds each field of a record (--id-column, --text-column, ...), and which
    modalities to embed (--modalities; None: all). The defaults are mmembed's own manifest."""

    id: str = "id"
    text: str = "text"
    image: str = "image"
    audio: str = "audio"
    video: str = "video"
    modalities: tuple[str, ...] | None = None

    def sources(self) -> dict[str, str]:
        """record field -> manifest column"""
        return {"id": self.id, "text": self.text, "image": self.image, "audio": self.audio, "video": self.video}

    def custom(self) -> dict[str, str]:
        """The fields mapped to a column of another name."""
        return {k: v for k, v in self.sources().items() if k != v}

    def keeps(self, modality: str) -> bool:
        return self.modalities is None or input_modality(modality) in self.modalities

    def describe(self) -> dict:
        """For the manifest and the run identity."""
        return {"columns": self.sources(), "modalities": list(self.modalities) if self.modalities else None}


DEFAULT_COLUMNS = Columns()


def embedding_matrix(col, dim: int) -> np.ndarray:
    """A (fixed-size) list column of vectors as a float32 [rows, dim] array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return np.asarray(col.flatten(), dtype=np.float32).reshape(len(col), dim)


def flat_vectors(column, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A multi-vector column (list<fixed_size_list<float>>: each row's token vectors) as (float32 [all rows'
    vectors, dim], vectors per row)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy()
    flat = np.asarray(column.values.flatten(), dtype=np.float32).reshape(-1, dim)[offsets[0]: offsets[-1]]
    return flat, np.diff(offsets)


def groups_by(table: pa.Table, column: str):
    """`table`'s rows in groups of equal `column` (nulls last), as a Ray Data groupby hands them to
    map_groups: what the in-process executor does where a job's Ray pipeline shuffles."""
    import pyarrow.compute as pc

    if not table.num_rows:
        return
    table = table.take(pc.sort_indices(table, sort_keys=[(column, "ascending")], null_placement="at_end"))
    keys = table.column(column).to_pylist()
    start = 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            yield table.slice(start, i - start)
            start = i
