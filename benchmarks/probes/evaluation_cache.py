"""Probes of the retrieval evaluation's score cache: damaged, stale or foreign cache files and a killed writer's
leftovers."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path

from .harness import ROOT, Probes


def probe_evaluation_cache(p: Probes, processor, work: Path) -> None:
    import torch

    from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining
    from modeling_imagebert.data.toy_world import make_toy_world
    from modeling_imagebert.retrieval.evaluation import evaluate_retrieval

    p.entry = "evaluation cache"
    config = ImageBertConfig.from_json_file(str(ROOT / "configuration" / "models" / "imagebert-tiny.json"))
    torch.manual_seed(0)
    model = ImageBertForPreTraining(config)
    split = make_toy_world("retrieval", num_images=1, num_validation_images=1, num_test_images=4, seed=0,
                           feature_dim=config.visual_feature_dim, num_classes=config.num_object_classes - 1)["test"]  # fmt: skip

    def evaluate(cache: Path):
        return evaluate_retrieval(model, split, processor, shard_size=5, cache_dir=cache, progress=False)

    straight = evaluate(work / "cache-straight").scores

    def damaged(name: str, damage: Callable[[Path], None]) -> None:
        cache = work / f"cache-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
        evaluate(cache)
        damage(next(cache.glob("scores-*/shard-000000.pt")))
        p.result(
            name,
            lambda: evaluate(cache),
            lambda r: r.computed_shards == [0] and torch.equal(r.scores, straight),
        )

    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        start = bytes(data).find(torch.load(path, weights_only=True)["scores"].numpy().tobytes())
        data[start + 1] ^= 0x04
        path.write_bytes(bytes(data))

    def nan_with_manifest(path: Path) -> None:
        payload = torch.load(path, weights_only=True)
        payload["scores"][0, 0] = float("inf")
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        path.write_bytes(buffer.getvalue())
        entry = {
            "file": path.name,
            "size": len(buffer.getvalue()),
            "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
        }
        path.with_suffix(".json").write_text(json.dumps(entry))

    def other_rows(path: Path) -> None:
        payload = torch.load(path, weights_only=True)
        payload["rows"] = [5, 10]
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        path.write_bytes(buffer.getvalue())
        entry = {
            "file": path.name,
            "size": len(buffer.getvalue()),
            "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
        }
        path.with_suffix(".json").write_text(json.dumps(entry))

    damaged("one flipped bit in a shard", flip)
    damaged("truncated shard", lambda path: path.write_bytes(path.read_bytes()[:-50]))
    damaged("shard replaced by garbage", lambda path: path.write_bytes(b"garbage"))
    damaged("manifest entry missing", lambda path: path.with_suffix(".json").unlink())
    damaged("manifest entry not JSON", lambda path: path.with_suffix(".json").write_text("{"))
    damaged("non-finite score with a matching manifest", nan_with_manifest)
    damaged("shard holding other rows", other_rows)
