"""Image-text retrieval: recall metrics and the paper's protocols, full-ranking evaluation, two-stage evaluation
and search (embeddings pick candidates, the cross-encoder re-ranks them), and the glue between
`transformers.Trainer` and retrieval fine-tuning. Nothing in the model files imports it."""
