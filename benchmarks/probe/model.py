"""The probe model: a small Llama trained on the benchmark's synthetic tasks (see benchmarks/probe/README.md).

Its attention must really retrieve (a needle, a pass key, a UUID's value from thousands of
tokens back), so accuracy under KV compression measures what the compression loses.
`--model probe` in `kvstore-bench` means the files shipped in `benchmarks/probe/weights/`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

logger = logging.getLogger(__name__)

PROBE_DIR = Path(__file__).resolve().parent / "weights"
PROBE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def probe_config(vocab_size: int, **overrides) -> LlamaConfig:
    """The probe architecture for a tokenizer of `vocab_size` tokens (about 3.8M parameters with the 2668-token tokenizer).

    6 layers, hidden 256, 8 query heads over 2 KV heads (GQA group 4) of head_dim 64, SwiGLU
    256 (attention depth matters more than MLP width for retrieval), tied embeddings; RoPE base
    1e6 so 16K+ positions keep distinct low-frequency phases. ~7.4 MB in bf16 safetensors.
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    # Pad the embedding to a multiple of 64 for tensor-core friendly shapes.
    padded = (vocab_size + 63) // 64 * 64
    kwargs = dict(
        vocab_size=padded,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def has_probe(path: str | Path = PROBE_DIR) -> bool:
    """Whether `path` holds a complete probe model (weights, config, tokenizer)."""
    path = Path(path)
    return all((path / name).is_file() for name in PROBE_FILES)


def load_probe(path: str | Path = PROBE_DIR, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load (model, tokenizer) from `path` (default: the shipped probe), model in eval mode.

    Raises FileNotFoundError naming the missing files when the folder is incomplete.
    """
    from benchmarks.probe.tokenizer import load_tokenizer

    path = Path(path)
    missing = [name for name in PROBE_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"probe model folder {path} lacks {', '.join(missing)}; train it with "
            "`python -m benchmarks.probe.train --out DIR` (see benchmarks/probe/README.md)"
        )
    model = LlamaForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    tokenizer = load_tokenizer(path)
    return model, tokenizer
