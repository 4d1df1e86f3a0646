"""TLS in the client and the CLI, against a local TLS endpoint with certificates made here.

The server is a test double at the network boundary only (a plain ``grpc.server`` serving
``smartpath.v1.Pathology`` with two canned answers): what is under test is the client's channel
security, i.e. which CAs it trusts, which name it checks and that the bearer token arrives.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from smartpath.client.cli import main
from smartpath.client.rpc import PathologyClient, Tls, is_loopback
from smartpath.v1 import common_pb2, pathology_pb2, pathology_pb2_grpc
from tests.conftest import free_port

TOKEN = "tls-token-9b2e"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def make(cls, common_name: str) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def issue(self, dns_names: Sequence[str], ips: Sequence[str] = ()) -> tuple[bytes, bytes]:
        """A server certificate for these names: (key PEM, certificate PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        san = [x509.DNSName(n) for n in dns_names]
        san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(dns_names[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM)


class FakePathology(pathology_pb2_grpc.PathologyServicer):
    """Two canned answers; GetModelInfo echoes the authorization header in ``version``."""

    def GetModelInfo(self, request, context):
        metadata = dict(context.invocation_metadata())
        return pathology_pb2.GetModelInfoResponse(
            name="tls-test", version=metadata.get("authorization", "")
        )

    def AnalyzeRegion(self, request, context):
        analysis = pathology_pb2.Analysis(
            task=common_pb2.TASK_VQA, scale=common_pb2.SCALE_ROI, answer="ok", parsed=True
        )
        return pathology_pb2.AnalyzeRegionResponse(analysis=analysis)


@dataclass(frozen=True)
class Endpoint:
    ca_file: Path  # the CA that issued both server certificates
    wrong_ca_file: Path  # a CA that issued neither
    address: str  # certificate for localhost and 127.0.0.1
    other_name_address: str  # certificate for smartpath.test only
    roi: Path


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    root = tmp_path_factory.mktemp("tls")
    ca, wrong = Ca.make("smartpath test CA"), Ca.make("some other CA")
    (root / "ca.pem").write_bytes(ca.pem)
    (root / "wrong-ca.pem").write_bytes(wrong.pem)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pathology_pb2_grpc.add_PathologyServicer_to_server(FakePathology(), server)
    ports = []
    for dns, ips in ((["localhost"], ["127.0.0.1"]), (["smartpath.test"], [])):
        port = free_port()
        credentials = grpc.ssl_server_credentials([ca.issue(dns, ips)])
        assert server.add_secure_port(f"127.0.0.1:{port}", credentials) == port
        ports.append(port)
    server.start()

    from PIL import Image

    roi = root / "roi.png"
    Image.new("RGB", (32, 32), (200, 120, 160)).save(roi)
    try:
        yield Endpoint(
            root / "ca.pem",
            root / "wrong-ca.pem",
            f"127.0.0.1:{ports[0]}",
            f"127.0.0.1:{ports[1]}",
            roi,
        )
    finally:
        server.stop(grace=None)


def _code(client: PathologyClient) -> grpc.StatusCode:
    with client, pytest.raises(grpc.RpcError) as err:
        client.model_info()
    return err.value.code()


def test_valid_ca_connects_and_the_token_arrives(endpoint: Endpoint) -> None:
    tls = Tls(ca_file=endpoint.ca_file)
    with PathologyClient(endpoint.address, token=TOKEN, timeout_s=10, tls=tls) as client:
        info = client.model_info()
    assert info.name == "tls-test"
    assert info.version == f"Bearer {TOKEN}"
    with PathologyClient(f"localhost:{endpoint.address.rsplit(':')[1]}", tls=tls) as client:
        assert client.model_info().name == "tls-test"


def test_wrong_ca_is_unavailable(endpoint: Endpoint) -> None:
    tls = Tls(ca_file=endpoint.wrong_ca_file)
    client = PathologyClient(endpoint.address, token=TOKEN, timeout_s=10, tls=tls)
    assert _code(client) == grpc.StatusCode.UNAVAILABLE


def test_system_roots_do_not_trust_a_private_ca(endpoint: Endpoint) -> None:
    assert _code(PathologyClient(endpoint.address, timeout_s=10, tls=Tls())) == (
        grpc.StatusCode.UNAVAILABLE
    )


def test_server_name_override(endpoint: Endpoint) -> None:
    tls = Tls(ca_file=endpoint.ca_file, server_name="smartpath.test")
    with PathologyClient(endpoint.other_name_address, timeout_s=10, tls=tls) as client:
        assert client.model_info().name == "tls-test"
    without = PathologyClient(
        endpoint.other_name_address, timeout_s=10, tls=Tls(ca_file=endpoint.ca_file)
    )
    assert _code(without) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_against_tls_is_unavailable(endpoint: Endpoint) -> None:
    assert _code(PathologyClient(endpoint.address, timeout_s=10)) == grpc.StatusCode.UNAVAILABLE


def test_unreadable_or_non_pem_ca_file_is_a_value_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.pem"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        PathologyClient("127.0.0.1:1", tls=Tls(ca_file=missing))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=re.escape(f"{junk} holds no PEM certificate")):
        PathologyClient("127.0.0.1:1", tls=Tls(ca_file=junk))


def test_is_loopback() -> None:
    for address in ("127.0.0.1:1", "localhost:1", "[::1]:1", "dns:///localhost:1", "unix:/s"):
        assert is_loopback(address), address
    for address in ("10.0.0.1:1", "smartpath.example.org:443", "[2001:db8::1]:443"):
        assert not is_loopback(address), address


def _analyze(endpoint: Endpoint, out: Path, *extra: str) -> list[str]:
    argv = ["analyze", str(endpoint.roi), "--image", "--task", "vqa", "--prompt", "x"]
    return [*argv, "--out", str(out), *extra]


def test_cli_analyze_over_tls(
    endpoint: Endpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    argv = _analyze(endpoint, tmp_path / "out", "--address", endpoint.address)
    argv += ["--ca-file", str(endpoint.ca_file), "--token-file", str(token_file)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["answer"] == "ok"
    assert "warning" not in captured.err

    argv = _analyze(endpoint, tmp_path / "out2", "--address", endpoint.other_name_address)
    argv += ["--ca-file", str(endpoint.ca_file), "--server-name", "smartpath.test"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == "ok"


def test_cli_wrong_ca_is_a_one_line_error(
    endpoint: Endpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _analyze(endpoint, tmp_path / "out", "--address", endpoint.address)
    assert main([*argv, "--ca-file", str(endpoint.wrong_ca_file)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("smartpath: error: UNAVAILABLE:")
    assert len(err.splitlines()) == 1 and "Traceback" not in err

    assert main([*argv, "--ca-file", str(tmp_path / "nope.pem")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smartpath: error: cannot read CA file") and "nope.pem" in err


def test_cli_warns_of_a_clear_text_token(
    endpoint: Endpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    # 0.0.0.0 is not a loopback address (yet reaches this host, where nothing listens on the
    # port: the call fails at once); the warning comes before.
    address = f"0.0.0.0:{free_port()}"
    argv = _analyze(endpoint, tmp_path / "out", "--address", address)
    assert main([*argv, "--token-file", str(token_file), "--tls", "--server-name", "x"]) == 1
    assert "warning" not in capsys.readouterr().err
    assert main([*argv, "--token-file", str(token_file)]) == 1
    err = capsys.readouterr().err
    assert f"smartpath: warning: sending the bearer token to {address} in clear text" in err
    assert "UNAVAILABLE" in err


def test_cli_local_refuses_tls_options(
    endpoint: Endpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for option in (["--tls"], ["--ca-file", str(endpoint.ca_file)], ["--server-name", "x"]):
        assert main([*_analyze(endpoint, tmp_path / "out", "--local"), *option]) == 2
        assert "--local runs in this process: leave out --address" in capsys.readouterr().err
