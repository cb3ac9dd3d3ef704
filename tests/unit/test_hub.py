"""HubPusher against a fake Hub on 127.0.0.1 that speaks the few endpoints huggingface_hub calls to upload a folder."""

import base64
import json
import logging
import os
import re
import shutil
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from huggingface_hub import HfApi, ModelCard, constants

from hf_audio_trainer.hub import HUB_STRATEGIES, HubPusher, check_hub_args, write_model_card

os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
TOKEN = "hf_fakeTOKEN123"
REPO = "me/audio-model"


class FakeHub:
    """What the fake server was asked, plus knobs to make it slow or failing."""

    def __init__(self):
        self.repos = {}  # repo id -> private flag
        self.commits = []  # accepted: {"repo", "message", "files": {path: bytes}}
        self.commit_tries = 0
        self.unknown = []  # requests no route answered
        self.fail_commits, self.fail_status = 0, 500  # fail this many commits (float("inf"): all) with this status
        self.fail_create = None  # status to refuse repo creation with
        self.gate = threading.Event()  # preupload (the first call of an upload) waits for it, at most hang_limit s
        self.gate.set()
        self.hang_limit = 10.0
        self.upload_started = threading.Event()


def make_handler(hub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.route("GET")

        def do_POST(self):
            self.route("POST")

        def do_DELETE(self):
            self.route("DELETE")

        def reply(self, status, payload, headers=()):
            body = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers:
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client is gone: a stopped run left this upload
                pass

        def refuse(self, status):
            # a careless server that echoes the credentials: the pusher must redact them
            self.reply(status, {"error": f"refused credentials {self.headers.get('authorization')}"})

        def route(self, method):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = self.path.split("?")[0]
            endpoint = f"http://127.0.0.1:{self.server.server_port}"
            if method == "POST" and path == "/api/repos/create":
                if hub.fail_create:
                    return self.refuse(hub.fail_create)
                payload = json.loads(body)
                repo = f"{payload['organization']}/{payload['name']}"
                hub.repos[repo] = payload.get("visibility") == "private"
                return self.reply(200, {"url": f"{endpoint}/{repo}", "name": repo})
            if method == "POST" and path == "/api/validate-yaml":
                return self.reply(200, {"errors": [], "warnings": []})
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)", path):
                if m[1] not in hub.repos:
                    return self.reply(404, {"error": "Repository not found"}, [("X-Error-Code", "RepoNotFound")])
                return self.reply(200, {"id": m[1], "private": hub.repos[m[1]], "sha": "0" * 40})
            if method == "POST" and (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/main", path)):
                hub.upload_started.set()
                hub.gate.wait(hub.hang_limit)
                files = json.loads(body)["files"]
                # regular: contents come inline in the commit, so no LFS / xet transfer is needed
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return self.reply(200, {"files": modes})
            if method == "POST" and (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/main", path)):
                hub.commit_tries += 1
                if hub.fail_commits > 0:
                    hub.fail_commits -= 1
                    return self.refuse(hub.fail_status)
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(line["value"] for line in lines if line["key"] == "header")
                files = {
                    line["value"]["path"]: base64.b64decode(line["value"]["content"])
                    for line in lines
                    if line["key"] == "file"
                }
                other = [line for line in lines if line["key"] not in ("header", "file")]
                assert not other, other  # only regular files in these tests
                hub.commits.append({"repo": m[1], "message": header["summary"], "files": files})
                oid = uuid.uuid4().hex[:40].ljust(40, "0")
                return self.reply(200, {"commitUrl": f"{endpoint}/{m[1]}/commit/{oid}", "commitOid": oid})
            hub.unknown.append(f"{method} {self.path}")
            self.reply(404, {"error": f"fake hub: no route for {method} {self.path}"})

    return Handler


def _only_loopback(monkeypatch):
    """Every connection and name lookup from Python must stay on this machine."""
    local = ("127.0.0.1", "::1", "localhost")
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in local:
            raise AssertionError(f"a test tried to reach {address}")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in local:
            raise AssertionError(f"a test tried to look up {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def hub(monkeypatch):
    # conftest's HF_HUB_OFFLINE blocks every request, local ones too; the guard below keeps them local
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    _only_loopback(monkeypatch)
    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    fake.endpoint = f"http://127.0.0.1:{server.server_port}"
    yield fake
    fake.gate.set()
    server.shutdown()
    server.server_close()


def pusher_for(hub, **kwargs):
    return HubPusher(REPO, token=TOKEN, endpoint=hub.endpoint, **kwargs)


def test_check_hub_args_names_the_flag_and_the_fix():
    with pytest.raises(ValueError, match="--push_to_hub needs --hub_model_id .*your-name/my-audio-model"):
        check_hub_args(True, None, "end")
    with pytest.raises(ValueError, match="--hub_strategy 'sometimes'.*end, every_save, checkpoint"):
        check_hub_args(True, REPO, "sometimes")
    with pytest.raises(ValueError, match="--hub_model_id 'me/bad--name'"):
        check_hub_args(True, "me/bad--name", "end")
    for strategy in HUB_STRATEGIES:
        check_hub_args(True, REPO, strategy)
    check_hub_args(False, None, "end")  # not pushing: no id needed


def test_push_uploads_a_snapshot_of_the_folder(hub, tmp_path):
    pusher = pusher_for(hub, private=True)
    assert hub.repos == {REPO: True}
    model = tmp_path / "model"
    (model / "tokenizer").mkdir(parents=True)
    (model / "config.json").write_text('{"vocab_size": 64}')
    (model / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (model / "tokenizer" / "tokenizer_config.json").write_text("{}")
    for skipped in ("weights.tmp", ".tmp-final/model.safetensors", "checkpoint-5/optimizer.bin", "__pycache__/a.pyc"):
        (model / skipped).parent.mkdir(exist_ok=True)
        (model / skipped).write_text("not for the Hub")
    write_model_card(model, repo_id=REPO, stage="pretrain", hyperparameters={}, metrics={})

    future = pusher.push(model, "End of training")

    assert pusher.wait(timeout=30) == []
    assert future.result().oid is not None
    assert [c["message"] for c in hub.commits] == ["End of training"]
    files = hub.commits[0]["files"]
    assert sorted(files) == ["README.md", "config.json", "model.safetensors", "tokenizer/tokenizer_config.json"]
    assert files["model.safetensors"] == bytes(range(256)) * 4
    assert files["config.json"] == b'{"vocab_size": 64}'
    assert pusher.pending == 0 and hub.unknown == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the staging copy is gone


def test_push_returns_at_once_and_the_upload_survives_rotation(hub, tmp_path):
    pusher = pusher_for(hub)
    hub.gate.clear()  # a slow Hub: the upload stalls until the test lets it go
    checkpoint = tmp_path / "checkpoint-10"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights at step 10")
    (checkpoint / "trainer_state.json").write_text('{"global_step": 10}')

    future = pusher.push(checkpoint, "Checkpoint at step 10", path_in_repo="last-checkpoint")

    assert not future.done() and pusher.pending == 1
    # training goes on: rotation deletes the folder and a later save reuses its name with new contents
    shutil.rmtree(checkpoint)
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights at step 20")
    assert hub.upload_started.wait(10)
    assert pusher.pending == 1 and hub.commits == []
    hub.gate.set()
    assert pusher.wait(timeout=30) == []
    assert hub.commits[0]["files"] == {
        "last-checkpoint/model.safetensors": b"weights at step 10",
        "last-checkpoint/trainer_state.json": b'{"global_step": 10}',
    }
    assert pusher.pending == 0


# huggingface_hub retries a 500 itself (http_backoff, 1 s); a 409 only the pusher retries
@pytest.mark.parametrize("status", [500, 409])
def test_a_failed_commit_is_retried(hub, tmp_path, status):
    pusher = pusher_for(hub, retry_wait=0.01)
    hub.fail_commits, hub.fail_status = 1, status
    (tmp_path / "a.json").write_text("1")
    pusher.push(tmp_path, "step 1")
    assert pusher.wait(timeout=30) == []
    assert hub.commit_tries == 2
    assert hub.commits[0]["files"] == {"a.json": b"1"}


def test_a_push_that_keeps_failing_is_logged_and_token_free(hub, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    pusher = pusher_for(hub, max_retries=2, retry_wait=0.01)
    hub.fail_commits, hub.fail_status = float("inf"), 403  # a 403 is not retried by huggingface_hub itself
    (tmp_path / "a.json").write_text("1")

    future = pusher.push(tmp_path, "step 1")
    failures = pusher.wait(timeout=30)

    assert future.result() is None  # nothing raised, in the worker or here
    assert hub.commit_tries == 3 and hub.commits == []
    assert len(failures) == 1 and "step 1" in failures[0] and REPO in failures[0] and "403" in failures[0]
    assert "refused credentials" in failures[0]  # the server's message is kept ...
    assert TOKEN not in failures[0]  # ... without the token it echoed
    ours = [r for r in caplog.records if r.name == "hf_audio_trainer.hub"]
    assert [r.levelno for r in ours] == [logging.WARNING, logging.WARNING, logging.ERROR]
    assert TOKEN not in caplog.text and all(TOKEN not in r.getMessage() for r in caplog.records)
    assert TOKEN not in repr(pusher)


def test_a_repo_that_cannot_be_created_stops_the_run_clearly(hub):
    hub.fail_create = 401
    with pytest.raises(RuntimeError) as info:
        pusher_for(hub)
    message = str(info.value)
    assert REPO in message and "hf auth login" in message and "--hub_token" in message
    assert TOKEN not in message and info.value.__cause__ is None


def test_push_save_follows_the_strategy(hub, tmp_path):
    model, checkpoint = tmp_path / "model", tmp_path / "checkpoint-4"
    for folder in (model, checkpoint):
        folder.mkdir()
        (folder / "model.safetensors").write_text(folder.name)

    assert pusher_for(hub, strategy="end").push_save(model, checkpoint, step=4) == []
    pusher = pusher_for(hub, strategy="checkpoint")
    assert len(pusher.push_save(model, checkpoint, step=4)) == 2
    assert pusher.wait(timeout=30) == []

    assert [(c["message"], c["files"]) for c in hub.commits] == [
        ("Training in progress, step 4", {"model.safetensors": b"model"}),
        ("Checkpoint at step 4", {"last-checkpoint/model.safetensors": b"checkpoint-4"}),
    ]
    with pytest.raises(ValueError, match="end, every_save, checkpoint"):
        pusher_for(hub, strategy="always")


def test_saves_faster_than_uploads_pin_at_most_one_waiting_snapshot_per_destination(hub, tmp_path):
    hub.gate.clear()  # the Hub hangs on the first upload while 8 saves come
    hub.hang_limit = 300
    pusher = pusher_for(hub, strategy="checkpoint")
    run = tmp_path / "run"
    futures = []
    for step in range(1, 9):
        model, checkpoint = run / ".tmp-push-model", run / f"checkpoint-{step}"
        shutil.rmtree(model, ignore_errors=True)  # a new export each time, as push_model writes it (never in place)
        for folder in (model, checkpoint):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "model.safetensors").write_text(f"{folder.name} at step {step}")
        shutil.rmtree(run / f"checkpoint-{step - 1}", ignore_errors=True)  # the rotation
        futures += pusher.push_save(model, checkpoint, step)
        assert hub.upload_started.wait(10)
        staging = [p.name for p in run.iterdir() if p.name not in (model.name, checkpoint.name)]
        # one upload in flight, at most one waiting per destination (the model, last-checkpoint/), not 2 per save
        assert len(staging) <= 3 and all(name.startswith(".tmp-") for name in staging), staging
    assert pusher.pending == 3
    hub.gate.set()
    assert pusher.wait(timeout=60) == []
    assert [(c["message"], c["files"]) for c in hub.commits] == [
        ("Training in progress, step 1", {"model.safetensors": b".tmp-push-model at step 1"}),
        # the waiting snapshots of steps 1 to 7 were replaced by newer ones of the same destination
        ("Training in progress, step 8", {"model.safetensors": b".tmp-push-model at step 8"}),
        ("Checkpoint at step 8", {"last-checkpoint/model.safetensors": b"checkpoint-8 at step 8"}),
    ]
    assert [f.cancelled() for f in futures] == [False] + [True] * 13 + [False, False]
    assert sorted(p.name for p in run.iterdir()) == [".tmp-push-model", "checkpoint-8"]  # no staging left


def test_close_waits_for_the_uploads_then_drops_what_is_left(hub, tmp_path):
    (tmp_path / "a.json").write_text("1")
    pusher = pusher_for(hub)
    pusher.push(tmp_path, "step 1")
    pusher.push(tmp_path, "step 1 checkpoint", path_in_repo="last-checkpoint")
    assert pusher.close(timeout=60, say=print) == []  # a Hub that answers: both land
    assert [c["message"] for c in hub.commits] == ["step 1", "step 1 checkpoint"]

    hub.gate.clear()  # a Hub that hangs longer than the run may wait
    hub.hang_limit = 300
    pusher, said = pusher_for(hub), []
    flying = pusher.push(tmp_path, "step 2")
    assert hub.upload_started.wait(10)
    waiting = pusher.push(tmp_path, "step 2 checkpoint", path_in_repo="last-checkpoint")
    dropped = pusher.close(timeout=0.1, say=said.append)
    assert said == [f"waiting up to 0.1 s for 2 upload(s) to {REPO}"]
    assert len(dropped) == 2 and "'step 2'" in dropped[0] and "'step 2 checkpoint'" in dropped[1]
    assert waiting.cancelled() and not flying.done()
    with pytest.raises(RuntimeError, match="closed"):
        pusher.push(tmp_path, "step 3")
    hub.gate.set()  # the one in flight is not stopped (it ends with the process); nothing starts after it
    flying.result(timeout=60)
    assert [c["message"] for c in hub.commits[2:]] == ["step 2"]
    assert sorted(p.name for p in tmp_path.parent.iterdir() if p.name.startswith(".tmp-")) == []


def test_model_card_holds_metadata_and_tables(tmp_path):
    path = write_model_card(
        tmp_path,
        repo_id=REPO,
        stage="finetune",
        base_model="me/audio-base",
        datasets=["me/drum-loops", str(tmp_path)],  # a local folder is no Hub id: text only
        hyperparameters={"learning_rate": 3e-4, "hub_token": TOKEN, "data": {"tokenizer_name_or_path": "mel_kmeans"}},
        metrics={"eval_loss": 2.3456789, "train_runtime": 12},
        tags=["musicgen"],
    )
    card = ModelCard.load(path)
    assert path == tmp_path / "README.md"
    assert card.data.library_name == "hf-audio-trainer"
    assert card.data.tags == ["audio", "hf-audio-trainer", "finetune", "musicgen"]
    assert card.data.base_model == "me/audio-base"
    assert card.data.datasets == ["me/drum-loops"]
    text = card.text
    assert f'MusicgenForCausalLM.from_pretrained("{REPO}")' in text
    assert "| learning_rate | 0.0003 |" in text and "| data.tokenizer_name_or_path | mel_kmeans |" in text
    assert "| eval_loss | 2.34568 |" in text and "| train_runtime | 12 |" in text
    assert "hub_token" not in card.content and TOKEN not in card.content


def test_a_codec_card_says_codec_and_loads_an_encodec_model(tmp_path):
    path = write_model_card(tmp_path, repo_id=REPO, stage="codec", hyperparameters={}, metrics={})
    text = ModelCard.load(path).text
    assert "A neural audio codec trained with hf-audio-trainer, stage **codec**" in text
    assert f'EncodecModel.from_pretrained("{REPO}")' in text and "Musicgen" not in text


def test_a_text_to_audio_card_names_its_base_model_task_and_pipeline(tmp_path):
    from hf_audio_trainer.families import FAMILIES

    card = FAMILIES["musicgen_text"].model_card
    path = write_model_card(
        tmp_path, repo_id=REPO, stage="finetune", base_model="facebook/musicgen-small", hyperparameters={},
        metrics={}, card=card,
    )  # fmt: skip
    loaded = ModelCard.load(path)
    assert loaded.data.pipeline_tag == "text-to-audio" and loaded.data.base_model == "facebook/musicgen-small"
    assert f'pipeline("text-to-audio", model="{REPO}")' in loaded.text and "MusicgenForCausalLM" not in loaded.text
    assert "from `facebook/musicgen-small`" in loaded.text
    # the same words through the writer a run's checkpointer calls at every push
    from hf_audio_trainer.config import FinetuneConfig, resolve_config
    from hf_audio_trainer.hub import model_card_writer

    cfg = resolve_config({"model_family": "musicgen_text", "model_name_or_path": "x", "hub_model_id": REPO,
                          "output_dir": str(tmp_path / "run")}, FinetuneConfig)  # fmt: skip
    writer = model_card_writer(
        cfg.hub.hub_model_id, "finetune", "facebook/musicgen-small", None, cfg.to_flat_dict(), card
    )
    writer(tmp_path / "pushed", {"step": 3})
    assert ModelCard.load(tmp_path / "pushed" / "README.md").data.pipeline_tag == "text-to-audio"


@pytest.mark.skipif(
    not (os.environ.get("HF_TOKEN") and os.environ.get("HF_HUB_TEST_REPO")),
    reason="pushes to the real Hub: set HF_TOKEN and HF_HUB_TEST_REPO (a repo id it may create and delete)",
)
def test_push_to_the_real_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    repo, token = os.environ["HF_HUB_TEST_REPO"], os.environ["HF_TOKEN"]
    (tmp_path / "config.json").write_text('{"hello": "hub"}')
    try:
        pusher = HubPusher(repo, token=token, private=True)
        pusher.push(tmp_path, "hf-audio-trainer test push", blocking=True)
        assert pusher.failures == []
        assert "config.json" in HfApi(token=token).list_repo_files(repo)
    finally:
        HfApi(token=token).delete_repo(repo, missing_ok=True)
