"""The script model as MLflow stores and serves it: a merged causal LM and its tokenizer (chat
template included) logged as files behind a models-from-code pyfunc, and the one generation
routine that both the pyfunc's `predict` and the OpenAI-compatible server call."""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    MaxTimeCriteria,
    StoppingCriteria,
    StoppingCriteriaList,
    TextStreamer,
)
from transformers.generation.streamers import BaseStreamer

from training.llm.generation import (
    MIN_SAMPLING_TEMPERATURE,
    FinishReason,
    Generation,
    PromptTooLong,
    Sampling,
    cut_at_stop,
)

MODEL_CODE = Path(__file__).with_name("model_code.py")
"""The models-from-code entry point MLflow stores instead of a pickle."""

MODEL_ARTIFACT = "model"
"""Artifact key of the folder holding the model and tokenizer (`save_pretrained` of both)."""

SERVING_REQUIREMENTS = ("mlflow", "torch", "transformers")
"""What loading and running the pyfunc imports; pinned to the versions that trained it."""

PREDICT_PARAMS = ParamSchema(
    [ParamSpec("max_tokens", "long", 64), ParamSpec("temperature", "double", 0.0)]
)
"""`predict` params and their defaults: 64 new tokens, greedy."""


class _StopOrCancel(StoppingCriteria):
    """Ends generation once the new text holds a stop sequence or `cancel` is set (a streaming
    client went away)."""

    def __init__(self, tokenizer, prompt_length: int, stop: tuple[str, ...], cancel):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.stop = stop
        self.cancel = cancel

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = self.cancel is not None and self.cancel.is_set()
        if not done and self.stop:
            text = self.tokenizer.decode(
                input_ids[0, self.prompt_length :], skip_special_tokens=True
            )
            done = cut_at_stop(text, self.stop)[1]
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _CallbackStreamer(TextStreamer):
    """Hands each finished piece of new text to `on_text` (the prompt is skipped)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


class ScriptGenerator(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        folder = context.artifacts[MODEL_ARTIFACT]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(folder).to(self.device)
        self.model.eval()
        # One generation at a time: torch already uses every core for one, and seeding is
        # global, so a seeded request is only reproducible when nothing samples beside it.
        self._lock = threading.Lock()

    def text_streamer(self, on_text: Callable[[str], None]) -> BaseStreamer:
        """A streamer for `generate` that calls `on_text` (on the generating thread) with each
        finished piece of the new text."""
        return _CallbackStreamer(self.tokenizer, on_text)

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def new_token_budget(self, prompt_tokens: int, max_tokens: int) -> int:
        """`max_tokens`, clipped to what the model's context leaves after the prompt."""
        context = self.context_length
        if context is None:
            return max_tokens
        if prompt_tokens >= context:
            raise PromptTooLong(
                f"the prompt has {prompt_tokens} tokens; the model's context is {context}"
            )
        return min(max_tokens, context - prompt_tokens)

    def generate(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        streamer: BaseStreamer | None = None,
        cancel: threading.Event | None = None,
    ) -> Generation:
        """Continue `prompt_ids`; blocks (run it off the event loop). `streamer` receives the
        tokens as they come (the prompt first, as transformers' streamers expect)."""
        max_new_tokens = self.new_token_budget(len(prompt_ids), sampling.max_tokens)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        options = (
            {
                "do_sample": True,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": 0,  # OpenAI's sampling has no top-k; transformers' default is 50
            }
            if sampling.temperature >= MIN_SAMPLING_TEMPERATURE
            else {"do_sample": False}
        )
        stopping = StoppingCriteriaList(
            [_StopOrCancel(self.tokenizer, len(prompt_ids), sampling.stop, cancel)]
        )
        if sampling.max_seconds is not None:
            # The clock starts at the call: waiting for another generation counts, as it does
            # for the caller.
            stopping.append(MaxTimeCriteria(sampling.max_seconds))
        with self._lock, torch.inference_mode():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                stopping_criteria=stopping,
                streamer=streamer,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                **options,
            )
        generated = output[0, len(prompt_ids) :].tolist()
        text, stopped = cut_at_stop(
            self.tokenizer.decode(generated, skip_special_tokens=True), sampling.stop
        )
        ended = bool(generated) and generated[-1] == self.tokenizer.eos_token_id
        return Generation(
            text=text,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(generated),
            finish_reason=FinishReason.STOP if stopped or ended else FinishReason.LENGTH,
        )

    def predict(self, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        """`prompt` column in; one continuation per prompt out (params `max_tokens`,
        `temperature`)."""
        params = {spec.name: spec.default for spec in PREDICT_PARAMS.params} | (params or {})
        sampling = Sampling(
            max_tokens=int(params["max_tokens"]), temperature=float(params["temperature"])
        )
        return [
            self.generate(self.tokenizer(prompt)["input_ids"], sampling).text
            for prompt in model_input["prompt"].astype(str)
        ]


def log_script_model(
    model_dir: Path, registered_model_name: str = "script"
) -> mlflow.models.model.ModelInfo:
    """Log `model_dir` (a causal LM and its tokenizer, both `save_pretrained`) to the active
    MLflow run as the script pyfunc, and register it."""
    model_dir = Path(model_dir)
    missing = [
        name for name in ("config.json", "tokenizer_config.json") if not (model_dir / name).exists()
    ]
    if missing:
        raise FileNotFoundError(f"{model_dir} is not a saved model and tokenizer: no {missing}")
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(MODEL_CODE),
        artifacts={MODEL_ARTIFACT: str(model_dir)},
        registered_model_name=registered_model_name,
        signature=ModelSignature(
            inputs=Schema([ColSpec("string", "prompt")]),
            outputs=Schema([ColSpec("string")]),
            params=PREDICT_PARAMS,
        ),
        input_example=pd.DataFrame({"prompt": ["A video script about home cooking"]}),
        pip_requirements=[
            f"{name}=={importlib.metadata.version(name)}" for name in SERVING_REQUIREMENTS
        ],
    )
