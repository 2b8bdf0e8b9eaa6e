"""The probe: a 3.8M-parameter Llama trained on the suite's synthetic tasks, so that accuracy under
KV compression measures what the compression loses. model (architecture, `load_probe`), tokenizer
(word-level, UUIDs as hex-digit pairs), train (`python -m benchmarks.probe.train`), and the shipped
model in weights/ (what `--model probe` loads); README.md is the model card."""
