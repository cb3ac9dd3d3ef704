"""Pushing to the Hugging Face Hub: flag checks, background uploads that never stall training, the model card."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import CommitInfo, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.utils import validate_repo_id

from hf_audio_trainer.errors import ConfigError, RemoteError, check

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


@dataclass
class _Upload:
    staging: Path
    commit_message: str
    path_in_repo: str | None
    future: Future


class HubPusher:
    """Creates a model repo now, then uploads folders to it one at a time on a background thread.

    Construct it on the main process only. `strategy` is used by `push_save`; `push` works with any strategy.
    Saves that come faster than uploads do not queue up: a push replaces the one waiting for the same place in the
    repo (`path_in_repo`), so at most one upload is in flight and one snapshot waits per place. `close` ends it.
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
        self._changed = threading.Condition()  # guards the three below; notified whenever one of them changes
        self._waiting: dict[str | None, _Upload] = {}  # by place in the repo, in the order they go
        self._flying: _Upload | None = None
        self._closed = threading.Event()
        # one worker: uploads land in the order they were asked for and never compete for bandwidth. A daemon, so an
        # upload still running after `close` cannot hold the process (a stopped run) past the bound it was given.
        threading.Thread(target=self._work, name="hub-push", daemon=True).start()

    def __repr__(self) -> str:
        return f"HubPusher(repo_id={self.repo_id!r}, strategy={self.strategy!r}, pending={self.pending})"

    @property
    def pending(self) -> int:
        """Uploads asked for and not finished yet."""
        with self._changed:
            return len(self._waiting) + (self._flying is not None)

    def push(
        self, folder: str | os.PathLike, commit_message: str, path_in_repo: str | None = None, blocking: bool = False
    ) -> Future:
        """Snapshot `folder` now, upload the snapshot in the background; the Future yields a CommitInfo or None.

        An upload that still fails after `max_retries` retries is logged and added to `failures`, never raised. A
        push not started yet when the next one to the same `path_in_repo` comes is dropped (its Future cancelled):
        every push here sends a whole model or checkpoint, so the newer one holds all it would have sent.
        """
        if self._closed.is_set():
            raise RuntimeError(f"{self!r} is closed")
        upload = _Upload(self._snapshot(Path(folder)), commit_message, path_in_repo, Future())
        with self._changed:
            replaced = self._waiting.pop(path_in_repo, None)
            self._waiting[path_in_repo] = upload  # at the end of the line, in the order of the latest requests
            self._changed.notify_all()
        if replaced is not None and replaced.future.cancel():
            shutil.rmtree(replaced.staging, ignore_errors=True)
            logger.info("push %r to %s replaced by %r", replaced.commit_message, self.repo_id, commit_message)
        if blocking:
            upload.future.result()
        return upload.future

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
        with self._changed:
            done = self._changed.wait_for(self._idle, timeout)
        if not done:
            logger.warning("%d upload(s) to %s still running after %ss", self.pending, self.repo_id, timeout)
        return list(self.failures)

    def close(self, timeout: float, say: Callable[[str], None] = logger.warning) -> list[str]:
        """Wait at most `timeout` seconds for the pending uploads, then drop the rest; returns what did not finish.

        For a run that stops early (a signal, an error): the snapshots still waiting are deleted; the upload in flight
        cannot be interrupted and goes on until it ends or the process exits (a Hub commit lands whole or not at
        all), but no retry or other upload starts after this. `say` tells that the run is waiting, and for how long.
        """
        if self.pending:
            say(f"waiting up to {timeout:g} s for {self.pending} upload(s) to {self.repo_id}")
        with self._changed:
            self._changed.wait_for(self._idle, timeout)
            self._closed.set()
            unfinished = [self._flying] if self._flying is not None else []
            dropped = list(self._waiting.values())
            self._waiting.clear()
            self._changed.notify_all()
        for upload in dropped:
            upload.future.cancel()
            shutil.rmtree(upload.staging, ignore_errors=True)
        return [
            f"push {u.commit_message!r} to {self.repo_id} did not finish within {timeout:g} s; it was dropped"
            for u in unfinished + dropped
        ]

    def _idle(self) -> bool:
        return not self._waiting and self._flying is None

    def _work(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._waiting or self._closed.is_set())
                if self._closed.is_set():
                    return
                self._flying = self._waiting.pop(next(iter(self._waiting)))
                upload = self._flying
            if upload.future.set_running_or_notify_cancel():
                try:
                    upload.future.set_result(self._upload(upload.staging, upload.commit_message, upload.path_in_repo))
                except BaseException as err:  # a bug: it belongs to whoever holds the Future
                    upload.future.set_exception(err)
            with self._changed:
                self._flying = None
                self._changed.notify_all()

    def _snapshot(self, folder: Path) -> Path:
        # Hard links cost no time or disk and survive the rotation deleting (or os.replace-ing) the original.
        # They would NOT survive a file rewritten in place (open "wb" on the same path); checkpoint.py never does
        # that: it writes a hidden folder and renames it into place. The `.tmp-` name marks it as scratch for the
        # start-of-run sweep, which removes the snapshots of a killed run.
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
                    if self._closed.wait(delay):  # closed: the run is ending, no retry
                        break
            message = f"push {commit_message!r} to {self.repo_id} failed after {attempt + 1} tries: {error}"
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
    hub_stop_timeout: float = field(
        default=60.0,
        metadata={
            "help": "Seconds a run that stops early (a signal, an error) waits for its uploads before it exits; what "
            "has not finished by then is dropped (the checkpoints on disk are complete)."
        },
    )

    def __post_init__(self) -> None:
        check_hub_args(self.push_to_hub, self.hub_model_id, self.hub_strategy)
        check(self.hub_stop_timeout >= 0, f"hub_stop_timeout={self.hub_stop_timeout}: must be >= 0 (seconds)")


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
