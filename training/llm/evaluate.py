"""How good a trained script model is, in numbers anyone can re-run: its validation bits per
byte beside a byte-level n-gram baseline fitted on the same training split and scored on the
same held-out videos, and what it writes for a few fixed prompts (`contentml llm evaluate`).

The baseline says whether the model learned more than a count table of the responses could:
a model that does not beat it has not learned the task, however low its loss looks.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModelContext

from contentml import registry
from contentml.errors import UserError
from contentml.settings import Settings
from training.llm import data
from training.llm.config import FinetuneConfig, load_config
from training.llm.generation import Sampling
from training.llm.package import MODEL_ARTIFACT, ScriptGenerator
from training.llm.train import MODEL_NAME, RECIPE_ARTIFACT, bits_per_byte

_PERSONA = {
    "role": "system",
    "content": "You write for Kitchen Notes, a YouTube channel about Howto & Style.",
}

PROMPTS: tuple[tuple[dict[str, str], ...], ...] = (
    (
        _PERSONA,
        {
            "role": "user",
            "content": "Write a title for a Howto & Style video. Tags: tomatoes, garden, harvest.",
        },
    ),
    (
        _PERSONA,
        {"role": "user", "content": "Write a short video script about: Growing tomatoes indoors"},
    ),
    ({"role": "user", "content": "Write a short video script about: tomatoes"},),
)
"""The generations shown: the two requests the model was trained on, for a channel and topic
not in the data, and the README's serving example (no system turn)."""

GENERATION_TOKENS = 64
"""New tokens per shown generation (greedy)."""

NGRAM_ORDER = 10
"""Bytes the baseline's gram spans, the predicted one included. Longer grams keep helping on
template text (they memorise its fixed phrases); past 10 the gain on this data is under 0.02
bits per byte."""

START = "\u0100"
"""Padding before a response, outside the 256 byte values (bytes are read as latin-1)."""

END = "\u0101"
"""The symbol after a response's last byte: the baseline predicts where a response ends, as
the model predicts its EOS."""

SYMBOLS = 257
"""What the baseline predicts: 256 byte values and the end."""


@dataclass(frozen=True)
class ByteNgram:
    """Interpolated Kneser-Ney over bytes: at each order, seen continuations keep their count
    less a discount, and the discounted mass goes to the next shorter context; the shortest
    backs off to the uniform distribution, so every byte keeps a probability above zero.

    Orders below the highest count in how many distinct contexts a gram follows (Kneser-Ney's
    continuation counts), not how often it occurs.
    """

    order: int
    counts: list[dict[str, int]]
    """Per order k (index k - 1): count of each k-gram (its last symbol is the predicted one)."""
    totals: list[dict[str, int]]
    """Per order: summed counts of each (k - 1)-symbol context."""
    types: list[dict[str, int]]
    """Per order: distinct symbols seen after each context."""
    discounts: list[float]
    """Per order: n1 / (n1 + 2 n2) of that order's counts (Ney's estimate)."""

    @classmethod
    def fit(cls, texts: list[str], order: int = NGRAM_ORDER) -> ByteNgram:
        """Count the UTF-8 bytes of `texts`, each a sequence of its own."""
        if order < 1:
            raise ValueError(f"order must be at least 1, not {order}")
        if not any(texts):
            raise ValueError("the baseline needs some training text")
        counts: list[dict[str, int]] = [{} for _ in range(order)]
        counts[-1] = Counter(
            sequence[i - order + 1 : i + 1]
            for sequence in (symbols(text, order) for text in texts)
            for i in range(order - 1, len(sequence))
        )
        for k in range(order - 1, 0, -1):
            continuations: Counter[str] = Counter(gram[1:] for gram in counts[k])
            counts[k - 1] = continuations
        totals: list[dict[str, int]] = []
        types: list[dict[str, int]] = []
        discounts: list[float] = []
        for grams in counts:
            total: defaultdict[str, int] = defaultdict(int)
            distinct: defaultdict[str, int] = defaultdict(int)
            for gram, count in grams.items():
                total[gram[:-1]] += count
                distinct[gram[:-1]] += 1
            totals.append(dict(total))
            types.append(dict(distinct))
            discounts.append(_discount(grams.values()))
        return cls(order, counts, totals, types, discounts)

    def probability(self, context: str, symbol: str) -> float:
        """P(`symbol` | the last `order - 1` symbols of `context`), symbols as `symbols` makes
        them."""
        probability = 1 / SYMBOLS
        for k in range(1, self.order + 1):
            history = context[len(context) - k + 1 :]
            total = self.totals[k - 1].get(history)
            if total is None:  # an unseen context: so are all longer ones
                break
            discount = self.discounts[k - 1]
            count = self.counts[k - 1].get(history + symbol, 0)
            backoff = discount * self.types[k - 1][history] * probability
            probability = (max(count - discount, 0) + backoff) / total
        return probability

    def bits(self, text: str) -> float:
        """Bits to encode the UTF-8 bytes of `text` and its end."""
        sequence = symbols(text, self.order)
        nats = sum(
            -math.log(self.probability(sequence[i - self.order + 1 : i], sequence[i]))
            for i in range(self.order - 1, len(sequence))
        )
        return nats / math.log(2)


def symbols(text: str, order: int) -> str:
    """`text`'s UTF-8 bytes as latin-1 characters (one per byte), after `order - 1` starts and
    before the end: what the baseline counts and predicts."""
    return START * (order - 1) + text.encode("utf-8").decode("latin-1") + END


def _discount(counts: Iterable[int]) -> float:
    """Ney's n1 / (n1 + 2 n2), kept within [0.1, 0.9]: a small corpus can lack singletons, and
    a discount of 0 would leave the bytes a context never saw no probability."""
    seen = Counter(count for count in counts if count <= 2)
    n1, n2 = seen[1], seen[2]
    return min(max(n1 / max(n1 + 2 * n2, 1), 0.1), 0.9)


def ngram_bits_per_byte(
    train: list[data.Example], validation: list[data.Example], order: int = NGRAM_ORDER
) -> float:
    """The baseline's bits per byte: fitted on the training responses (what the model's loss
    learns), scored on the validation responses with the model's denominator."""
    if not validation:
        raise ValueError("no validation examples to score")
    ngram = ByteNgram.fit([e.response for e in train], order)
    return sum(ngram.bits(e.response) for e in validation) / data.response_bytes(validation)


def evaluate(
    generator: ScriptGenerator,
    train: list[data.Example],
    validation: list[data.Example],
    order: int = NGRAM_ORDER,
    prompts: tuple[tuple[dict[str, str], ...], ...] = PROMPTS,
) -> dict:
    """The model's validation bits per byte, the n-gram's on the same responses, and greedy
    generations for `prompts`."""
    if not validation:
        raise UserError("no held-out videos: the recipe's split leaves the validation set empty")
    sampling = Sampling(max_tokens=GENERATION_TOKENS)
    generations = [
        {
            "system": next((m["content"] for m in messages if m["role"] == "system"), None),
            "user": messages[-1]["content"],
            "text": generator.generate(
                data.render_prompt(generator.tokenizer, list(messages)), sampling
            ).text,
        }
        for messages in prompts
    ]
    return {
        "validation_videos": len({e.video_id for e in validation}),
        "validation_examples": len(validation),
        "validation_bytes": data.response_bytes(validation),
        "bits_per_byte": round(bits_per_byte(generator.model, generator.tokenizer, validation), 4),
        "baseline": {
            "model": f"byte {order}-gram, interpolated Kneser-Ney, fitted on the training split",
            "training_bytes": data.response_bytes(train),
            "bits_per_byte": round(ngram_bits_per_byte(train, validation, order), 4),
        },
        "generations": generations,
    }


def load_folder(folder: Path) -> ScriptGenerator:
    """A saved model and tokenizer (`save_pretrained` of both) as the registered pyfunc loads
    them."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a saved model: no config.json")
    generator = ScriptGenerator()
    try:
        generator.load_context(
            PythonModelContext(artifacts={MODEL_ARTIFACT: str(folder)}, model_config={})
        )
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: cannot load a causal LM and its tokenizer: {e}") from e
    return generator


@dataclass(frozen=True)
class RegisteredScript:
    generator: ScriptGenerator
    version: str
    recipe: FinetuneConfig | None
    """The recipe its run logged; None for a run from before recipes were logged."""


def load_registered(settings: Settings, version: str | None) -> RegisteredScript:
    """A registered `script` version (the champion when None) and the recipe its run logged."""
    client = registry.connect(settings)
    if version is None:
        version = registry.alias_version(client, MODEL_NAME, registry.Alias.CHAMPION)
        if version is None:
            raise registry.RegistryError(
                f"model {MODEL_NAME!r} has no champion: run `contentml llm finetune` first"
            )
    found = registry.model_version(client, MODEL_NAME, version)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            recipe = load_config(
                Path(client.download_artifacts(found.run_id, RECIPE_ARTIFACT, scratch))
            )
        except (MlflowException, OSError):
            recipe = None
    uri = f"models:/{MODEL_NAME}/{found.version}"
    return RegisteredScript(
        mlflow.pyfunc.load_model(uri).unwrap_python_model(), str(found.version), recipe
    )
