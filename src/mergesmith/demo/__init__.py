"""The embedded demo: real base model, real tasks, experts fine-tuned and cached on first use."""
