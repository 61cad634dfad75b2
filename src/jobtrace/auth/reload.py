"""Reloads the credential files while serving (the tokens file, the JWT public
key, the TLS certificate and key), and any other file the server watches (the
failure rules), on SIGHUP and when one of them changes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from jobtrace.auth import Authenticator, load_tokens_file
from jobtrace.config import Settings

log = logging.getLogger(__name__)

# What identifies one version of a file: device, inode, size, mtime, ctime
# (None while the file cannot be read). A rename over the file changes the
# inode; an edit in place changes the size or the times.
Stamp = tuple[int, int, int, int, int] | None


def stamp(path: Path) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_jwt_public_key(path: Path) -> str:
    """The RS256 public key (PEM) in `path`, checked to be one."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    text = path.read_text()
    try:
        key = load_pem_public_key(text.encode())
    except ValueError as exc:
        raise ValueError(f"{path}: not a PEM public key: {exc}") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"{path}: not an RSA public key (RS256 needs one)")
    return text


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None

    def load(self) -> grpc.ServerCertificateConfiguration:
        """The certificate configuration in the files, checked: the chain and
        key parse and the key belongs to the certificate."""
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import (
            Encoding,
            PublicFormat,
            load_pem_private_key,
        )

        try:
            cert = self.cert.read_bytes()
            key = self.key.read_bytes()
            ca = self.client_ca.read_bytes() if self.client_ca is not None else None
        except OSError as exc:
            raise OSError(f"cannot read TLS files: {exc}") from exc
        try:
            chain = x509.load_pem_x509_certificates(cert)
        except ValueError as exc:
            raise ValueError(f"{self.cert}: not a PEM certificate: {exc}") from exc
        try:
            private = load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{self.key}: not an unencrypted PEM private key: {exc}") from exc
        spki = (Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        if private.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
            raise ValueError(f"{self.key} is not the key of the certificate in {self.cert}")
        if ca is not None:
            try:
                x509.load_pem_x509_certificates(ca)
            except ValueError as exc:
                raise ValueError(f"{self.client_ca}: not a PEM certificate: {exc}") from exc
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


@dataclass
class _Source:
    """One reloadable set of files: how to load it (blocking; OSError or
    ValueError when unusable) and how to put it in service (on the loop,
    returning what changed, for the log)."""

    what: str
    paths: tuple[Path, ...]
    load: Callable[[], Any]
    apply: Callable[[Any], str]
    loaded: tuple[Stamp, ...] = ()
    # A change seen at the last poll, loaded once the files stay the same for
    # one more interval (a file still being written is not loaded half-way).
    seen: tuple[Stamp, ...] | None = None

    def stamps(self) -> tuple[Stamp, ...]:
        return tuple(stamp(p) for p in self.paths)


@dataclass
class CredentialFiles:
    """Keeps the server's credentials in step with their files. A reload is
    all or nothing per file set: a file that does not load (half-written,
    invalid, gone) keeps the credentials in service and logs an error."""

    auth: Authenticator
    tls: TlsFiles | None = None
    _sources: list[_Source] = field(default_factory=list)
    _tls_initial: grpc.ServerCertificateConfiguration | None = None
    _tls_pending: grpc.ServerCertificateConfiguration | None = None
    _tls_lock: threading.Lock = field(default_factory=threading.Lock)
    _requested: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    @classmethod
    def open(cls, settings: Settings, auth: Authenticator) -> CredentialFiles:
        """The files of these settings, read once (OSError when unusable)."""
        s = settings
        tls = None
        if s.tls_cert:
            tls = TlsFiles(
                Path(s.tls_cert),
                Path(s.tls_key),
                Path(s.tls_client_ca) if s.tls_client_ca else None,
            )
        files = cls(auth, tls)
        if tls is not None:
            try:
                files._tls_initial = tls.load()
            except ValueError as exc:
                raise OSError(f"cannot load TLS files: {exc}") from exc
        if s.tokens_file:
            files._sources.append(
                _Source(
                    "tokens file",
                    (Path(s.tokens_file),),
                    lambda: load_tokens_file(Path(s.tokens_file)),
                    lambda tokens: str(auth.replace_tokens(tokens)),
                )
            )
        jwt = auth.jwt
        if jwt is not None and jwt.algorithm == "RS256" and s.jwt_public_key_file:
            files._sources.append(
                _Source(
                    "JWT public key",
                    (Path(s.jwt_public_key_file),),
                    lambda: read_jwt_public_key(Path(s.jwt_public_key_file)),
                    files._apply_jwt_key,
                )
            )
        if tls is not None:
            paths = (tls.cert, tls.key) + ((tls.client_ca,) if tls.client_ca else ())
            files._sources.append(_Source("TLS certificate", paths, tls.load, files._apply_tls))
        for source in files._sources:
            source.loaded = source.stamps()
        return files

    def watch(
        self, what: str, path: Path, load: Callable[[], Any], apply: Callable[[Any], str]
    ) -> None:
        """Reload another file as these are: `load` (blocking; OSError or
        ValueError when unusable) and `apply` (on the loop; what changed, for
        the log). Its current version counts as loaded."""
        source = _Source(what, (path,), load, apply)
        source.loaded = source.stamps()
        self._sources.append(source)

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS credentials whose certificate follows the files (new connections
        get the reloaded one; open connections keep theirs)."""
        assert self.tls is not None and self._tls_initial is not None
        return grpc.dynamic_ssl_server_credentials(
            self._tls_initial,
            self._fetch_tls,
            require_client_authentication=self.tls.client_ca is not None,
        )

    def _fetch_tls(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC on its own thread at each TLS handshake: None keeps
        # the current certificate.
        with self._tls_lock:
            pending, self._tls_pending = self._tls_pending, None
        return pending

    def _apply_tls(self, config: grpc.ServerCertificateConfiguration) -> str:
        with self._tls_lock:
            self._tls_pending = config
        return "new connections get it"

    def _apply_jwt_key(self, key: str) -> str:
        jwt = self.auth.jwt
        assert jwt is not None
        unchanged = jwt.key == key
        self.auth.replace_jwt(replace(jwt, key=key))
        return "unchanged" if unchanged else "new key in use"

    # --- running ------------------------------------------------------------

    def start(self, interval_s: float) -> None:
        """Poll the files every `interval_s` seconds (0: only on request)."""
        if self._sources:
            self._task = asyncio.create_task(self._run(interval_s), name="jobtrace-reload")

    def request_reload(self) -> None:
        """Reload every file now, changed or not (SIGHUP)."""
        self._requested.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, interval_s: float) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s if interval_s > 0 else None):
                    await self._requested.wait()
            forced = self._requested.is_set()
            self._requested.clear()
            for source in self._sources:
                await self._poll(source, forced)

    async def _poll(self, source: _Source, forced: bool) -> None:
        current = source.stamps()
        if not forced:
            if current == source.loaded:
                source.seen = None
                return
            if current != source.seen:
                source.seen = current  # changed: load it once it has settled
                return
        source.seen = None
        source.loaded = current  # a file that fails to load is retried when it changes again
        try:
            value = await asyncio.to_thread(source.load)
        except (OSError, ValueError) as exc:
            log.error(
                "reloading the %s failed; the current one stays in service: %s",
                source.what,
                exc,
                extra={"reload": source.what},
            )
            return
        outcome = source.apply(value)
        log.info("%s reloaded: %s", source.what, outcome, extra={"reload": source.what})
