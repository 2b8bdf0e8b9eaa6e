"""Engine adapters: how a model's attention reaches the store (hf.py: attach to a Hugging Face
model; model_dir.py: model folder checks), and how a batch's sequences leave one store and enter
another without the model (transfer.py: tap, export, import, replay)."""
