"""Probes of the model's opt-in value checks (`config.check_inputs=True`): labels and inputs out of range or of
the wrong shape."""

from __future__ import annotations

from .harness import ROOT, Probes


def probe_model(p: Probes) -> None:
    import torch

    from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining, ImageBertForRetrieval

    p.entry = "model (check_inputs)"
    config = ImageBertConfig.from_json_file(str(ROOT / "configuration" / "models" / "imagebert-tiny.json"))
    config.check_inputs = True
    torch.manual_seed(0)
    model = ImageBertForPreTraining(config).eval()
    retrieval = ImageBertForRetrieval(config).eval()
    B, T, R = 2, 5, 3
    inputs = {
        "input_ids": torch.randint(1000, 2000, (B, T)),
        "region_features": torch.randn(B, R, config.visual_feature_dim),
        "region_locations": torch.full((B, R, 5), 0.5),
    }

    def forward(module=model, **change):
        with torch.no_grad():
            return module(**{**inputs, **change})

    p.error("itm_labels 2", lambda: forward(itm_labels=torch.tensor([1, 2])), "itm_labels")
    p.error("itm_labels -1", lambda: forward(itm_labels=torch.tensor([1, -1])), "itm_labels")
    p.error("itm_labels 0.5", lambda: forward(itm_labels=torch.tensor([1.0, 0.5])), "itm_labels")
    p.error("MLM labels beyond the vocabulary", lambda: forward(labels=torch.full((B, T), 40000)), "labels")
    p.error("token type 7", lambda: forward(token_type_ids=torch.full((B, T), 7)), "token_type_ids")
    p.error(
        "input ids beyond the vocabulary", lambda: forward(input_ids=torch.full((B, T), 40000)), "input_ids"
    )
    p.error(
        "NaN region features",
        lambda: forward(region_features=torch.full((B, R, config.visual_feature_dim), float("nan"))),
        "region_features",
    )
    p.error(
        "region locations above 1",
        lambda: forward(region_locations=torch.full((B, R, 5), 2.0)),
        "region_locations",
    )
    p.error(
        "region class labels beyond the classes",
        lambda: forward(
            region_class_labels=torch.full((B, R), 99),
            masked_regions=torch.ones(B, R, dtype=torch.bool),
            region_feature_targets=inputs["region_features"],
        ),
        "region_class_labels",
    )
    p.error("retrieval labels of 3", lambda: forward(retrieval, labels=torch.tensor([3.0, 0.0])), "labels")
    p.error("wrong feature dim", lambda: forward(region_features=torch.randn(B, R, 5)), "region_features")
