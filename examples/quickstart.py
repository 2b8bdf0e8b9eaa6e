"""Quick start: attach kvstore to a small Llama built from a config, generate, compare.

    python examples/quickstart.py [--preset full] [--new-tokens 24]

Prints the store's stats and whether the attached model produced the same tokens and logits
as the unattached one.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvstore import KVStoreClient, KVStoreConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full", help=f"one of {KVStoreConfig.preset_names()}")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--prompt-len", type=int, default=256)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 512, (3, args.prompt_len))
    mask = torch.ones_like(ids)
    mask[0, :17] = 0  # left padding
    mask[1, :5] = 0
    kw = dict(attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
              output_logits=True, return_dict_in_generate=True)
    ref = model.generate(ids, **kw)

    client = KVStoreClient(KVStoreConfig.preset(args.preset))
    with client.attach(model):
        out = model.generate(ids, **kw)
        stats = client.stats()
    err = max((a - b).abs().max().item() for a, b in zip(ref.logits, out.logits))
    same = bool(torch.equal(ref.sequences, out.sequences))
    print(json.dumps({k: v for k, v in stats.items()}, indent=2, default=str))
    print(f"preset={args.preset}: same tokens as the unattached model: {same}; max |logit diff| = {err:.2e}")


if __name__ == "__main__":
    main()
