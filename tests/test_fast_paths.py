"""Fast paths compute what the plain path computes: same losses and gradients (to float tolerance), and dropout that
is still dropout with the configured rate. Also the length-grouped sampler (seeded, complete, resumable)."""

import os

import pytest
import torch
from torch.nn import functional as F

from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining
from modeling_imagebert import kernels_imagebert as kernels

B, T, R, FEAT = 4, 9, 7, 16


def _config(**overrides) -> ImageBertConfig:
    kwargs = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        visual_feature_dim=FEAT,
        num_object_classes=7,
        max_regions=10,
        max_text_length=12,
        max_position_embeddings=64,
        region_position_id=63,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ImageBertConfig(**{**kwargs, **overrides})


def _batch(seed: int = 0) -> dict:
    """Padded pre-training batch: text and regions of varying length, half the pairs mismatched."""
    g = torch.Generator().manual_seed(seed)
    attention_mask = (torch.arange(T)[None] < torch.tensor([T, 5, 7, 3])[:, None]).long()
    region_mask = (torch.arange(R)[None] < torch.tensor([R, 2, 5, 4])[:, None]).long()
    input_ids = torch.randint(3, 99, (B, T), generator=g) * attention_mask
    text_masked = (torch.rand(B, T, generator=g) < 0.4) & attention_mask.bool()
    text_masked[:, 1] = True
    region_masked = (torch.rand(B, R, generator=g) < 0.4) & region_mask.bool()
    region_masked[:, 0] = True
    corners = torch.rand(B, R, 4, generator=g).sort(-1).values
    x1, y1, x2, y2 = corners[..., 0], corners[..., 1], corners[..., 3], corners[..., 2]
    features = torch.randn(B, R, FEAT, generator=g)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=torch.zeros(B, T, dtype=torch.long),
        region_features=features.masked_fill(region_masked[..., None], 0.0),
        region_locations=torch.stack([x1, y1, x2, y2, (x2 - x1) * (y2 - y1)], -1),
        region_attention_mask=region_mask,
        labels=torch.where(text_masked, input_ids, -100),
        masked_regions=region_masked,
        region_class_labels=torch.where(region_masked, torch.randint(0, 7, (B, R), generator=g), -100),
        region_feature_targets=features,
        itm_labels=torch.tensor([1, 0, 1, 0]),
    )


def _loss_and_grads(model, batch, seed=0, autocast=False):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        output = model(**batch)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    losses = [output.loss, output.mlm_loss, output.moc_loss, output.mrfr_loss, output.itm_loss]
    return torch.stack([value.detach().float() for value in losses]), grads


def _assert_same(reference, fast, rtol, atol):
    ref_losses, ref_grads = reference
    fast_losses, fast_grads = fast
    torch.testing.assert_close(fast_losses, ref_losses, rtol=rtol, atol=atol)
    assert fast_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=rtol, atol=atol, msg=name)


def _model(**config_overrides) -> ImageBertForPreTraining:
    torch.manual_seed(0)
    return ImageBertForPreTraining(_config(**config_overrides)).train()


# ---------------------------------------------------------------------------------------------------- fused QKV


def test_fused_qkv_gives_the_plain_losses_and_gradients():
    model, batch = _model(), _batch()
    reference = _loss_and_grads(model.set_fast_paths(False), batch)
    fast = _loss_and_grads(model.set_fast_paths(False, fused_qkv=True), batch)
    assert any("query.weight" in name for name in fast[1])
    _assert_same(reference, fast, rtol=1e-5, atol=1e-6)


def test_fused_qkv_keeps_the_three_checkpoint_tensors():
    names = set(_model().state_dict())
    for part in ("query", "key", "value"):
        assert f"imagebert.encoder.layer.0.attention.self.{part}.weight" in names
    assert not any("qkv" in name for name in names)


# ---------------------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fast_dropout_mask_keeps_each_element_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    n = 400_001  # odd: the last 64-bit draw is half used
    keep = kernels._keep_mask(torch.Size([n]), p, torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == (n,)
    rate, sigma = keep.float().mean().item(), ((1 - p) * p / n) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sigma
    # Both 32-bit halves of each draw follow the rate, and neighbours are not correlated.
    pairs = keep[: n - 1].view(-1, 2).float()
    for half in (0, 1):
        assert abs(pairs[:, half].mean().item() - (1 - p)) < 5 * sigma * 2**0.5
    both = (pairs[:, 0] * pairs[:, 1]).mean().item()
    assert abs(both - (1 - p) ** 2) < 0.01
    # A new draw gives a new mask.
    assert not torch.equal(keep, kernels._keep_mask(torch.Size([n]), p, torch.device("cpu")))


def test_fast_dropout_add_is_residual_plus_inverted_dropout_with_matching_gradient():
    p = 0.3
    x = torch.randn(6, 50, 8, requires_grad=True)
    residual = torch.randn(6, 50, 8, requires_grad=True)
    out = kernels._fast_dropout_add(x, residual, p)
    delta = (out - residual).detach()
    kept = delta != 0
    torch.testing.assert_close(delta[kept], x.detach()[kept] / (1 - p))
    assert 0.5 < kept.float().mean().item() < 0.9
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / (1 - p))
    torch.testing.assert_close(residual.grad, torch.ones_like(residual))


def test_fast_dropout_scales_kept_elements_and_zeroes_the_rest():
    p = 0.25
    x = torch.rand(10, 1000) + 0.5
    out = kernels._fast_dropout(x, p)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / (1 - p))
    assert abs(kept.float().mean().item() - (1 - p)) < 0.02


def test_fast_dropout_model_equals_plain_dropout_given_the_same_masks(monkeypatch):
    """With `_keep_mask` drawing exactly what F.dropout draws (bernoulli_ on a tensor of the same shape, in the same
    order), the fast path with dropout on reproduces the plain path: every dropout site is wired to the same rate."""
    model = _model(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3)
    batch = _batch()
    model.config._attn_implementation = "eager"  # plain attention dropout: F.dropout on the probabilities
    reference = _loss_and_grads(model.set_fast_paths(False), batch, seed=3)
    model.config._attn_implementation = "sdpa"  # the fast path replaces SDPA's CPU dropout fallback

    def bernoulli_mask(shape, p, device):
        return torch.empty(shape, device=device).bernoulli_(1 - p).bool()

    monkeypatch.setattr(kernels, "_keep_mask", bernoulli_mask)
    # The sparse last layer draws its dropout masks for fewer rows, hence other random numbers: it is left out here
    # (its own tests run with dropout off, and check that its dropout is on at the configured rate).
    fast = _loss_and_grads(model.set_fast_paths(True, sparse_last_layer=False), batch, seed=3)
    _assert_same(reference, fast, rtol=1e-4, atol=1e-5)
    # ... and dropout really is on: another seed gives another loss.
    other = _loss_and_grads(model, batch, seed=4)
    assert not torch.allclose(other[0][0], fast[0][0])


def test_fast_dropout_is_off_in_eval_mode():
    model = _model(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3).eval()
    batch = _batch()
    with torch.no_grad():
        fast = model.set_fast_paths(True)(**batch).loss
        plain = model.set_fast_paths(False)(**batch).loss
    torch.testing.assert_close(fast, plain)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_cpu_training_attention_is_sdpa_with_dropout_on_the_probabilities(mask_kind):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    allowed = torch.rand(2, 1, 1, 5, generator=g) > 0.3
    allowed[..., 0] = True
    mask = {
        "none": None,
        "bool": allowed,
        "additive": torch.zeros(2, 1, 1, 5).masked_fill(~allowed, torch.finfo(torch.float32).min),
    }[mask_kind]
    sdpa_mask = None if mask is None else allowed
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, scale=0.5).transpose(1, 2)
    out = kernels._cpu_training_attention(q, k, v, mask, 0.5, 0.0)
    torch.testing.assert_close(out, expected)
    # With dropout: the probabilities are dropped with the mask drawn first, and rescaled.
    torch.manual_seed(7)
    out = kernels._cpu_training_attention(q, k, v, mask, 0.5, 0.4)
    torch.manual_seed(7)
    keep = kernels._keep_mask(torch.Size([2, 3, 5, 5]), 0.4, torch.device("cpu"))
    scores = (q @ k.transpose(-1, -2)) * 0.5
    if sdpa_mask is not None:
        scores = scores.masked_fill(~sdpa_mask, float("-inf"))
    expected = ((scores.softmax(-1) * keep / 0.6) @ v).transpose(1, 2)
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------------------------------------------- sparse last layer


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_sparse_last_layer_gives_the_plain_losses_and_gradients(attention, checkpointing):
    model, batch = _model(), _batch()
    model.config._attn_implementation = attention
    if checkpointing:
        model.activation_checkpointing_enable()
    reference = _loss_and_grads(model.set_fast_paths(True, sparse_last_layer=False), batch)
    fast = _loss_and_grads(model.set_fast_paths(True), batch)
    _assert_same(reference, fast, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "drop", ["labels", "region_class_labels", "region_feature_targets", "itm_labels", "all_masks", "text"]
)
def test_sparse_last_layer_matches_for_every_subset_of_tasks(drop):
    """ITM-only batches (the demo's separate ITM batches) read [CLS] alone; no text, no conditional masking, and the
    global image token move the positions."""
    model, batch = _model(use_global_image_feature=True, global_image_feature_dim=6), _batch()
    batch["global_image_features"] = torch.randn(B, 6)
    if drop == "all_masks":
        for name in ("labels", "masked_regions", "region_class_labels", "region_feature_targets"):
            batch.pop(name)
    elif drop == "text":
        for name in ("input_ids", "attention_mask", "token_type_ids", "labels"):
            batch.pop(name)
    else:
        batch.pop(drop)

    def run():
        model.zero_grad(set_to_none=True)
        output = model(**batch)
        output.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        losses = {k: v for k, v in output.items() if k.endswith("loss") and v is not None}
        return torch.stack([v.detach() for v in losses.values()]), grads

    model.set_fast_paths(True, sparse_last_layer=False)
    reference = run()
    model.set_fast_paths(True)
    _assert_same(reference, run(), rtol=1e-5, atol=1e-6)


def test_last_layer_positions_compute_those_rows_and_zero_the_others():
    model = _model().imagebert.eval()
    batch = _batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "region_features")}
    inputs.update(
        region_locations=batch["region_locations"], region_attention_mask=batch["region_attention_mask"]
    )
    positions = torch.rand(B, T + R, generator=torch.Generator().manual_seed(1)) < 0.3
    with torch.no_grad():
        full = model(**inputs)
        part = model(**inputs, last_layer_positions=positions)
    computed = positions.clone()
    computed[:, 0] = True  # the pooler's position is always computed
    torch.testing.assert_close(part.last_hidden_state[computed], full.last_hidden_state[computed])
    assert part.last_hidden_state[~computed].abs().sum() == 0
    torch.testing.assert_close(part.pooler_output, full.pooler_output)
    with pytest.raises(ValueError, match="last_layer_positions must have shape"):
        model(**inputs, last_layer_positions=positions[:, :-1])


def test_sparse_last_layer_is_off_when_hidden_states_are_requested():
    model, batch = _model().eval(), _batch()
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        plain = model.set_fast_paths(True, sparse_last_layer=False)(**batch, output_hidden_states=True)
    assert (out.hidden_states[-1].abs().sum(-1) > 0).all()
    torch.testing.assert_close(out.hidden_states[-1], plain.hidden_states[-1])


def test_sparse_last_layer_keeps_dropout_at_the_configured_rates(monkeypatch):
    """The rows of the sparse last layer go through the same dropout sites with the same rates."""
    model, batch = _model(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3), _batch()
    calls = []
    original = kernels._keep_mask

    def recording_mask(shape, p, device):
        calls.append((tuple(shape), round(p, 6)))
        return original(shape, p, device)

    monkeypatch.setattr(kernels, "_keep_mask", recording_mask)
    model(**batch)
    per_layer = 3  # attention probabilities, attention output, feed-forward output
    last = calls[-per_layer:]
    queries = last[0][0][2]
    assert queries < T + R  # fewer query rows than positions ...
    assert last == [((B, 4, queries, T + R), 0.3), ((B, queries, 32), 0.2), ((B, queries, 32), 0.2)]
    assert calls[-2 * per_layer][0] == (B, 4, T + R, T + R)  # ... while the layer before has them all


def test_sparse_last_layer_scores_retrieval_pairs_as_the_plain_path():
    from modeling_imagebert import ImageBertForRetrieval

    torch.manual_seed(0)
    model = ImageBertForRetrieval(_config(retrieval_loss="binary+ce")).train()
    model_inputs = ("input_ids", "attention_mask", "token_type_ids", "region_features", "region_locations")
    batch = {k: v for k, v in _batch().items() if k in (*model_inputs, "region_attention_mask")}
    batch["labels"] = torch.tensor([1, 0, 1, 0])

    def run():
        model.zero_grad(set_to_none=True)
        output = model(**batch, num_candidates=2)
        output.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return torch.stack([output.loss.detach(), *output.logits.detach()]), grads

    model.set_fast_paths(True, sparse_last_layer=False)
    reference = run()
    model.set_fast_paths(True)
    _assert_same(reference, run(), rtol=1e-5, atol=1e-6)


def test_sparse_last_layer_with_the_global_image_feature_alone():
    torch.manual_seed(0)
    model = _model(use_global_image_feature=True, global_image_feature_dim=6).eval()
    inputs = {"global_image_features": torch.randn(B, 6), "itm_labels": torch.tensor([1, 0, 1, 0])}
    with torch.no_grad():
        fast = model(**inputs)
        plain = model.set_fast_paths(True, sparse_last_layer=False)(**inputs)
    torch.testing.assert_close(fast.itm_logits, plain.itm_logits)
    torch.testing.assert_close(fast.loss, plain.loss)


# ---------------------------------------------------------------------------------------------------- word gradient


def test_sparse_word_gradient_gives_the_dense_gradient():
    model, batch = _model(), _batch()
    reference = _loss_and_grads(model.set_fast_paths(True, sparse_word_gradient=False), batch)
    fast = _loss_and_grads(model.set_fast_paths(True), batch)
    _assert_same(reference, fast, rtol=1e-5, atol=1e-6)
    weight = model.imagebert.embeddings.word_embeddings.weight
    assert weight.grad.layout == torch.strided  # dense, as optimizers and DDP expect


def test_sparse_word_gradient_is_used_only_with_mlm_labels(monkeypatch):
    """Without MLM labels the tied decoder adds no dense gradient, so the lookup must stay dense: an ITM-only batch
    then an MLM batch, accumulated and stepped with AdamW, as in the demo's separate ITM batches."""
    model, batch = _model(), _batch()
    sparse_calls = []
    original = F.embedding

    def recording_embedding(input, weight, *args, **kwargs):
        if weight is model.imagebert.embeddings.word_embeddings.weight:
            sparse_calls.append(kwargs.get("sparse", args[4] if len(args) > 4 else False))
        return original(input, weight, *args, **kwargs)

    monkeypatch.setattr(F, "embedding", recording_embedding)
    itm_only = {
        k: v for k, v in batch.items() if k not in ("labels", "masked_regions", "region_class_labels")
    }
    itm_only.pop("region_feature_targets")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(**itm_only).loss.backward()
    assert sparse_calls == [False]
    model(**batch).loss.backward()
    assert sparse_calls[-1] is True
    assert model.imagebert.embeddings.word_embeddings.weight.grad.layout == torch.strided
    optimizer.step()
    with torch.no_grad():
        model.eval()(**batch)  # no grad: the lookup stays dense
    assert sparse_calls[-1] is False
    # Nothing lingers after a call: the choice is an argument of each call, never state of the embeddings.
    assert not hasattr(model.imagebert.embeddings, "_sparse_word_gradient")


# ---------------------------------------------------------------------------------------------------- autocast


def test_bf16_autocast_fast_paths_match_plain_path_to_bf16_tolerance():
    model, batch = _model(), _batch()
    reference = _loss_and_grads(model.set_fast_paths(False), batch, autocast=True)
    fast = _loss_and_grads(model.set_fast_paths(True), batch, autocast=True)
    _assert_same(reference, fast, rtol=3e-2, atol=3e-3)


def test_fp32_mlm_decoder_changes_nothing_without_autocast():
    model, batch = _model(), _batch()
    reference = _loss_and_grads(model.set_fast_paths(False, fused_qkv=True), batch)
    fast = _loss_and_grads(model.set_fast_paths(True), batch)
    _assert_same(reference, fast, rtol=1e-6, atol=1e-7)


def test_fp32_mlm_decoder_gives_fp32_logits_under_autocast():
    model, batch = _model(), _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.set_fast_paths(True)(**batch).mlm_logits
        plain_logits = model.set_fast_paths(False)(**batch).mlm_logits
    assert logits.dtype == torch.float32 and plain_logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, plain_logits.float(), rtol=3e-2, atol=3e-2)


# ---------------------------------------------------------------------------------------------------- compile


def test_compile_layers_is_opt_in_and_gives_the_plain_losses():
    model, batch = _model(), _batch()
    reference = _loss_and_grads(model, batch)
    assert not any(getattr(layer, "_compiled_call_impl", None) for layer in model.imagebert.encoder.layer)
    torch._dynamo.reset()
    # The "eager" backend checks that each layer is captured whole-graph; inductor is what users pick.
    model.compile_layers(backend="eager", fullgraph=True)
    assert all(layer._compiled_call_impl is not None for layer in model.imagebert.encoder.layer)
    compiled = _loss_and_grads(model, batch)
    _assert_same(reference, compiled, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("IMAGEBERT_SLOW") != "1", reason="slow: set IMAGEBERT_SLOW=1")
def test_compile_layers_with_inductor_gives_the_plain_losses():
    model, batch = _model(), _batch()
    reference = _loss_and_grads(model, batch)
    torch._dynamo.reset()
    compiled = _loss_and_grads(model.compile_layers(), batch)
    _assert_same(reference, compiled, rtol=1e-4, atol=1e-5)
