"""The retriever's stage-1 index: the nearest image embeddings of each query embedding, exact or approximate.

`VectorIndex.build(embeddings, index_type=...)` holds L2-normalised image embeddings [I, D] and answers
`search(queries, k)` with the ids and cosine similarities of the k most similar images per query, best first:

| index_type | faiss index | results |
|---|---|---|
| "exact" | `IndexFlatIP` (or, without faiss, a torch matrix product: the brute force of earlier versions) | exact |
| "ivf" | `IndexIVFFlat`: `nlist` k-means cells, `nprobe` of them scanned per query (an HNSW coarse quantizer from `HNSW_QUANTIZER_NLIST` cells) | approximate |
| "hnsw" | `IndexHNSWFlat`: a graph of `hnsw_m` links per vector, `ef_search` candidates per query | approximate |
| "auto" (default) | "exact" up to `exact_limit` images (`EXACT_LIMIT`, 1,000,000), beyond it autofaiss's choice when autofaiss is installed, else "ivf" | exact up to the limit |

faiss (`pip install faiss-cpu`) is optional: without it "exact" (and "auto" within the limit) is the torch brute
force, and an approximate index refuses with a one-line error. With faiss GPUs and a CUDA device the flat and IVF
indexes run on the GPU (HNSW has no GPU version and stays on the CPU).

Exact results do not depend on the backend. faiss and torch compute float32 inner products in different orders
(and torch's own result for one query changes in the last bits with the other queries of the batch), so neither
one's values are used as they are: the backend proposes a shortlist (k plus a margin), the similarities of the
shortlisted pairs are recomputed by `exact_similarity` (float64 products, which are exact, summed in one fixed
order: a function of the two vectors alone), and the shortlist is sorted by that value, ties by image position.
The shortlist is widened until its k-th value provably beats every image outside it (the float32 rounding error
of a D-term inner product of unit vectors is below `float32_dot_error(D)`), so an exact search returns the same
ids, order and similarities through faiss, on a GPU or through torch.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

INDEX_TYPES = ("exact", "ivf", "hnsw", "auto")
# What an index actually is once "auto" is resolved (recorded in saved indexes).
INDEX_KINDS = ("exact", "ivf", "hnsw", "autofaiss")
# "auto" stays exact up to this many images: a flat scan of 1M x 256 float32 (1 GB) answers a query in tens of
# milliseconds on two CPU cores (benchmarks/bench_index.py), and exact results need no tuning.
EXACT_LIMIT = 1_000_000
# From this many IVF cells on, the coarse quantizer (query -> nearest cells, vector -> its cell) is an HNSW graph
# instead of a flat scan of the centroids, as faiss's guidelines advise for 1M-10M vectors ("IVF65536_HNSW32").
HNSW_QUANTIZER_NLIST = 4096
_SHORTLIST_MARGIN = 16  # extra candidates asked of the backend per query, beyond k
_GPU_MAX_K = 2048  # faiss's GPU indexes return at most this many results per query (wider: the torch scan)
_FAISS_HINT = "pip install faiss-cpu"


@dataclass(frozen=True)
class IndexOptions:
    """The tunable parameters of the approximate indexes (None: chosen from the collection size when built).

    Build time (fixed once built; a saved index records them):
        exact_limit: "auto" builds an exact index up to this many images.
        nlist: IVF cells; default the power of two nearest 4 * sqrt(I), at most I / 39 (faiss wants >= 39
            training vectors per cell).
        train_size: vectors the IVF k-means trains on; default min(I, 40 * nlist).
        kmeans_iterations: k-means iterations (10: the cells' quality barely changes after that).
        hnsw_m: HNSW links per vector (32).
        ef_construction: HNSW candidates kept while linking a vector (80; faiss's 40 loses recall on clustered
            data: benchmarks/bench_index.py).
        seed: k-means seed.
    Search time (a loaded index takes the loading retriever's values when they are given):
        nprobe: IVF cells scanned per query; default max(32, nlist / 64): recall@10 0.978 at 14.7x the exact
            index's queries/s on 1M clustered 256-d embeddings (nlist 4096), 0.951 on 100k (benchmarks/bench_index.py).
        ef_search: HNSW candidates kept per query (128).
        use_gpu: None: a GPU index when faiss has GPUs and the retriever's device is CUDA.
    """

    exact_limit: int = EXACT_LIMIT
    nlist: int | None = None
    train_size: int | None = None
    kmeans_iterations: int = 10
    hnsw_m: int = 32
    ef_construction: int = 80
    seed: int = 1234
    nprobe: int | None = None
    ef_search: int = 128
    use_gpu: bool | None = None

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> IndexOptions:
        """Options from a dict (None: the defaults); an unknown name or a bad value is refused in one line."""
        options = dict(options or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"index_options: unknown option(s) {unknown}; known: {known}")
        for name, value in options.items():
            if name == "use_gpu":
                if value is not None and not isinstance(value, bool):
                    raise ValueError(f"index_options: use_gpu must be True, False or None, got {value!r}")
            elif value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"index_options: {name} must be an int >= 1, got {value!r}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolved(self, num_vectors: int) -> IndexOptions:
        """These options with the size-dependent defaults filled in for `num_vectors` vectors."""
        nlist = self.nlist
        if nlist is None:
            nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(num_vectors))))
            nlist = max(1, min(nlist, num_vectors // 39))
        nlist = min(nlist, num_vectors)
        train_size = min(num_vectors, self.train_size or 40 * nlist)
        nprobe = self.nprobe if self.nprobe is not None else max(32, nlist // 64)
        return IndexOptions(
            **{**self.to_dict(), "nlist": nlist, "train_size": train_size, "nprobe": min(nprobe, nlist)}
        )


def import_faiss(required_for: str | None = None):
    """The faiss module, or None when it is not installed; with `required_for`, an ImportError in one line instead
    of None."""
    try:
        return importlib.import_module("faiss")
    except ImportError:
        if required_for is None:
            return None
        raise ImportError(f"{required_for} needs faiss: {_FAISS_HINT}") from None


def _import_autofaiss():
    try:
        return importlib.import_module("autofaiss")
    except ImportError:
        return None


def resolve_kind(index_type: str, num_vectors: int, options: IndexOptions) -> str:
    """What `index_type` builds for `num_vectors` vectors: "exact", "ivf", "hnsw" or "autofaiss"."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
    if index_type != "auto":
        return index_type
    if num_vectors <= options.exact_limit:
        return "exact"
    if import_faiss() is None:
        warnings.warn(
            f"{num_vectors} images exceed exact_limit={options.exact_limit}, but faiss is not installed: "
            f"searching them exactly by brute force ({_FAISS_HINT} for an approximate index)",
            stacklevel=3,
        )
        return "exact"
    return "autofaiss" if _import_autofaiss() is not None else "ivf"


def float32_dot_error(dim: int) -> float:
    """A bound on |float32 inner product - exact inner product| for two vectors of norm <= 1 and `dim` terms,
    whatever the summation order (the classic gamma_n bound), doubled for safety."""
    unit = 2.0**-24
    return 2.0 * dim * unit / (1.0 - dim * unit)


def exact_similarity(queries: torch.Tensor, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Inner products of each query with the embeddings it shortlisted, as a function of the two vectors alone.

    float32 x float32 products are exact in float64; they are summed by a fixed pairwise tree of elementwise
    additions (never a BLAS reduction, whose order depends on the shapes, the thread count and the device), so
    the result does not depend on which other queries or images are computed with it.

    Args:
        queries: float32 [Q, D].
        embeddings: float32 [I, D].
        ids: long [Q, S], rows of `embeddings`; -1 (faiss's "no result") gives -inf.

    Returns:
        float64 [Q, S].
    """
    out = torch.empty(ids.shape, dtype=torch.float64)
    if ids.numel() == 0:
        return out
    dim = queries.shape[1]
    rows_per_chunk = max(
        1, (1 << 23) // max(1, ids.shape[1] * dim)
    )  # (rows, S, D) float64 chunks of <= 64 MB
    for start in range(0, ids.shape[0], rows_per_chunk):
        chunk = ids[start : start + rows_per_chunk]  # (q, S)
        terms = (
            queries[start : start + rows_per_chunk, None, :].double()
            * embeddings[chunk.clamp(min=0)].double()
        )
        while terms.shape[-1] > 1:  # (q, S, D) -> (q, S, ceil(D / 2)) -> ... -> (q, S, 1)
            half = terms.shape[-1] // 2
            paired = terms[..., :half] + terms[..., half : 2 * half]
            terms = torch.cat([paired, terms[..., 2 * half :]], dim=-1) if terms.shape[-1] % 2 else paired
        out[start : start + rows_per_chunk] = terms.squeeze(-1).masked_fill(chunk < 0, -math.inf)
    return out


def _rank(ids: torch.Tensor, similarity: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k best (id, similarity) pairs: similarity descending, ties by id ascending."""
    by_id = ids.masked_fill(ids < 0, torch.iinfo(torch.long).max).argsort(dim=1, stable=True)
    ids, similarity = ids.gather(1, by_id), similarity.gather(1, by_id)
    order = similarity.argsort(dim=1, descending=True, stable=True)[:, :k]
    return ids.gather(1, order), similarity.gather(1, order)


class VectorIndex:
    """Image embeddings and the structure that searches them (see the module docstring).

    Attributes:
        kind: "exact", "ivf", "hnsw" or "autofaiss".
        embeddings: float32 [I, D] on the CPU (the shortlists are re-scored from them).
        options: the `IndexOptions`, size-dependent values filled in.
        faiss_index: the faiss index, or None for the torch brute force.
    """

    def __init__(self, kind: str, embeddings: torch.Tensor, options: IndexOptions, faiss_index=None):
        self.kind = kind
        self.embeddings = embeddings
        self.options = options
        self.faiss_index = faiss_index
        self._norm_bound = float(embeddings.norm(dim=1).max()) if embeddings.numel() else 1.0

    @property
    def size(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def on_gpu(self) -> bool:
        return self.faiss_index is not None and type(self.faiss_index).__name__.startswith("Gpu")

    # ------------------------------------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        embeddings: torch.Tensor,
        index_type: str = "auto",
        options: IndexOptions | Mapping[str, Any] | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> VectorIndex:
        """Index `embeddings` (float32 [I, D], L2-normalised).

        Args:
            embeddings: the image embeddings, row i = image i.
            index_type: "exact", "ivf", "hnsw" or "auto" (see the module docstring).
            options: `IndexOptions` or a dict of them.
            device: the retriever's device; a CUDA device puts the faiss index on a GPU when faiss has GPUs.

        Returns:
            The index.
        """
        options = options if isinstance(options, IndexOptions) else IndexOptions.from_mapping(options)
        embeddings = embeddings.detach().to("cpu", torch.float32).contiguous()
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"expected embeddings [I, D] with I >= 1, got shape {tuple(embeddings.shape)}")
        size, dim = embeddings.shape
        kind = resolve_kind(index_type, size, options)
        options = options.resolved(size)
        if kind == "exact":
            faiss = import_faiss()
            if faiss is None:
                return cls(kind, embeddings, options)
            index = faiss.IndexFlatIP(dim)
            index.add(embeddings.numpy())
        elif kind == "autofaiss":
            index = cls._build_autofaiss(embeddings)
        else:
            faiss = import_faiss(required_for=f"index_type={kind!r}")
            index = cls._build_approximate(faiss, kind, embeddings, options)
        built = cls(kind, embeddings, options, index)
        built._place(device)
        built.set_search_options(options)
        return built

    @staticmethod
    def _build_approximate(faiss, kind: str, embeddings: torch.Tensor, options: IndexOptions):
        size, dim = embeddings.shape
        vectors = embeddings.numpy()
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = options.ef_construction
            index.add(vectors)
            return index
        if options.nlist >= HNSW_QUANTIZER_NLIST:
            quantizer = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        else:
            quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, options.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = options.kmeans_iterations
        index.cp.seed = options.seed
        index.cp.min_points_per_centroid = (
            1  # a small collection still trains (quality is the caller's choice)
        )
        sample = np.random.default_rng(options.seed).choice(size, options.train_size, replace=False)
        index.train(vectors[np.sort(sample)])
        index.add(vectors)  # faiss's Python constructor keeps `quantizer` alive beside the index
        return index

    @staticmethod
    def _build_autofaiss(embeddings: torch.Tensor):
        autofaiss = _import_autofaiss()
        index, _ = autofaiss.build_index(
            embeddings.numpy(),
            save_on_disk=False,
            metric_type="ip",
            should_be_memory_mappable=False,
            verbose=30,  # logging.WARNING
        )
        if index is None:  # autofaiss logs why (memory bounds) and returns (None, None)
            raise RuntimeError(
                "autofaiss could not build an index (see its log); pass index_type='ivf' or 'hnsw'"
            )
        return index

    def _place(self, device: torch.device | str | None) -> None:
        """Move the faiss index to a GPU when asked (use_gpu) or when faiss has GPUs and `device` is CUDA."""
        if self.faiss_index is None or self.kind == "hnsw":
            return
        faiss = import_faiss()
        has_gpus = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        wanted = self.options.use_gpu
        device = torch.device(device) if device is not None else None
        if wanted is None:
            wanted = has_gpus and device is not None and device.type == "cuda"
        if not wanted:
            return
        if not has_gpus:
            raise RuntimeError(
                "index_options use_gpu=True, but faiss sees no GPU (faiss-gpu builds have them)"
            )
        gpu = device.index if device is not None and device.type == "cuda" and device.index is not None else 0
        self._gpu_resources = faiss.StandardGpuResources()
        self.faiss_index = faiss.index_cpu_to_gpu(self._gpu_resources, gpu, self.faiss_index)

    def set_search_options(self, options: IndexOptions) -> None:
        """Apply the search-time options (nprobe, ef_search) to the faiss index."""
        self.options = IndexOptions(
            **{**self.options.to_dict(), **{name: getattr(options, name) for name in ("nprobe", "ef_search")}}
        )
        if self.faiss_index is None or self.kind in ("exact", "autofaiss"):
            return
        faiss = import_faiss()
        space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        if self.kind == "ivf":
            space.set_index_parameter(self.faiss_index, "nprobe", int(self.options.nprobe))
            if self.options.nlist >= HNSW_QUANTIZER_NLIST and not self.on_gpu:
                space.set_index_parameter(
                    self.faiss_index, "quantizer_efSearch", max(64, self.options.nprobe)
                )
        else:
            space.set_index_parameter(self.faiss_index, "efSearch", int(self.options.ef_search))

    # ------------------------------------------------------------------------------------------------ search

    def _shortlist(self, queries: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The backend's `width` best (ids long [Q, width], float32 similarities [Q, width]) per query."""
        if self.faiss_index is not None and not (self.on_gpu and width > _GPU_MAX_K):
            values, ids = self.faiss_index.search(np.ascontiguousarray(queries.numpy()), width)
            return torch.from_numpy(ids).long(), torch.from_numpy(values)
        ids, values = [], []
        rows = max(1, (1 << 25) // self.size)  # (rows, I) float32 similarity blocks of <= 128 MB
        for start in range(0, queries.shape[0], rows):
            top = (queries[start : start + rows] @ self.embeddings.t()).topk(width, dim=1)  # (rows, width)
            ids.append(top.indices)
            values.append(top.values)
        return torch.cat(ids), torch.cat(values)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most similar images of each query, best first (ties: the image indexed first).

        Args:
            queries: float32 [Q, D] query embeddings (L2-normalised).
            k: results per query (clipped to the index size).

        Returns:
            ids long [Q, k'] (rows of `embeddings`; -1 where an approximate index found fewer than k) and cosine
            similarities float64 [Q, k'] (`exact_similarity`), k' = min(k, I).
        """
        queries = queries.detach().to("cpu", torch.float32).contiguous()
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"expected query embeddings [Q, {self.dim}], got shape {tuple(queries.shape)}")
        k = min(int(k), self.size)
        out_ids = torch.full((queries.shape[0], k), -1, dtype=torch.long)
        out_similarity = torch.full((queries.shape[0], k), -math.inf, dtype=torch.float64)
        pending = torch.arange(queries.shape[0])
        width = min(self.size, k + max(k, _SHORTLIST_MARGIN))
        error = float32_dot_error(self.dim) * self._norm_bound
        while pending.numel():
            rows = queries[pending]
            ids, values = self._shortlist(rows, width)
            best_ids, best_similarity = _rank(ids, exact_similarity(rows, self.embeddings, ids), k)
            out_ids[pending], out_similarity[pending] = best_ids, best_similarity
            if self.kind != "exact" or width == self.size:
                break
            # Every image outside the shortlist has a backend value <= the shortlist's last one, so an exact
            # similarity <= that value + the rounding bound: the k-th result is proven when it is above that.
            bound = values[:, -1].double() + error * rows.norm(dim=1).double()
            pending = pending[~(best_similarity[:, -1] > bound)]
            width = min(self.size, width * 4)
        return out_ids, out_similarity

    # ------------------------------------------------------------------------------------------------ saving

    def serialize(self) -> bytes | None:
        """faiss's own bytes of an approximate index (None for an exact one: it is rebuilt from the embeddings)."""
        if self.faiss_index is None or self.kind == "exact":
            return None
        faiss = import_faiss()
        index = faiss.index_gpu_to_cpu(self.faiss_index) if self.on_gpu else self.faiss_index
        return faiss.serialize_index(index).tobytes()

    @classmethod
    def restore(
        cls,
        kind: str,
        embeddings: torch.Tensor,
        options: IndexOptions,
        data: bytes | None,
        *,
        device: torch.device | str | None = None,
    ) -> VectorIndex:
        """The index `serialize` wrote (an exact one rebuilt from `embeddings`), with `options`' search values."""
        if kind == "exact":
            restored = cls.build(embeddings, "exact", options, device=device)
            restored.options = options
            return restored
        faiss = import_faiss(required_for=f"a saved {kind!r} index")
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8).copy())
        if index.ntotal != embeddings.shape[0] or index.d != embeddings.shape[1]:
            raise ValueError(
                f"the saved faiss index holds {index.ntotal} x {index.d} vectors, the embeddings "
                f"{tuple(embeddings.shape)}"
            )
        restored = cls(kind, embeddings.contiguous(), options, index)
        restored._place(device)
        restored.set_search_options(options)
        return restored


__all__ = [
    "EXACT_LIMIT",
    "HNSW_QUANTIZER_NLIST",
    "INDEX_KINDS",
    "INDEX_TYPES",
    "IndexOptions",
    "VectorIndex",
    "exact_similarity",
    "float32_dot_error",
    "import_faiss",
    "resolve_kind",
]
