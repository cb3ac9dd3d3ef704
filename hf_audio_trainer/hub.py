"""Pushing to the Hugging Face Hub: flag checks, background uploads that never stall training, the model card."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import CommitInfo, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.utils import validate_repo_id

from hf_audio_trainer.errors import ConfigError, RemoteError

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

# Same meanings as transformers' TrainingArguments.hub_strategy.
HUB_STRATEGIES = ("end", "every_save", "checkpoint")
LAST_CHECKPOINT = "last-checkpoint"
LIBRARY_NAME = "hf-audio-trainer"
# Never pushed, at any depth: half-written or doomed folders (checkpoint.py writes `.tmp-*`, deletes via
# `.deleting-*`), and the checkpoints that live beside the final model in output_dir.
IGNORE = (".tmp-*", "*.tmp", "__pycache__", ".deleting-*", "checkpoint-*")
_STAGING_PREFIX = ".tmp-hub-push-"


def check_hub_args(push_to_hub: bool, hub_model_id: str | None, hub_strategy: str) -> None:
    """Fail before training when the Hub flags cannot work, naming the flag and the fix."""
    if hub_strategy not in HUB_STRATEGIES:
        raise ConfigError(f"--hub_strategy {hub_strategy!r} is unknown; valid strategies: {', '.join(HUB_STRATEGIES)}")
    if not push_to_hub:
        return
    if not hub_model_id:
        raise ConfigError("--push_to_hub needs --hub_model_id (e.g. --hub_model_id your-name/my-audio-model)")
    try:
        validate_repo_id(hub_model_id)
    except ValueError as err:
        raise ConfigError(
            f"--hub_model_id {hub_model_id!r} is not a valid repo id (your-name/model-name): {err}"
        ) from None


class HubPusher:
    """Creates a model repo now, then uploads folders to it one at a time on a background thread.

    Construct it on the main process only. `strategy` is used by `push_save`; `push` works with any strategy.
    The token (given, or the logged-in one) never appears in logs, errors, `failures` or the repr.
    """

    def __init__(
        self,
        repo_id: str,
        token: str | None = None,
        private: bool = False,
        strategy: str = "end",
        endpoint: str | None = None,
        max_retries: int = 3,
        retry_wait: float = 1.0,
    ):
        if strategy not in HUB_STRATEGIES:
            raise ValueError(f"hub strategy {strategy!r} is unknown; valid strategies: {', '.join(HUB_STRATEGIES)}")
        self.repo_id, self.strategy = repo_id, strategy
        self.max_retries, self.retry_wait = max_retries, retry_wait
        self.failures: list[str] = []
        self._token = token
        self._api = HfApi(endpoint=endpoint, token=token)
        # one worker: uploads land in the order they were asked for and never compete for bandwidth
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-push")
        self._futures: list[Future] = []
        try:
            self._token = token or get_token()  # only to redact it: HfApi finds it again itself
            self.url = str(self._api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
        except Exception as err:
            # `from None`: the upstream exception carries the request, whose headers hold the token
            raise RemoteError(
                f"cannot create or reach the Hub repo {repo_id!r} ({self._redact(f'{type(err).__name__}: {err}')}). "
                "Log in with `hf auth login` or pass --hub_token, and check that the token has write access to "
                f"the namespace of {repo_id!r}."
            ) from None

    def __repr__(self) -> str:
        return f"HubPusher(repo_id={self.repo_id!r}, strategy={self.strategy!r}, pending={self.pending})"

    @property
    def pending(self) -> int:
        """Uploads asked for and not finished yet."""
        return sum(not f.done() for f in self._futures)

    def push(
        self, folder: str | os.PathLike, commit_message: str, path_in_repo: str | None = None, blocking: bool = False
    ) -> Future:
        """Snapshot `folder` now, upload the snapshot in the background; the Future yields a CommitInfo or None.

        An upload that still fails after `max_retries` retries is logged and added to `failures`, never raised.
        """
        staging = self._snapshot(Path(folder))
        future = self._executor.submit(self._upload, staging, commit_message, path_in_repo)
        self._futures = [f for f in self._futures if not f.done()] + [future]
        if blocking:
            future.result()
        return future

    def push_save(
        self, model_dir: str | os.PathLike | None, checkpoint_dir: str | os.PathLike | None, step: int
    ) -> list[Future]:
        """After a save: `every_save` pushes the model folder, `checkpoint` also the checkpoint to last-checkpoint/."""
        futures = []
        if self.strategy in ("every_save", "checkpoint") and model_dir is not None:
            futures.append(self.push(model_dir, f"Training in progress, step {step}"))
        if self.strategy == "checkpoint" and checkpoint_dir is not None:
            futures.append(self.push(checkpoint_dir, f"Checkpoint at step {step}", path_in_repo=LAST_CHECKPOINT))
        return futures

    def wait(self, timeout: float | None = None) -> list[str]:
        """Wait for every pending upload (call at the end of training); return the failure messages."""
        _, not_done = wait_futures(self._futures, timeout=timeout)
        if not_done:
            logger.warning("%d upload(s) to %s still running after %ss", len(not_done), self.repo_id, timeout)
        return list(self.failures)

    def _snapshot(self, folder: Path) -> Path:
        # Hard links cost no time or disk and survive the rotation deleting (or os.replace-ing) the original.
        # They would NOT survive a file rewritten in place (open "wb" on the same path); checkpoint.py never does
        # that: it writes a hidden folder and renames it into place.
        if not folder.is_dir():
            raise FileNotFoundError(f"cannot push {folder}: not a folder")
        try:
            staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=folder.parent))
        except OSError:  # a read-only parent: the system temp folder, where files get copied, not linked
            staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX))
        try:
            shutil.copytree(
                folder, staging, ignore=shutil.ignore_patterns(*IGNORE), copy_function=_link_or_copy, dirs_exist_ok=True
            )
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def _upload(self, staging: Path, commit_message: str, path_in_repo: str | None) -> CommitInfo | None:
        try:
            for attempt in range(self.max_retries + 1):
                try:
                    info = self._api.upload_folder(
                        repo_id=self.repo_id,
                        folder_path=staging,
                        path_in_repo=path_in_repo,
                        commit_message=commit_message,
                        repo_type="model",
                    )
                    logger.info("pushed %r to %s", commit_message, self.repo_id)
                    return info
                except Exception as err:
                    error = self._redact(f"{type(err).__name__}: {err}")
                if attempt < self.max_retries:
                    delay = self.retry_wait * 2**attempt
                    logger.warning(
                        "push %r to %s failed, retry in %.1fs: %s", commit_message, self.repo_id, delay, error
                    )
                    time.sleep(delay)
            message = f"push {commit_message!r} to {self.repo_id} failed after {self.max_retries + 1} tries: {error}"
            logger.error(message)
            self.failures.append(message)
            return None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)
    return dst


@dataclass(frozen=True)
class ModelCardText:
    """What a model card says of the model: what it is, how to load it (`{repo_id}` filled in), its Hub task."""

    kind: str
    usage: str
    pipeline_tag: str | None = None


LM_CARD = ModelCardText(
    "An audio language model",
    'from transformers import MusicgenForCausalLM\n\nmodel = MusicgenForCausalLM.from_pretrained("{repo_id}")',
)
CODEC_CARD = ModelCardText(
    "A neural audio codec", 'from transformers import EncodecModel\n\nmodel = EncodecModel.from_pretrained("{repo_id}")'
)


def write_model_card(
    folder: str | os.PathLike,
    *,
    repo_id: str,
    stage: str,
    base_model: str | None = None,
    datasets: str | list[str] | None = None,
    hyperparameters: dict,
    metrics: dict,
    tags: tuple[str, ...] | list[str] = (),
    card: ModelCardText | None = None,
) -> Path:
    """Write folder/README.md: Hub metadata, how to load the model (`card`: the model family's words; default by
    stage), hyperparameter and final-metric tables."""
    datasets = [datasets] if isinstance(datasets, str) else list(datasets or [])
    # local paths are not Hub ids: the Hub rejects them as metadata, so they only go into the text
    hub_datasets = [d for d in datasets if not os.path.exists(d)]
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        tags=list(dict.fromkeys(["audio", LIBRARY_NAME, stage, *tags])),
        base_model=base_model if base_model and not os.path.exists(base_model) else None,
        datasets=hub_datasets or None,
        pipeline_tag=card.pipeline_tag if card is not None else None,
    )
    origin = f" from `{base_model}`" if base_model else ""
    trained_on = f" on {', '.join(f'`{d}`' for d in datasets)}" if datasets else ""
    card = card or (CODEC_CARD if stage == "codec" else LM_CARD)
    body = f"""
# {repo_id.split("/")[-1]}

{card.kind} trained with hf-audio-trainer, stage **{stage}**{origin}{trained_on}.

## How to load

```python
{card.usage.format(repo_id=repo_id)}
```

## Hyperparameters

{_table(("name", "value"), _public(_flatten(hyperparameters)))}

## Final metrics

{_table(("metric", "value"), _flatten(metrics))}
"""
    path = Path(folder) / "README.md"
    ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").save(path)
    return path


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_TOKEN_KEY = re.compile(r"(^|[._-])token($|[._-])", re.IGNORECASE)  # hub_token, token.x; not tokenizer, max_tokens
_TOKEN_VALUE = re.compile(r"hf_[A-Za-z0-9]{20,}")


def _public(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if not _TOKEN_KEY.search(k) and not _TOKEN_VALUE.search(str(v))}


def _table(header: tuple[str, str], rows: dict[str, Any]) -> str:
    if not rows:
        return "_None recorded._"
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    for key, value in rows.items():
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        shown = shown.replace("|", "\\|")  # a bare | would end the cell
        lines.append(f"| {key} | {shown} |")
    return "\n".join(lines)


@dataclass
class HubConfig:
    """Pushing the run to the Hugging Face Hub (uploads run in the background)."""

    push_to_hub: bool = field(default=False, metadata={"help": "Push the model (and model card) to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "The repo to push to, e.g. you/my-model."})
    hub_strategy: str = field(
        default="every_save",
        metadata={"help": "end (final model), every_save (model at every save) or checkpoint (also last-checkpoint/)."},
    )
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the repo as private."})
    hub_token: str | None = field(
        default=None, repr=False, metadata={"help": "Hub token; unset: the logged-in one (never printed or saved)."}
    )

    def __post_init__(self) -> None:
        check_hub_args(self.push_to_hub, self.hub_model_id, self.hub_strategy)


def start_pusher(h: HubConfig, accelerator: Accelerator) -> HubPusher | None:
    """Create the Hub repo before any training (a bad token or id fails now, not hours later)."""
    if not h.push_to_hub or not accelerator.is_main_process:
        return None
    return HubPusher(h.hub_model_id, token=h.hub_token, private=h.hub_private_repo, strategy=h.hub_strategy)


def model_card_writer(
    repo_id: str | None,
    stage: str,
    base_model: str | None,
    datasets: list[str] | None,
    hyperparameters: dict[str, Any],
    text: ModelCardText | None = None,
):
    """card(folder, metrics): the README.md model card pushed with every upload (`text`: the family's words)."""

    def card(folder: Path, metrics: dict) -> None:
        write_model_card(
            folder,
            repo_id=repo_id,
            stage=stage,
            base_model=base_model,
            datasets=datasets,
            hyperparameters=hyperparameters,
            metrics={k: v for k, v in metrics.items() if k != "step"},
            card=text,
        )

    return card
