"""The training step compiles as one graph: `torch.compile(fullgraph=True)` traces the forward of the pre-training
and retrieval models on the collators' batches without a graph break, for every task mix a stage can have (all
tasks, text-only, ITM-only, ITC), with dropout and the global-image token; AOTAutograd then compiles the backward,
and the compiled step gives the eager step's losses and gradients. With the collators' shape buckets, a stage of
the demo compiles a bounded number of times (static shapes, as CUDA graphs need).

The tests use the "aot_eager" backend (dynamo + AOTAutograd, no code generation): it finds the same graph breaks as
inductor in seconds, without a C++ compiler.
"""

import numpy as np
import pytest
import torch

from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining, ImageBertForRetrieval
from modeling_imagebert.data.collators import (
    DataCollatorForImageBertPretraining,
    DataCollatorForImageTextRetrieval,
    DataCollatorForTextMLM,
    add_labelled_positions,
)
from modeling_imagebert.processing_imagebert import ImageBertProcessor
from modeling_imagebert.tasks_imagebert import MASKED_BATCH_KEYS

pytestmark = pytest.mark.usefixtures("one_thread")

FEATURE_DIM = 12
GLOBAL_DIM = 6
NUM_CLASSES = 50


@pytest.fixture(scope="module")
def processor(minilm_path):
    from transformers import BertTokenizerFast

    return ImageBertProcessor(BertTokenizerFast.from_pretrained(minilm_path))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _config(processor, dropout: float = 0.1, **overrides) -> ImageBertConfig:
    kwargs = dict(
        vocab_size=len(processor.tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        visual_feature_dim=FEATURE_DIM,
        num_object_classes=NUM_CLASSES,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        use_global_image_feature=True,
        global_image_feature_dim=GLOBAL_DIM,
    )
    return ImageBertConfig(**{**kwargs, **overrides})


def _examples(count, captions_per_image=2, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "image_id": f"img{i // captions_per_image}",
            "input_ids": [101, *rng.integers(3000, 29000, int(rng.integers(3, 12))).tolist(), 102],
            "region_features": rng.standard_normal((n, FEATURE_DIM)).astype(np.float16),
            "region_locations": rng.uniform(0, 1, (n, 5)).astype(np.float32),
            "region_classes": rng.integers(0, NUM_CLASSES, n),
            "global_feature": rng.standard_normal(GLOBAL_DIM).astype(np.float16),
            "example_index": i,
        }
        for i, n in enumerate(int(rng.integers(1, 9)) for _ in range(count))
    ]


def _pretraining_batch(processor, mix: str) -> dict:
    """A collated batch of one of the task mixes a stage's batches have (see `schedule.ScheduledBatches`)."""
    examples = _examples(8)
    if mix == "text-only":  # a text source (DataCollatorForTextMLM)
        collator = DataCollatorForTextMLM(processor, mlm_probability=0.3, seed=3)
        return collator(
            [{"input_ids": e["input_ids"], "example_index": e["example_index"]} for e in examples]
        )
    masked = mix in ("all tasks", "masked + itc")
    collator = DataCollatorForImageBertPretraining(
        processor,
        mlm_probability=0.3 if masked else 0.0,
        region_mask_probability=0.3 if masked else 0.0,
        num_object_classes=NUM_CLASSES,
        seed=1,
    )
    batch = collator(examples)
    if mix == "itm-only":  # the unmasked ITM batches of `itm_mode: separate`
        for name in MASKED_BATCH_KEYS:
            batch.pop(name)
        add_labelled_positions(batch)
    if mix == "masked + itc":  # the masked batches of `itm_mode: separate` (all matched: no itm_labels)
        batch.pop("itm_labels")
        add_labelled_positions(batch)
    return batch


# (task mix, ITC loss weight): every kind of batch a stage can feed the model.
MIXES = [("all tasks", 0.0), ("all tasks", 1.0), ("text-only", 0.0), ("itm-only", 0.0), ("masked + itc", 1.0)]


def _break_reasons(model, batch) -> list[str]:
    explanation = torch._dynamo.explain(model)(**batch)
    return [
        f"{reason.reason.splitlines()[0]} at {reason.user_stack[-1]}" for reason in explanation.break_reasons
    ]


@pytest.mark.parametrize(("mix", "itc"), MIXES)
def test_pretraining_forward_has_no_graph_break(processor, mix, itc):
    model = ImageBertForPreTraining(_config(processor, itc_loss_weight=itc)).train()
    batch = _pretraining_batch(processor, mix)
    if mix != "text-only":
        assert "global_image_features" in batch
    assert _break_reasons(model, batch) == []


@pytest.mark.parametrize("loss", ["binary", "ce", "triplet", "binary+0.5*ce+triplet", "ce+0.5*itc"])
def test_retrieval_forward_has_no_graph_break(processor, loss):
    model = ImageBertForRetrieval(_config(processor, retrieval_loss=loss)).train()
    batch = DataCollatorForImageTextRetrieval(processor, num_candidates=3, seed=2)(
        _examples(6, captions_per_image=1)
    )
    assert _break_reasons(model, batch) == []


def _step(model, batch, run=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward + backward of `model` (through `run`, its compiled form, when given) -> (the detached losses,
    the gradients)."""
    model.zero_grad(set_to_none=True)
    outputs = (model if run is None else run)(**batch)
    outputs.loss.backward()
    losses = {
        name: value.detach() for name, value in outputs.items() if name.endswith("loss") and value is not None
    }
    return losses, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("mix", "itc"), MIXES)
def test_compiled_pretraining_step_equals_the_eager_one(processor, mix, itc):
    # Dropout off: the compiled graph draws its dropout masks with F.dropout, the eager CPU step with its own kernel.
    torch.manual_seed(0)
    model = ImageBertForPreTraining(_config(processor, dropout=0.0, itc_loss_weight=itc)).train()
    batch = _pretraining_batch(processor, mix)
    eager_losses, eager_grads = _step(model, batch)
    losses, grads = _step(model, batch, torch.compile(model, backend="aot_eager", fullgraph=True))
    assert losses.keys() == eager_losses.keys() and "loss" in losses
    for name, value in eager_losses.items():
        torch.testing.assert_close(losses[name], value, rtol=0, atol=1e-6, msg=name)
    # AOTAutograd gives the parameters of outputs the loss does not read (the pooler and ITM head in a text-only
    # batch) zero gradients where eager autograd leaves None.
    assert grads.keys() >= eager_grads.keys()
    assert not any(grads[name].any() for name in grads.keys() - eager_grads.keys())
    for name, value in eager_grads.items():
        torch.testing.assert_close(grads[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_step_with_dropout_trains(processor):
    # With dropout on, fullgraph compilation of forward and backward succeeds and the gradients are finite.
    torch.manual_seed(0)
    model = ImageBertForPreTraining(_config(processor, itc_loss_weight=1.0)).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    losses, grads = _step(model, _pretraining_batch(processor, "all tasks"), compiled)
    assert torch.isfinite(losses["loss"]) and all(torch.isfinite(g).all() for g in grads.values())


def test_compiled_retrieval_step_equals_the_eager_one(processor):
    torch.manual_seed(0)
    model = ImageBertForRetrieval(_config(processor, dropout=0.0, retrieval_loss="binary+ce+0.5*itc")).train()
    batch = DataCollatorForImageTextRetrieval(processor, num_candidates=3, seed=2)(
        _examples(6, captions_per_image=1)
    )
    eager_losses, eager_grads = _step(model, batch)
    losses, grads = _step(model, batch, torch.compile(model, backend="aot_eager", fullgraph=True))
    for name, value in eager_losses.items():
        torch.testing.assert_close(losses[name], value, rtol=0, atol=1e-6, msg=name)
    for name, value in eager_grads.items():
        torch.testing.assert_close(grads[name], value, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# Static shapes: shape buckets bound the compilations of a stage
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(minilm_path):
    """The demo recipe's model, processor and stages, on a smaller toy world (300 images per stage)."""
    from modeling_imagebert.package_data import demo_recipe_path
    from modeling_imagebert.pretraining.model_setup import build_model_and_processor
    from modeling_imagebert.pretraining.recipes import load_recipe

    recipe = load_recipe(
        demo_recipe_path(), [f"stages.{s}.datasets.0.toy_world.num_images=300" for s in (0, 1)]
    )
    model, processor = build_model_and_processor(recipe)
    return recipe, model.train(), processor


def _stage_batches(demo, stage_index, shape_buckets, count):
    from modeling_imagebert.pretraining.model_setup import set_stage_loss_weights
    from modeling_imagebert.pretraining.schedule import plan_stage

    recipe, model, processor = demo
    stage = recipe.stages[stage_index]
    set_stage_loss_weights(model.config, stage.tasks)
    plan = plan_stage(
        stage, stage_index, processor, model.config, num_processes=1, seed=42, shape_buckets=shape_buckets
    )
    return list(plan.batches(0, 0, count))


def _shapes(batch) -> tuple:
    return tuple((key, tuple(value.shape)) for key, value in sorted(batch.items()))


@pytest.mark.parametrize("stage_index", [0, 1])
def test_a_demo_stage_compiles_at_most_four_times_with_shape_buckets(demo, stage_index):
    from torch._dynamo.testing import CompileCounter

    from modeling_imagebert.pretraining.compiling import mark_dynamic_positions

    _, model, _ = demo
    batches = _stage_batches(demo, stage_index, shape_buckets=True, count=24)
    # Without buckets nearly every batch has its own shape: a static-shape step would compile for each.
    unbucketed = _stage_batches(demo, stage_index, shape_buckets=False, count=24)
    assert len({_shapes(batch) for batch in unbucketed}) > 4
    counter = CompileCounter()  # a dynamo backend that counts the graphs it is given, then runs them eagerly
    compiled = torch.compile(model, backend=counter, dynamic=False)
    for batch in batches:
        compiled(**mark_dynamic_positions(batch))
    assert 1 <= counter.frame_count <= 4, counter.frame_count


@pytest.mark.parametrize("stage_index", [0, 1])
def test_shape_buckets_keep_the_losses(demo, stage_index):
    _, model, _ = demo
    bucketed = _stage_batches(demo, stage_index, shape_buckets=True, count=6)
    plain = _stage_batches(demo, stage_index, shape_buckets=False, count=6)
    assert any(_shapes(a) != _shapes(b) for a, b in zip(bucketed, plain, strict=True))
    with torch.no_grad():
        for padded, batch in zip(bucketed, plain, strict=True):
            expected, got = model(**batch), model(**padded)
            for name, value in expected.items():
                if name.endswith("loss") and value is not None:
                    # Within 1e-6 relative (a float32 ulp of the summed loss is ~1e-7 of it): longer sums in the
                    # padded attention and heads round differently, nothing else changes.
                    torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-6)


def test_retrieval_collator_shape_buckets_keep_the_losses(processor):
    torch.manual_seed(0)
    model = ImageBertForRetrieval(_config(processor, dropout=0.0, retrieval_loss="binary+ce+0.5*itc")).train()
    examples = _examples(6, captions_per_image=1)
    plain = DataCollatorForImageTextRetrieval(processor, num_candidates=3, seed=2)(examples)
    padded = DataCollatorForImageTextRetrieval(processor, num_candidates=3, seed=2, shape_buckets=True)(
        examples
    )
    assert padded["input_ids"].shape[1] == 16 > plain["input_ids"].shape[1]
    assert padded["region_features"].shape[1] == 8 >= plain["region_features"].shape[1]
    with torch.no_grad():
        expected, got = model(**plain), model(**padded)
    for name in ("loss", "binary_loss", "ce_loss", "itc_loss"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("value", ["fast", "true", "reduce_overhead"])
def test_a_bad_compile_value_is_one_clear_recipe_error(value):
    from modeling_imagebert.pretraining.recipes import RecipeError, recipe_from_dict

    recipe = {
        "model": {"config": "imagebert-tiny"},
        "training": {"compile": value},
        "stages": [{"init": "config", "datasets": [{"toy_world": {}}], "max_steps": 1, "batch_size": 2}],
    }
    with pytest.raises(RecipeError, match=r"^training\.compile: expected one of \['none', 'default', "):
        recipe_from_dict(recipe)
    recipe["training"]["compile"] = "reduce-overhead"
    training = recipe_from_dict(recipe).training
    assert training.uses_shape_buckets and training.compile == "reduce-overhead"
    recipe["training"] = {}
    assert not recipe_from_dict(recipe).training.uses_shape_buckets  # the paper's padding by default


def test_run_pretrain_with_training_compile_trains_like_the_eager_run(tmp_path, minilm_path, monkeypatch):
    # The wiring of examples/run_pretrain.py: `--compile default` runs the step through the compiled module (here the
    # aot_eager backend, for speed) on shape-bucketed batches, checkpoints and finishes; without dropout its losses
    # are the eager run's up to float rounding.
    import json

    from test_pretrain import _run, _tiny_recipe, run_pretrain

    from modeling_imagebert.pretraining import compiling

    compiled = []

    def compile_step(model, mode, backend="inductor"):
        compiled.append(mode)
        return compiling.compile_step(model, mode, backend="aot_eager")

    monkeypatch.setattr(run_pretrain, "compile_step", compile_step)
    recipe = _tiny_recipe(minilm_path, stages=2, steps=3)
    recipe["model"]["overrides"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    _, eager = _run(tmp_path, recipe, name="eager")
    results, out = _run(tmp_path, recipe, "--compile", "default", "--save_steps", "2", name="compiled")
    assert compiled == ["none", "none", "default", "default"] and (out / "checkpoint-1-2").is_dir()
    history = json.loads((eager / "pretrain_results.json").read_text())["loss_history"]
    assert [r["loss"] for r in results["loss_history"]] == pytest.approx(
        [r["loss"] for r in history], rel=1e-4
    )
