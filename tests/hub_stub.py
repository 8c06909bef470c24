"""A loopback stand-in for the Hugging Face Hub's file server, and the fixtures built on it.

A pytest plugin (``pytest_plugins = ['hub_stub']`` in test_hub.py and test_cli.py): fixtures
``hub``, ``converted`` (one conversion for the whole session), ``code_in_pickle``, ``child_env``
and ``single_thread``.

The tests run without network. ``hf_hub_download`` (huggingface_hub 2.x) needs only this of the Hub:
a HEAD, then a GET, on ``/<org>/<repo>/resolve/<revision>/<filename>``, answered with the file's
``ETag``, the ``X-Repo-Commit`` it resolved to and its ``Content-Length``; a missing repo, revision
or file is a 404 whose ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``)
selects the exception huggingface_hub raises. Each served repo is a local folder.

It can also misbehave as the tests need: ``silent`` accepts connections and never answers,
``any_revision`` resolves every revision (as the Hub resolves branch and tag names) and
``damaged`` lists ``(repo_id, filename)`` whose bytes it alters on the way while stating the
true file's ETag (its sha256) and size.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` when it is imported, so
the in-process fixture patches the constants it derived from them; a subprocess gets the variables.
"""
import argparse
import hashlib
import http.server
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest
import timm
import torch
from huggingface_hub import constants

from naive_epsanet import randomize_batchnorm_
from timm_epsa.hub.convert import convert_checkpoint

# The server stops by itself after this long, should a test never stop it.
LIFETIME_S = 600
# A training argument a checkpoint could record, which would close the card's code block and add a
# heading and raw HTML to the card, were it pasted in as it is.
HOSTILE_AA = 'rand-m9\n```\n# Injected heading\n<img src=x onerror=alert(1)>'


class HubStub:
    """Serves folders as Hub model repos on 127.0.0.1 at an ephemeral port, from a daemon thread."""

    def __init__(self):
        self.repos: Dict[str, Path] = {}
        self.requests: List[Tuple[str, str]] = []  # (method, path) of every request, in order
        self.silent = False
        self.any_revision = False
        self.damaged: Set[Tuple[str, str]] = set()
        self._stopped = threading.Event()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 30  # a client that stops talking cannot hold a thread for longer

            def do_HEAD(self):
                stub._answer(self, send_body=False)

            def do_GET(self):
                stub._answer(self, send_body=True)

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
        self._deadline = threading.Timer(LIFETIME_S, self.stop)
        self._deadline.daemon = True

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f'http://{host}:{port}'

    def env(self, hf_home: Path) -> Dict[str, str]:
        """Environment variables that point a new process's huggingface_hub here."""
        return {'HF_ENDPOINT': self.url, 'HF_HOME': str(hf_home), 'NO_PROXY': '127.0.0.1'}

    def serve(self, repo_id: str, folder: Path) -> None:
        self.repos[repo_id] = Path(folder)

    def commit(self, repo_id: str) -> str:
        """A stable commit hash for the repo's current content."""
        digest = hashlib.sha1()
        for path in sorted(self.repos[repo_id].iterdir()):
            digest.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()

    def start(self) -> 'HubStub':
        self._thread.start()
        self._deadline.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._deadline.cancel()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def _answer(self, handler: http.server.BaseHTTPRequestHandler, send_body: bool) -> None:
        self.requests.append((handler.command, handler.path))
        if self.silent:
            self._stopped.wait(LIFETIME_S)
            handler.close_connection = True
            return
        parts = handler.path.split('?')[0].strip('/').split('/')
        if len(parts) < 5 or parts[2] != 'resolve':
            return self._error(handler, 404, 'RepoNotFound', 'Repository not found')
        repo_id, revision, filename = '/'.join(parts[:2]), parts[3], '/'.join(parts[4:])
        if repo_id not in self.repos:
            return self._error(handler, 404, 'RepoNotFound', 'Repository not found')
        commit = self.commit(repo_id)
        if revision not in ('main', commit) and not self.any_revision:
            return self._error(handler, 404, 'RevisionNotFound', 'Invalid rev id', commit=None)
        path = self.repos[repo_id] / filename
        if not path.is_file():
            return self._error(handler, 404, 'EntryNotFound', 'Entry not found', commit=commit)
        content = path.read_bytes()
        handler.send_response(200)
        handler.send_header('Content-Length', str(len(content)))
        handler.send_header('ETag', f'"{hashlib.sha256(content).hexdigest()}"')
        handler.send_header('X-Repo-Commit', commit)
        handler.end_headers()
        if send_body:
            if (repo_id, filename) in self.damaged:  # the last byte: a safetensors file stays valid
                content = content[:-1] + bytes([content[-1] ^ 1])
            handler.wfile.write(content)

    @staticmethod
    def _error(handler, status: int, code: str, message: str, commit: Optional[str] = None) -> None:
        handler.send_response(status)
        handler.send_header('X-Error-Code', code)
        handler.send_header('X-Error-Message', message)
        if commit:
            handler.send_header('X-Repo-Commit', commit)
        handler.send_header('Content-Length', '0')
        handler.end_headers()


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: the tests' inputs are tiny, and on a machine whose cores are shared
    each extra thread only waits for the others (a 32 px forward pass takes seconds instead of ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def single_thread() -> Iterator[None]:
    with one_thread():
        yield


class _CreatesFile:
    """Unpickling this creates a file: a stand-in for a pickle that runs code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, 'w')


@pytest.fixture
def code_in_pickle(tmp_path) -> Tuple[object, Path]:
    """(payload, marker): pickled and loaded unsafely, ``payload`` creates the file ``marker``."""
    marker = tmp_path / 'code-ran'
    return _CreatesFile(marker), marker


@pytest.fixture
def child_env() -> Dict[str, str]:
    """The environment for a child interpreter: this one's, on one thread (see :func:`one_thread`)."""
    return {**os.environ, 'OMP_NUM_THREADS': '1'}


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Iterator[HubStub]:
    """A running :class:`HubStub` that this process's huggingface_hub downloads from, with an empty
    cache in ``tmp_path``."""
    stub = HubStub().start()
    monkeypatch.setenv('NO_PROXY', '127.0.0.1')
    monkeypatch.setattr(constants, 'ENDPOINT', stub.url)
    monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE', stub.url + '/{repo_id}/resolve/{revision}/{filename}')
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hf-cache'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    yield stub
    stub.stop()


@pytest.fixture(scope='session')
def converted(tmp_path_factory) -> Tuple[Path, Path, torch.nn.Module]:
    """(checkpoint, folder, source): what timm's train.py saves for epsanet50 (random weights with
    non-trivial BN statistics, an EMA copy, its args, one of which is :data:`HOSTILE_AA`), the folder
    ``timm-epsa convert`` made of it, and the model the plain weights make, in eval mode. Made once,
    for the tests that only read them."""
    root = tmp_path_factory.mktemp('converted')
    checkpoint = root / 'checkpoint-119.pth.tar'
    with one_thread():
        torch.manual_seed(0)
        source = timm.create_model('epsanet50')
        randomize_batchnorm_(source)
        state_dict = source.state_dict()
        torch.save({
            'epoch': 119,
            'arch': 'epsanet50',
            'state_dict': state_dict,
            'state_dict_ema': {k: v * 1.01 if v.is_floating_point() else v for k, v in state_dict.items()},
            'metric': 77.41,
            'args': argparse.Namespace(
                model='epsanet50', epochs=120, opt='sgd', lr=0.1, eval_metric='top1', aa=HOSTILE_AA),
            'version': 2,
        }, checkpoint)
        folder = convert_checkpoint(checkpoint, root / 'epsanet50.in1k', 'epsanet50', top1=77.4, top5=93.5).path
    return checkpoint, folder, source.eval()
