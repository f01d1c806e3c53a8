"""Corrupted checkpoints, and the security properties: no pickle on untrusted data, Redis AUTH, gRPC TLS."""

from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

import grpc
import pytest
import redis
import torch
from _fakes import PolicyServerUnderTest, hello, report, states

from gsrl.config import TLSConfig
from gsrl.redis_conn import configure_local, connect, retry
from gsrl.redis_server import LocalRedis
from gsrl.tls import open_channel
from gsrl.v1 import rollout_pb2_grpc
from services.learner.checkpoint import CheckpointError, resume_latest, save_checkpoint

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


class _FakeDeepSpeed:
    """Just enough of DeepSpeedEngine for checkpoint.py: a module and save/load of an 'optimizer' file."""

    def __init__(self) -> None:
        self.module = torch.nn.Linear(3, 2)
        self.engine = self
        self.loaded: list[str] = []

    def save_checkpoint(self, directory: str, tag: str) -> None:
        path = Path(directory) / tag
        path.mkdir(parents=True, exist_ok=True)
        (path / "optim_states.pt").write_bytes(b"optimizer-state-" + tag.encode())

    def load_checkpoint(self, directory: str, tag: str, load_module_strict: bool = True):
        self.loaded.append(tag)
        return directory, {}


def test_corrupted_checkpoint_falls_back_then_fails_clearly(tmp_path: Path, caplog) -> None:
    engine = _FakeDeepSpeed()
    for updates in (2, 4):
        save_checkpoint(tmp_path, engine, updates, updates, rank=0, keep=3)
    newest = tmp_path / "checkpoints" / "update_000004"
    meta = json.loads((newest / "meta.json").read_text())
    assert "model.safetensors" in meta["files"] and any("optim_states" in k for k in meta["files"])

    blob = newest / "model.safetensors"
    blob.write_bytes(blob.read_bytes()[:-7] + b"garbage")
    resumed = resume_latest(tmp_path, engine)
    assert resumed is not None and resumed.updates == 2 and engine.loaded == ["update_000002"]
    assert any(str(blob) in r.getMessage() and "corrupted" in r.getMessage() for r in caplog.records)

    older = tmp_path / "checkpoints" / "update_000002" / "meta.json"
    older.write_text("{ not json")
    with pytest.raises(CheckpointError) as err:
        resume_latest(tmp_path, engine)
    assert str(blob) in str(err.value) and str(older) in str(err.value)
    assert resume_latest(tmp_path / "fresh-run", engine) is None


UNSAFE_CALLS = {"pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}


def test_no_pickle_or_unsafe_torch_load_in_the_code() -> None:
    problems = []
    for path in [*ROOT.glob("gsrl/**/*.py"), *ROOT.glob("services/**/*.py")]:
        if "/v1/" in str(path):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any((n or "").split(".")[0] in UNSAFE_CALLS for n in names):
                    problems.append(f"{path}:{node.lineno}: imports {names}")
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                if func.endswith(".load") and func.split(".")[0] in ("torch", "pickle"):
                    safe = any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in node.keywords)
                    if not safe:
                        problems.append(f"{path}:{node.lineno}: {func}() without weights_only=True")
                if func in ("eval", "exec") or func.endswith("yaml.load") or func.endswith("unsafe_load"):
                    problems.append(f"{path}:{node.lineno}: {func}()")
    assert problems == []


def test_redis_password_is_required_when_configured(tmp_path: Path) -> None:
    with LocalRedis(tmp_path / "redis") as local_redis:
        configure_local(redis.Redis(port=local_redis.port), appendfsync="always", password="s3cret-pw")
        anonymous = redis.Redis(port=local_redis.port)
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
        with pytest.raises(redis.exceptions.AuthenticationError):  # not mistaken for a restart and retried forever
            retry(anonymous.ping, "PING", give_up_s=60)
        assert connect(local_redis.url, password="s3cret-pw").ping()
        assert connect(f"redis://:s3cret-pw@127.0.0.1:{local_redis.port}/0").ping()
        with pytest.raises(redis.exceptions.AuthenticationError):
            connect(local_redis.url, password="wrong").ping()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=gsrl-policy",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


def test_grpc_tls(tmp_path: Path) -> None:
    key, cert = _self_signed(tmp_path)
    tls = TLSConfig(enabled=True, cert_file=str(cert), key_file=str(key), ca_file=str(cert))
    server = PolicyServerUnderTest(None, tls=tls)
    try:
        with open_channel(server.address, tls, 1 << 20) as channel:
            responses = list(
                rollout_pb2_grpc.PolicyServiceStub(channel).Rollout(iter([hello(2), report(0, states(2))]))
            )
        assert len(responses) == 1
        with grpc.insecure_channel(server.address) as plain:  # a plaintext client gets nowhere
            with pytest.raises(grpc.RpcError) as err:
                list(rollout_pb2_grpc.PolicyServiceStub(plain).Rollout(iter([hello(2)]), timeout=5))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        other_key, other_cert = _self_signed(tmp_path / "other" if (tmp_path / "other").mkdir() is None else tmp_path)
        untrusted = TLSConfig(enabled=True, ca_file=str(other_cert))
        with open_channel(server.address, untrusted, 1 << 20) as channel:  # a server the client does not trust
            with pytest.raises(grpc.RpcError) as err:
                list(rollout_pb2_grpc.PolicyServiceStub(channel).Rollout(iter([hello(2)]), timeout=5))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
