"""KVStoreClient: the one object users touch.

    client = KVStoreClient(KVStoreConfig.preset("full"))
    with client.attach(model):
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=64)
    client.stats()
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kvstore.config import KVStoreConfig
from kvstore.store import KVStore

logger = logging.getLogger(__name__)


class AlreadyAttachedError(RuntimeError):
    """An attach that would put a second client on a model, or a second model on a client.

    `holder` is the client that holds the model (or this client, when it is the one attached);
    `holder.detach()` frees it.
    """

    def __init__(self, message: str, holder: "KVStoreClient"):
        super().__init__(message)
        self.holder = holder


class KVStoreClient:
    def __init__(self, config: KVStoreConfig | None = None):
        if config is None:
            config = KVStoreConfig.preset("full")
        if not isinstance(config, KVStoreConfig):
            raise TypeError(f"config must be a KVStoreConfig, got {type(config).__name__}")
        self.config = config
        self.store: KVStore | None = None
        self._adapter = None
        self._engine = None

    # ---- attach / detach ------------------------------------------------------------------
    def attach(self, engine: Any) -> "KVStoreClient":
        """Serve `engine`'s attention from the store. Usable as a context manager.

        `engine` is a Hugging Face causal LM of the Llama, Mistral, Qwen2 or Qwen3 families.
        Raises UnsupportedModelError (a ValueError) saying what is unsupported otherwise.

        One client serves one model, and a model is served by one client, at a time: attaching
        a model that another client holds, or attaching this client again (to the same model or
        another), raises AlreadyAttachedError naming the holder; detach it first. Nothing is
        changed by a refused attach.

        The model gets its own copy of its config while attached (every module that held the
        config holds the copy), so other models built from the same config object are left as
        they were; `detach()` gives the modules the original object back, which means changes
        made to `model.config` while attached do not outlive the attachment.
        """
        from kvstore.adapters.hf import HFAdapter, attached_owner, model_geometry

        if self._adapter is not None:
            which = "this model" if engine is self._engine else f"a {type(self._engine).__name__}"
            raise AlreadyAttachedError(f"{self!r} is already attached to {which}; call detach() first", self)
        geometry = model_geometry(engine)
        holder = attached_owner(engine)
        if holder is not None:
            raise AlreadyAttachedError(
                f"this {type(engine).__name__} is already attached to {holder!r}; call that client's detach() "
                "first (one client per model)", holder,
            )
        cap = self.config.hot_tier_bytes
        if cap is not None and geometry.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(geometry.device)
            if cap > free:
                raise ValueError(
                    f"KVStoreConfig.hot_tier_bytes={cap} does not fit: {geometry.device} has {free} bytes free"
                )
        self.store = KVStore(self.config, geometry)
        self._adapter = HFAdapter(engine, self.store, owner=self)
        self._engine = engine
        logger.info("kvstore attached (%s) to %s: %s", self.config.name, type(engine).__name__, geometry)
        return self

    def detach(self) -> None:
        """Restore the engine exactly as it was and free every page.

        Does nothing on a client that is not attached (never attached, or detached already).
        """
        if self._adapter is None:
            return
        self._adapter.detach()
        self.store.release_all()
        self._adapter = None
        self._engine = None

    def __enter__(self) -> "KVStoreClient":
        if self._adapter is None:
            raise RuntimeError("use `with client.attach(model):`")
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        held = f", attached to {type(self._engine).__name__}" if self._engine is not None else ""
        return f"<KVStoreClient {self.config.name!r} at 0x{id(self):x}{held}>"

    @property
    def attached(self) -> bool:
        return self._adapter is not None

    def release(self) -> None:
        """End every sequence held by the store (frees their pages), staying attached."""
        if self.store is not None:
            self.store.release_all()

    # ---- stats -----------------------------------------------------------------------------
    def stats(self) -> dict:
        """Byte and token accounting: of the live sequences, or of the last generation.

        While sequences are held (inside a forward loop, or a generation whose cache is still
        referenced) the figures are live and ``stats()["live"]`` is True. Once they are released
        (`model.generate()` drops its cache when it returns) the figures are those the store had
        just before that release, with ``live`` False: so `stats()` after `generate()` describes
        that generation. Keys: gpu_kv_bytes (hot-tier pages in use, slot metadata included, plus
        retrieval state), host_kv_bytes, dense_kv_bytes (what the model's dense cache would hold
        for the same valid tokens, at its dtype), compression (dense / gpu), token counts per tier,
        page counts (hot_pages_used / _reserved / _peak: the peak is over the store's life).
        """
        if self.store is None:
            return {"gpu_kv_bytes": 0, "host_kv_bytes": 0, "dense_kv_bytes": 0, "sequences": 0, "live": False}
        live = bool(self.store.active) or self.store.last_stats is None
        s = self.store.stats() if live else dict(self.store.last_stats)
        s["live"] = live
        s["compression"] = s["dense_kv_bytes"] / s["gpu_kv_bytes"] if s["gpu_kv_bytes"] else float("nan")
        s["preset"] = self.config.name
        return s
