"""Title clusters: niches discovered from what videos are about, not only from their category.

Titles are embedded with all-MiniLM-L6-v2 (sentence-transformers' recipe: mean of the last
hidden states over the real tokens, then L2 normalisation), grouped with k-means, and each
cluster is named after its most distinctive words (class-based TF-IDF), e.g.
`topic-trailer-official-movie`, a name usable in a registered model name and a URL.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.feature_extraction.text import CountVectorizer
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from training.quality.classifier import base_model_path
from training.quality.config import PACKAGED_MINILM

EMBEDDING_DIM = 384
"""Width of all-MiniLM-L6-v2's sentence vectors."""

MAX_TOKENS = 48
"""Tokens kept per title. On the trending data (3,275 distinct titles) the median title is 13
tokens, the 99th percentile 29 and the longest 77; 48 cuts 3 titles (0.1 %) and only their
tails, while the model's own limit (256) would just allow longer padding."""

NAME_WORDS = 3
"""Distinctive words in a cluster's name."""

KMEANS_RESTARTS = 4
"""k-means initialisations; the best (lowest inertia) is kept. On the trending titles (k 8 to
16, seeds 0 and 1) one start was up to 0.3 % worse in inertia than 4, and 10 gained under
0.1 % over 4."""

_TOKEN = r"\b(?=[a-z0-9]*[a-z])[a-z0-9]{2,}\b"
"""Name words: ascii (accents stripped first), 2+ characters, at least one letter, so pure
numbers ("2018") and single letters never name a cluster and every name is a valid slug."""


@dataclass(frozen=True, eq=False)
class TitleClusters:
    """Fitted title clusters; `assign_clusters` puts new titles in them."""

    centroids: np.ndarray
    """(n_clusters, EMBEDDING_DIM) float32 unit vectors; nearest by cosine is the cluster."""
    names: tuple[str, ...]
    """One unique `topic-word-word-word` name per cluster (characters `[a-z0-9-]`)."""
    sizes: tuple[int, ...]
    """Titles of the fitting data in each cluster, duplicates included: rows, as niches count."""

    def __post_init__(self) -> None:
        centroids = np.array(self.centroids, dtype=np.float32)  # a copy the caller cannot change
        if centroids.ndim != 2 or centroids.shape[1] != EMBEDDING_DIM:
            raise ValueError(f"centroids must be (n, {EMBEDDING_DIM}), got {centroids.shape}")
        if not len(self.names) == len(self.sizes) == len(centroids):
            raise ValueError(
                f"{len(centroids)} centroids, {len(self.names)} names, {len(self.sizes)} sizes"
            )
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"cluster names must be unique, got {self.names}")
        centroids.setflags(write=False)
        object.__setattr__(self, "centroids", centroids)


@functools.lru_cache(maxsize=1)
def _encoder() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loaded once per process: reading the weights takes longer than embedding a batch."""
    path = base_model_path(PACKAGED_MINILM)
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


_EMBEDDED: dict[str, np.ndarray] = {}
"""Each title's vector, computed once per process: training embeds the training titles to fit
the topics, then every title to assign it one. Only training embeds titles, and only those of
its data, so this holds a few thousand vectors (1.5 kB each)."""


def embed_titles(titles: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """(len(titles), EMBEDDING_DIM) float32 unit vectors, one per title.

    Each distinct title is encoded once per process (a video trending in both countries
    repeats its title) and batches hold titles of similar length, so little time goes to
    padding. With 2 threads, 32 per batch embedded the 3,275 distinct trending titles fastest
    (7.0 s, about 470 titles/s; 64: 7.6 s, 16: 8.0 s).
    """
    missing = sorted((t for t in dict.fromkeys(titles) if t not in _EMBEDDED), key=len)
    if missing:
        model, tokenizer = _encoder()
        with torch.inference_mode():
            for start in range(0, len(missing), batch_size):
                batch_titles = missing[start : start + batch_size]
                batch = tokenizer(
                    batch_titles,
                    padding=True,
                    truncation=True,
                    max_length=MAX_TOKENS,
                    return_tensors="pt",
                )
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                vectors = F.normalize(mean, p=2, dim=1).numpy()
                _EMBEDDED.update(zip(batch_titles, vectors, strict=True))
    if not titles:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    return np.stack([_EMBEDDED[title] for title in titles])


def fit_title_clusters(titles: Sequence[str], n_clusters: int, seed: int = 0) -> TitleClusters:
    """k-means with `n_clusters` clusters over the distinct titles, named by their words.

    Distinct titles, sorted, are clustered, so a title counts once however many rows repeat
    it and the result does not depend on row order; `sizes` counts every row. On unit vectors
    euclidean k-means ranks like cosine; centroids are re-normalised and every title is then
    assigned by cosine, exactly as `assign_clusters` does for new titles.
    """
    distinct = sorted(set(titles))
    if n_clusters < 2:
        raise ValueError(f"n_clusters must be at least 2, got {n_clusters}")
    if n_clusters > len(distinct):
        raise ValueError(
            f"n_clusters ({n_clusters}) is more than the number of distinct titles "
            f"({len(distinct)})"
        )
    vectors = embed_titles(distinct)
    kmeans = KMeans(n_clusters=n_clusters, n_init=KMEANS_RESTARTS, random_state=seed)
    kmeans.fit(vectors)
    centroids = F.normalize(torch.from_numpy(kmeans.cluster_centers_), dim=1).numpy()
    labels = _nearest(centroids, vectors)
    position = {title: i for i, title in enumerate(distinct)}
    rows = np.bincount(labels[[position[title] for title in titles]], minlength=n_clusters)
    return TitleClusters(
        centroids=centroids,
        names=_names(distinct, labels, n_clusters),
        sizes=tuple(int(n) for n in rows),
    )


def assign_clusters(clusters: TitleClusters, titles: Sequence[str]) -> list[str]:
    """The name of each title's cluster: the centroid nearest by cosine."""
    labels = _nearest(clusters.centroids, embed_titles(titles))
    return [clusters.names[label] for label in labels]


def _nearest(centroids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    # Both sides are unit vectors, so the dot product is the cosine.
    return np.argmax(vectors @ centroids.T, axis=1)


def _names(titles: list[str], labels: np.ndarray, n_clusters: int) -> tuple[str, ...]:
    """`topic-` and each cluster's top words by class-based TF-IDF (BERTopic's c-TF-IDF).

    A cluster's titles are one document; a word scores its share of the cluster's words times
    log(1 + mean words per cluster / its count in all clusters), so a word frequent here and
    rare elsewhere names the cluster. Ties in name take more words, then a number.
    """
    members = np.asarray(titles, dtype=object)
    documents = [" ".join(members[labels == cluster]) for cluster in range(n_clusters)]
    vectorizer = CountVectorizer(stop_words="english", strip_accents="ascii", token_pattern=_TOKEN)
    try:
        counts = vectorizer.fit_transform(documents).toarray().astype(np.float64)
        words = vectorizer.get_feature_names_out()
    except ValueError:  # no cluster has a single usable word (e.g. titles without ascii)
        counts, words = np.zeros((n_clusters, 0)), np.array([], dtype=object)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    idf = np.log1p(counts.sum(axis=1).mean() / np.maximum(counts.sum(axis=0), 1.0))
    scores = share * idf

    names: list[str] = []
    for cluster in range(n_clusters):
        ranked = [
            words[i] for i in np.argsort(-scores[cluster], kind="stable") if counts[cluster, i]
        ]
        name = "-".join(["topic", *ranked[:NAME_WORDS]]) if ranked else f"topic-{cluster}"
        extra = NAME_WORDS
        while name in names and extra < len(ranked):
            name = f"{name}-{ranked[extra]}"
            extra += 1
        name = _unique(name, names)
        names.append(name)
    return tuple(names)


def _unique(name: str, taken: list[str]) -> str:
    candidate, number = name, 2
    while candidate in taken:
        candidate, number = f"{name}-{number}", number + 1
    return candidate
