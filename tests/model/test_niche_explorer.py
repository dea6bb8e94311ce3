"""Title clusters (`training.niche.explorer`) with the real all-MiniLM-L6-v2 encoder: the
embeddings' contract and behaviour, and k-means topics recovered from hand-made titles."""

from __future__ import annotations

import re

import numpy as np
import pytest

from training.niche.explorer import (
    EMBEDDING_DIM,
    TitleClusters,
    assign_clusters,
    embed_titles,
    fit_title_clusters,
)

TOPICS = {
    "trailer": [
        "Avengers: Infinity War Official Trailer",
        "Black Panther Official Trailer #2",
        "Star Wars: The Last Jedi Official Teaser Trailer",
        "Jurassic World: Fallen Kingdom Official Trailer HD",
        "Deadpool 2 Teaser Trailer",
        "Thor: Ragnarok Official Trailer",
        "Mission: Impossible Fallout Official Trailer",
    ],
    "recipe": [
        "Easy Chocolate Cake Recipe",
        "How To Make Homemade Pizza Dough | Recipe",
        "Creamy Garlic Pasta Recipe in 15 Minutes",
        "The Best Banana Bread Recipe",
        "Chicken Curry Recipe for Beginners",
        "Quick Vegan Lasagna Recipe",
        "Perfect Pancakes Recipe",
    ],
    "highlights": [
        "Chelsea vs Arsenal 2-1 Highlights",
        "Lakers vs Warriors Full Game Highlights",
        "Real Madrid vs Barcelona Extended Highlights",
        "Patriots vs Steelers Week 15 Highlights | NFL",
        "Manchester United vs Liverpool Highlights",
        "Yankees vs Red Sox Game Highlights",
        "Cowboys vs Eagles Highlights | NFL 2017",
    ],
}
TITLES = [title for titles in TOPICS.values() for title in titles]


@pytest.fixture(scope="module")
def clusters(one_thread) -> TitleClusters:
    """Fitted once; the encoder itself is loaded once per process by the module."""
    return fit_title_clusters(TITLES, n_clusters=3, seed=0)


def test_embeddings_are_unit_vectors(one_thread):
    vectors = embed_titles(["Official Trailer", "Chocolate cake recipe", "x"])
    assert vectors.shape == (3, EMBEDDING_DIM)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embed_titles([]).shape == (0, EMBEDDING_DIM)


def test_identical_titles_get_identical_vectors_in_any_batch(one_thread):
    titles = ["Cake recipe", "Lakers vs Warriors", "Cake recipe", "A much longer title " * 3]
    vectors = embed_titles(titles, batch_size=2)
    np.testing.assert_array_equal(vectors[0], vectors[2])
    alone = embed_titles(["Lakers vs Warriors"])
    np.testing.assert_allclose(vectors[1], alone[0], atol=1e-5)


def test_similar_titles_are_nearer_than_unrelated_ones(one_thread):
    trailer, other_trailer, cooking = embed_titles(
        [
            "Avengers: Infinity War Official Trailer",
            "Black Panther Official Teaser Trailer",
            "Easy Chocolate Cake Recipe",
        ]
    )
    assert trailer @ other_trailer > trailer @ cooking + 0.1


def test_clusters_recover_the_topics_and_are_named_after_them(clusters):
    assert len(clusters.names) == 3
    assert clusters.centroids.shape == (3, EMBEDDING_DIM)
    np.testing.assert_allclose(np.linalg.norm(clusters.centroids, axis=1), 1.0, atol=1e-5)
    assert sorted(clusters.sizes) == [7, 7, 7]
    for word, titles in TOPICS.items():
        (name,) = set(assign_clusters(clusters, titles))
        assert word in name.split("-")
    for name in clusters.names:
        assert re.fullmatch(r"topic(-[a-z0-9]+)+", name)


def test_new_titles_go_to_their_topic(clusters):
    new = {
        "trailer": "Spider-Man: Homecoming Official Trailer #3",
        "recipe": "Homemade Apple Pie Recipe",
        "highlights": "Juventus vs Napoli Highlights",
    }
    for word, name in zip(new, assign_clusters(clusters, list(new.values())), strict=True):
        assert word in name.split("-")


def test_sizes_count_repeated_titles(one_thread):
    fitted = fit_title_clusters(TITLES + TOPICS["recipe"][:2], n_clusters=3)
    (recipe,) = set(assign_clusters(fitted, TOPICS["recipe"]))
    assert fitted.sizes[fitted.names.index(recipe)] == 9


def test_fit_is_deterministic_for_a_seed(clusters):
    again = fit_title_clusters(list(reversed(TITLES)), n_clusters=3, seed=0)
    assert again.names == clusters.names
    np.testing.assert_array_equal(again.centroids, clusters.centroids)


@pytest.mark.parametrize(
    ("titles", "n_clusters", "problem"),
    [
        (TITLES, 1, "at least 2"),
        (["a b", "c d", "a b"], 3, "distinct titles"),
    ],
)
def test_bad_n_clusters_is_refused(titles, n_clusters, problem):
    with pytest.raises(ValueError, match=problem):
        fit_title_clusters(titles, n_clusters)


def test_clusters_refuse_duplicate_names():
    with pytest.raises(ValueError, match="unique"):
        TitleClusters(np.ones((2, EMBEDDING_DIM)), names=("topic-a", "topic-a"), sizes=(1, 1))
