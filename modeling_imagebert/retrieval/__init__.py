"""Image-text retrieval: recall metrics and the paper's protocols, full-ranking evaluation, and the glue between
`transformers.Trainer` and retrieval fine-tuning. Nothing in the model files imports it."""
