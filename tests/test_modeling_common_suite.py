"""Transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) run against our three classes, the
way a model inside transformers is tested.

The mixins ship in the transformers source distribution, not in the wheel: `make test` (and `.ci/run`) fetch the
sdist of the installed version with `.ci/fetch_transformers_sdist.py` and point `TRANSFORMERS_SDIST_DIR` at it.
Without that variable this module is skipped with the command that fetches it.

The sdist's `tests/` folder is imported as the package `transformers_sdist_tests`, so it never mixes with our own
`tests/`. Three helper modules the mixins import live in subfolders the sdist does not ship
(`exporters/test_export.py`, `generation/test_utils.py`, `utils/test_configuration_utils.py`); when absent, they
are stood in for below by what our classes need of them (see `_stand_ins`).
"""

import importlib
import os
import re
import sys
import types
import unittest
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers

from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining, ImageBertForRetrieval, ImageBertModel

SDIST_ENV = "TRANSFORMERS_SDIST_DIR"
FETCH_COMMAND = f"{SDIST_ENV}=$(python .ci/fetch_transformers_sdist.py)"
PACKAGE = "transformers_sdist_tests"


def _stand_ins(tests_dir: Path) -> dict[str, dict]:
    """Modules to register for the helper modules the sdist lacks: `{module name: attributes}`.

    - `exporters.test_export.ExportTesterMixin` adds the export tests (ONNX, ExecuTorch, TensorRT, ...), which need
      the exporters' own test helpers, absent from the sdist: an empty mixin leaves them out.
    - `generation.test_utils.GenerationTesterMixin` is only used by `test_generation_tester_mixin_inheritance`
      to check that a model which cannot generate does not inherit it: an empty class answers that.
    - `utils.test_configuration_utils.config_common_kwargs`: the attributes every `PreTrainedConfig` accepts,
      set to non-default values, that `ConfigTester.check_config_arguments_init` passes to the config.
    """

    class ExportTesterMixin:
        """Stand-in: the export tests are not run (the sdist does not ship `tests/exporters/`)."""

    class GenerationTesterMixin:
        """Stand-in: none of our models generates."""

    config_common_kwargs = {
        "return_dict": False,
        "output_hidden_states": True,
        "output_attentions": True,
        "dtype": "float16",
        "chunk_size_feed_forward": 5,
        "architectures": ["ImageBertModel"],
        "id2label": {0: "label"},
        "label2id": {"label": "0"},
        "problem_type": "regression",
    }
    wanted = {
        "exporters.test_export": {"ExportTesterMixin": ExportTesterMixin},
        "generation.test_utils": {"GenerationTesterMixin": GenerationTesterMixin},
        "utils.test_configuration_utils": {"config_common_kwargs": config_common_kwargs},
    }
    return {
        name: attrs
        for name, attrs in wanted.items()
        if not (tests_dir / f"{name.replace('.', '/')}.py").is_file()
    }


def _import_sdist_mixins(root: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """Import `test_modeling_common` and `test_configuration_common` from the unpacked sdist at `root` under the
    package name `transformers_sdist_tests`. Returns the two modules."""
    tests_dir = root / "tests"
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(tests_dir)]
        sys.modules[PACKAGE] = package
        for name, attributes in _stand_ins(tests_dir).items():
            parent = f"{PACKAGE}.{name.split('.')[0]}"
            if parent not in sys.modules:
                sys.modules[parent] = types.ModuleType(parent)
                sys.modules[parent].__path__ = []
            module = types.ModuleType(f"{PACKAGE}.{name}")
            module.__dict__.update(attributes)
            sys.modules[module.__name__] = module
    with warnings.catch_warnings():
        # The mixin's marks (flash_attn_test, accelerate_tests, ...) are registered by transformers' own conftest.
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        modeling_common = importlib.import_module(f"{PACKAGE}.test_modeling_common")
    # `test_configuration_common` runs `direct_transformers_import(<its folder>)`, which executes the repository's
    # empty `tests/__init__.py` (absent from the sdist) as `transformers` and returns the installed `transformers`.
    with mock.patch("transformers.utils.direct_transformers_import", lambda *args, **kwargs: transformers):
        configuration_common = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    return modeling_common, configuration_common


def _sdist_version_of(root: Path) -> str | None:
    """The `Version:` line of the unpacked sdist's PKG-INFO at `root`, or None without one."""
    pkg_info = root / "PKG-INFO"
    if pkg_info.is_file():
        for line in pkg_info.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return None


_sdist = os.environ.get(SDIST_ENV)
if not _sdist:
    pytest.skip(
        f"transformers' common model tests need the transformers sdist: run `make test`, or set {FETCH_COMMAND}",
        allow_module_level=True,
    )
if not (Path(_sdist) / "tests" / "test_modeling_common.py").is_file():
    raise RuntimeError(f"{SDIST_ENV}={_sdist}: no tests/test_modeling_common.py there; set {FETCH_COMMAND}")
_sdist_version = _sdist_version_of(Path(_sdist))
if _sdist_version is not None and _sdist_version != transformers.__version__:
    # The common tests follow the library they ship with: another version's tests test another API.
    raise RuntimeError(
        f"{SDIST_ENV}={_sdist}: PKG-INFO says transformers {_sdist_version}, but {transformers.__version__} is "
        f"installed; set {FETCH_COMMAND}"
    )
try:
    _modeling_common, _configuration_common = _import_sdist_mixins(Path(_sdist))
except ImportError as error:
    raise RuntimeError(
        f"cannot import transformers' common tests from {_sdist} ({error}); install the test dependencies with "
        "`pip install -e .[dev]`"
    ) from error

ModelTesterMixin = _modeling_common.ModelTesterMixin
ids_tensor = _modeling_common.ids_tensor
floats_tensor = _modeling_common.floats_tensor
random_attention_mask = _modeling_common.random_attention_mask
ConfigTester = _configuration_common.ConfigTester


# Every common test that does not run here, with why. A parameterised test is named by its stem. The mixin decides
# these skips itself. On the transformers release `constraints.txt` pins (the one CI tests, whose common suite was
# reviewed), `ImageBertModelTest.skipTest` fails any skip not listed here, and
# `test_every_skip_of_the_common_suite_is_documented` any test skipped by a decorator and not listed, or listed and
# gone: `make test` is green only when every skip has its reason. On any other release (`make test-latest`) a skip
# not listed is reported instead of failed: it is skipped with the reason "NOT REVIEWED: ...", and a
# `UnreviewedCommonTestWarning` in the warnings summary names it, so a newer transformers that adds tests shows them
# (to be reviewed and listed when the pin moves) without turning a user's suite red over tests that do not apply.
NOT_APPLICABLE = {
    # The architecture has no such part.
    "test_attn_implementation_composite_models": "one config and one encoder: not a composite (vision + text) model",
    "test_can_set_attention_dynamically_composite_model": "one config and one encoder: not a composite model",
    "test_sdpa_can_dispatch_composite_models": "one config and one encoder: not a composite model",
    "test_internal_model_config_and_subconfig_are_same": "the config has no sub-configs",
    "test_bc_cache_name_forward": "a bidirectional encoder: no key-value cache",
    "test_causal_lm_loss_honors_shift_labels": "no causal language-model head (MLM predicts masked tokens in place)",
    "test_encoder_decoder_loss_no_double_shift": "not an encoder-decoder",
    "test_can_load_from_already_mapped_keys": "no checkpoint-key conversion registered (from_bert_pretrained renames)",
    "test_reverse_loading_mapping": "no checkpoint-key conversion registered (from_bert_pretrained renames)",
    "test_eager_matches_batched_and_grouped_inference": "no mixture-of-experts layers (grouped_mm runs experts)",
    "test_moe_models_record_router_logits": "no mixture-of-experts layers",
    "test_output_router_logits_from_config": "no mixture-of-experts layers",
    "test_keep_in_fp32_modules": "no module has to stay in fp32 (no `_keep_in_fp32_modules`)",
    "test_keep_in_fp32_modules_exist": "no module has to stay in fp32 (no `_keep_in_fp32_modules`)",
    "test_keep_in_fp32_modules_strict_also_hardcode_fp32": "no `_keep_in_fp32_modules_strict`",
    "test_model_rope_scaling_frequencies": "learned absolute positions (BERT's), no RoPE",
    "test_model_rope_scaling_from_config": "learned absolute positions (BERT's), no RoPE",
    "test_model_rope_with_partial_rotation": "learned absolute positions (BERT's), no RoPE",
    "test_vision_axial_rope": "learned absolute positions (BERT's), no RoPE",
    "test_sliding_window_mask": "full bidirectional attention, no sliding window",
    "test_tp_plan_matches_params": "no tensor-parallel plan declared (`base_model_tp_plan`)",
    "test_resize_position_vector_embeddings": (
        "mixin default test_resize_position_embeddings=False: region_position_id indexes the position table"
    ),
    "test_inputs_embeds": "forward takes no `inputs_embeds`: text enters as ids, regions as features and boxes",
    "test_inputs_embeds_matches_input_ids": "forward takes no `inputs_embeds`: text enters as ids",
    # Needs hardware or a library the CI machine lacks (the mixin's `require_*` decorators); runs where present.
    "test_flash_attn_2_can_compile_with_attention_mask_None_without_graph_break": "needs flash-attn 2 on a GPU",
    "test_flash_attn_2_can_dispatch_composite_models": "needs flash-attn 2 on a GPU",
    "test_flash_attn_2_fp32_ln": "needs flash-attn 2 on a GPU",
    "test_flash_attn_2_from_config": "needs flash-attn 2 on a GPU",
    "test_flash_attn_2_inference_equivalence": "needs flash-attn 2 on a GPU",
    "test_flash_attn_2_inference_equivalence_right_padding": "needs flash-attn 2 on a GPU",
    "test_flash_attn_3_can_dispatch_composite_models": "needs flash-attn 3 on a GPU",
    "test_flash_attn_3_from_config": "needs flash-attn 3 on a GPU",
    "test_flash_attn_3_inference_equivalence": "needs flash-attn 3 on a GPU",
    "test_flash_attn_3_inference_equivalence_right_padding": "needs flash-attn 3 on a GPU",
    "test_flash_attn_4_can_dispatch_composite_models": "needs flash-attn 4 on a GPU",
    "test_flash_attn_4_from_config": "needs flash-attn 4 on a GPU",
    "test_flash_attn_4_inference_equivalence": "needs flash-attn 4 on a GPU",
    "test_flash_attn_4_inference_equivalence_right_padding": "needs flash-attn 4 on a GPU",
    "test_flash_attn_kernels_inference_equivalence": "needs the `kernels` library",
    "test_kernels_can_load_without_crashing": "needs the `kernels` library",
    "test_kernels_can_run_without_crashing_inference": "needs the `kernels` library and an accelerator",
    "test_kernels_can_run_without_crashing_training": "needs the `kernels` library and an accelerator",
    "test_flash_attn_kernels_mps_inference_equivalence": "needs an Apple MPS device",
    "test_can_load_with_device_context_manager": "needs an accelerator",
    "test_can_load_with_global_device_set": "needs an accelerator",
    "test_cpu_offload": "needs an accelerator",
    "test_disk_offload_bin": "needs an accelerator",
    "test_disk_offload_safetensors": "needs an accelerator",
    "test_flex_attention_with_grads": "needs an accelerator",
    "test_sdpa_can_compile_dynamic": "needs an accelerator",
    "test_sdpa_can_dispatch_on_flash": "needs an accelerator",
    "test_model_parallelism": "needs several accelerators",
    "test_resize_embeddings_untied_with_deepspeed": "needs deepspeed",
    "test_resize_embeddings_untied_with_deepspeed_multi_gpu": "needs deepspeed and several GPUs",
    "test_resize_tokens_embeddings_with_deepspeed": "needs deepspeed",
    "test_resize_tokens_embeddings_with_deepspeed_multi_gpu": "needs deepspeed and several GPUs",
    "test_torch_compile_for_training": "transformers marks it slow (RUN_SLOW=1): compiles the training step",
}


# Listed tests that appeared after the oldest transformers we support: absent from older releases' suites, where
# their listing is not stale.
ADDED_IN = {
    "test_kernels_can_run_without_crashing_inference": "5.25.0",
    "test_kernels_can_run_without_crashing_training": "5.25.0",
}


class UnreviewedCommonTestWarning(UserWarning):
    """A common test that this transformers release skips and `NOT_APPLICABLE` does not list (not the pinned
    release: reported, not failed)."""


def _pinned_transformers(constraints: Path) -> str | None:
    """The transformers version `constraints` pins (`transformers==X`), or None without the file or the line."""
    if not constraints.is_file():
        return None
    for line in constraints.read_text(encoding="utf-8").splitlines():
        name, _, pinned = line.split("#", 1)[0].strip().partition("==")
        if name.strip().lower() == "transformers" and pinned:
            return pinned.strip()
    return None


PINNED_TRANSFORMERS = _pinned_transformers(Path(__file__).resolve().parent.parent / "constraints.txt")
# Strict on the pinned release (or when nothing is pinned); reporting on any other.
REVIEWED = PINNED_TRANSFORMERS is None or PINNED_TRANSFORMERS == transformers.__version__
UNREVIEWED_REASON = (
    f"NOT REVIEWED: skipped by transformers {transformers.__version__}'s common suite and not in NOT_APPLICABLE "
    f"(reviewed release: {PINNED_TRANSFORMERS}); list it with its reason or make it run"
)


def _is_stale(name: str, present: set[str]) -> bool:
    """Whether listed test `name` is missing from this release's suite where it should be there."""
    if name in present:
        return False
    added = ADDED_IN.get(name)
    return added is None or _version_tuple(transformers.__version__) >= _version_tuple(added)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _documented_reason(test_name: str) -> str | None:
    """The reason `NOT_APPLICABLE` gives for `test_name`, or None. A parameterised test (`parameterized.expand`
    names them `<stem>_<index>_<parameters>`) is listed by its stem."""
    return NOT_APPLICABLE.get(test_name) or NOT_APPLICABLE.get(re.sub(r"_\d+(_.*)?$", "", test_name))


class ImageBertModelTester:
    """Builds the tiny config and the inputs `ModelTesterMixin` runs every common test on, in transformers'
    convention (`prepare_config_and_inputs_for_common()`): text of `text_length` tokens followed by
    `num_regions` detector regions, so the joint sequence is `seq_length` long."""

    def __init__(
        self,
        parent,
        batch_size=5,
        text_length=7,
        num_regions=8,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        visual_feature_dim=16,
        num_object_classes=7,
    ):
        self.parent = parent
        # The mixin's training tests run only when the tester says the models train.
        self.is_training = True
        self.batch_size = batch_size
        self.text_length = text_length
        self.num_regions = num_regions
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.visual_feature_dim = visual_feature_dim
        self.num_object_classes = num_object_classes
        # The mixin reads these for the shapes of attentions and hidden states: the joint text + region sequence.
        self.seq_length = text_length + num_regions
        self.encoder_seq_length = self.seq_length
        self.key_length = self.seq_length

    def get_config(self) -> ImageBertConfig:
        return ImageBertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            visual_feature_dim=self.visual_feature_dim,
            num_object_classes=self.num_object_classes,
            max_regions=self.num_regions,
            max_text_length=self.text_length,
            max_position_embeddings=32,
            region_position_id=31,
        )

    def prepare_config_and_inputs(self) -> tuple[ImageBertConfig, dict[str, torch.Tensor]]:
        """The config and the model inputs: `input_ids`, `attention_mask`, `token_type_ids` (B, T);
        `region_features` (B, R, F); `region_locations` (B, R, 5), valid boxes in [0, 1]; `region_attention_mask`
        (B, R)."""
        B, T, R = self.batch_size, self.text_length, self.num_regions
        corners = floats_tensor([B, R, 4])
        x1, x2 = corners[..., 0].minimum(corners[..., 2]), corners[..., 0].maximum(corners[..., 2])
        y1, y2 = corners[..., 1].minimum(corners[..., 3]), corners[..., 1].maximum(corners[..., 3])
        inputs = {
            "input_ids": ids_tensor([B, T], self.vocab_size),
            "attention_mask": random_attention_mask([B, T]),
            "token_type_ids": torch.zeros(B, T, dtype=torch.long),
            "region_features": floats_tensor([B, R, self.visual_feature_dim]),
            "region_locations": torch.stack([x1, y1, x2, y2, (x2 - x1) * (y2 - y1)], dim=-1),
            "region_attention_mask": random_attention_mask([B, R]),
        }
        return self.get_config(), inputs

    def prepare_config_and_inputs_for_common(self) -> tuple[ImageBertConfig, dict[str, torch.Tensor]]:
        return self.prepare_config_and_inputs()

    def labels_for(self, model_class, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Labels that make `model_class` return a loss: every pre-training task for `ImageBertForPreTraining`,
        matched (1) / mismatched (0) pairs for `ImageBertForRetrieval`; none for the encoder. The same for the same
        inputs."""
        B, T, R = self.batch_size, self.text_length, self.num_regions
        if model_class is ImageBertForPreTraining:
            text_masked = torch.zeros(B, T, dtype=torch.bool)
            text_masked[:, 1] = True
            masked_regions = torch.zeros(B, R, dtype=torch.bool)
            masked_regions[:, 0] = True
            # Deterministic, as the mixin builds the inputs twice and compares the two outputs.
            classes = torch.arange(B * R).view(B, R) % self.num_object_classes
            return {
                "labels": torch.where(text_masked, inputs["input_ids"], -100),
                "masked_regions": masked_regions,
                "region_class_labels": torch.where(masked_regions, classes, -100),
                "region_feature_targets": inputs["region_features"].clone(),
                "itm_labels": torch.arange(B) % 2,
            }
        if model_class is ImageBertForRetrieval:
            return {"labels": (torch.arange(B) % 2).float()}
        return {}


class ImageBertModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (ImageBertModel, ImageBertForPreTraining, ImageBertForRetrieval)
    # The mixin runs this check only on models it dates 2023 or later (by a copyright line we do not have); ours is
    # new, and its `_init_weights` must cover every weight.
    test_can_init_all_missing_weights_before_2023 = True

    # The mixin reads the batch size of image features from pixel inputs; ours are regions (the shapes are checked in
    # tests/test_two_stage.py).
    skip_test_image_features_output_shape = True

    def _text_features_prepare_config_and_inputs(self):
        # The mixin reads `config.text_config.hidden_size` (composite configs); ours is one config for both.
        config, inputs = super()._text_features_prepare_config_and_inputs()
        config.text_config = types.SimpleNamespace(hidden_size=config.hidden_size)
        return config, inputs

    def _image_features_prepare_config_and_inputs(self):
        # The mixin picks image inputs by name ("pixel" / "image" in the key); ours are regions.
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        names = ("region_features", "region_locations", "region_attention_mask", "global_image_features")
        return config, {key: value for key, value in inputs.items() if key in names}

    def setUp(self):
        self.model_tester = ImageBertModelTester(self)
        # The mixin tells base models from heads by transformers' auto mapping, where a model inside transformers is
        # listed (a base model has no loss to train, and some tests run on base models only). List ours there, in the
        # mixin module's view only.
        base_models = {
            **_modeling_common.MODEL_MAPPING_NAMES,
            ImageBertConfig.model_type: ImageBertModel.__name__,
        }
        patcher = mock.patch.object(_modeling_common, "MODEL_MAPPING_NAMES", base_models)
        patcher.start()
        self.addCleanup(patcher.stop)
        # As transformers' BERT test: hidden_size 37 with the default 12 heads (only a model refuses that).
        self.config_tester = ConfigTester(self, config_class=ImageBertConfig, hidden_size=37)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            inputs_dict.update(self.model_tester.labels_for(model_class, inputs_dict))
        return inputs_dict

    def skipTest(self, reason):
        documented = _documented_reason(self._testMethodName)
        if documented is None and not REVIEWED:
            warnings.warn(UnreviewedCommonTestWarning(f"{self._testMethodName}: {reason}"), stacklevel=2)
            super().skipTest(f"{UNREVIEWED_REASON} [transformers: {reason}]")
        if documented is None:
            self.fail(
                f"{self._testMethodName}: the common suite skips it ({reason}) and NOT_APPLICABLE does not say why; "
                "make it run, or add a one-line reason"
            )
        super().skipTest(f"{documented} [transformers: {reason}]")

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_every_skip_of_the_common_suite_is_documented(self):
        decorated = [
            name
            for name in dir(self)
            if name.startswith("test_") and getattr(getattr(self, name), "__unittest_skip__", False)
        ]
        undocumented = [name for name in decorated if _documented_reason(name) is None]
        # A listed name that no longer names a common test is stale (renamed or removed upstream).
        names = {name for name in dir(self) if name.startswith("test_")}
        names |= {re.sub(r"_\d+(_.*)?$", "", name) for name in names}
        stale = [name for name in NOT_APPLICABLE if _is_stale(name, names)]
        if not REVIEWED:
            for name in undocumented:
                warnings.warn(UnreviewedCommonTestWarning(f"{name}: skipped by a decorator"), stacklevel=2)
            for name in stale:
                warnings.warn(
                    UnreviewedCommonTestWarning(f"{name}: listed, not in this release"), stacklevel=2
                )
            return
        self.assertEqual(undocumented, [])
        self.assertEqual(stale, [])


# Tests the mixin skips by a decorator (`require_*`, `slow`) report this file's reason too. `hub_retry` gave each
# test of this class its own wrapper (see `ModelTesterMixin.__init_subclass__`), so the mixin itself is untouched.
for _name in dir(ImageBertModelTest):
    _test = getattr(ImageBertModelTest, _name)
    if _name.startswith("test_") and getattr(_test, "__unittest_skip__", False):
        _reason = _documented_reason(_name) or (None if REVIEWED else UNREVIEWED_REASON)
        if _reason:
            _test.__unittest_skip_why__ = f"{_reason} [transformers: {_test.__unittest_skip_why__}]"


# UNITER's region embedding (`region_embedding_type="uniter"`: two more LayerNorms, no region position, for converted
# UNITER / VILLA weights) through the common tests that touch the embeddings' weights and outputs: their
# initialisation, saving and loading, training, padding and batching. The rest of the suite (attention backends,
# resizing, dtypes) does not depend on the region embedding and runs once, above.
UNITER_VARIANT_TESTS = (
    "test_all_tensors_are_parameter_or_buffer",
    "test_attention_outputs",
    "test_base_model_prefix_loads_base_weights",
    "test_batching_equivalence",
    "test_can_be_initialized_on_meta",
    "test_can_init_all_missing_weights",
    "test_can_use_safetensors",
    "test_correct_missing_keys",
    "test_determinism",
    "test_get_image_features_output",
    "test_hidden_states_output",
    "test_init_weights_can_init_buffers",
    "test_load_save_without_tied_weights",
    "test_model_is_small",
    "test_model_weights_reload_no_missing_tied_weights",
    "test_save_load",
    "test_sdpa_can_dispatch_non_composite_models",
    "test_torch_save_load",
    "test_training",
    "test_training_gradient_checkpointing",
)


class ImageBertUniterRegionsModelTester(ImageBertModelTester):
    def get_config(self) -> ImageBertConfig:
        config = super().get_config()
        config.region_embedding_type = "uniter"
        return config


class ImageBertUniterRegionsModelTest(ImageBertModelTest):
    """`ImageBertModelTest` on `region_embedding_type="uniter"`, for the tests of `UNITER_VARIANT_TESTS`."""

    def setUp(self):
        super().setUp()
        self.model_tester = ImageBertUniterRegionsModelTester(self)

    def test_the_variant_is_under_test(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        self.assertEqual(config.region_embedding_type, "uniter")
        self.assertIn("embeddings.region_feature_LayerNorm.weight", ImageBertModel(config).state_dict())


# Every other test is left out of the variant's class (unittest collects only callable `test_*` attributes).
for _name in dir(ImageBertUniterRegionsModelTest):
    if (
        _name.startswith("test_")
        and callable(getattr(ImageBertUniterRegionsModelTest, _name))  # not the flags (`test_missing_keys`)
        and _name != "test_the_variant_is_under_test"
        and re.sub(r"_\d+(_.*)?$", "", _name) not in UNITER_VARIANT_TESTS
        and _name not in UNITER_VARIANT_TESTS
    ):
        setattr(ImageBertUniterRegionsModelTest, _name, None)


def test_an_unlisted_skip_fails_on_the_pinned_release_and_is_reported_on_another(monkeypatch):
    case = ImageBertModelTest("test_config")  # listed nowhere in NOT_APPLICABLE
    monkeypatch.setattr(sys.modules[__name__], "REVIEWED", True)
    with pytest.raises(AssertionError, match="NOT_APPLICABLE does not say why"):
        case.skipTest("a reason a newer release adds")
    monkeypatch.setattr(sys.modules[__name__], "REVIEWED", False)
    with (
        pytest.warns(UnreviewedCommonTestWarning, match="test_config: a reason a newer release adds"),
        pytest.raises(unittest.SkipTest, match="NOT REVIEWED"),
    ):
        case.skipTest("a reason a newer release adds")


def test_the_pinned_release_is_read_from_the_constraints_file(tmp_path):
    constraints = tmp_path / "constraints.txt"
    assert _pinned_transformers(constraints) is None
    constraints.write_text("# tested\ntorch==2.14.1\nTransformers==5.25.0  # the reviewed suite\n")
    assert _pinned_transformers(constraints) == "5.25.0"
    # A test added by a later release is stale on it only once that release is installed.
    assert _is_stale("test_gone_upstream", set())
    assert _is_stale("test_kernels_can_run_without_crashing_inference", set()) == (
        _version_tuple(transformers.__version__) >= (5, 25, 0)
    )
