"""An OCI registry (GHCR, ECR, Harbor, Artifactory, the reference `docker-registry`) through the ORAS Python SDK.

`oci://host[:port]/repository` holds each name at `host/repository/<name>`, one tag per version plus the moving
tags. Loopback hosts are spoken to over plain HTTP (as Docker does); others over HTTPS unless
SLIMFORMER_REGISTRY_PLAIN_HTTP=1. Credentials come from SLIMFORMER_REGISTRY_USER / SLIMFORMER_REGISTRY_PASSWORD,
else from the Docker credential file ($DOCKER_CONFIG/config.json, else ~/.docker/config.json, with its credential
helpers), never from recipes or run folders. The registry's answer to `GET /v2/` picks basic or token auth.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from .files import CHUNK
from .layout import MANIFEST_TYPE
from ..errors import RegistryError

USER_ENV, PASSWORD_ENV = "SLIMFORMER_REGISTRY_USER", "SLIMFORMER_REGISTRY_PASSWORD"
PLAIN_HTTP_ENV = "SLIMFORMER_REGISTRY_PLAIN_HTTP"
LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
PROBE_TIMEOUT_S = 15


def parse_url(url: str) -> tuple[str, str]:
    host, _, repository = url.removeprefix("oci://").partition("/")
    if not url.startswith("oci://") or not host or not repository.strip("/"):
        raise RegistryError(f"registry '{url}': expected oci://host[:port]/repository, e.g. "
                            "oci://ghcr.io/acme/models or oci://127.0.0.1:5000/slim")
    return host, repository.strip("/")


def docker_config() -> Path:
    return Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "config.json"


def _speaks(method):
    """Turn the SDK's and requests' exceptions into a RegistryError that names the registry."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        import requests

        try:
            return method(self, *args, **kwargs)
        except (requests.RequestException, ValueError) as e:
            raise RegistryError(f"registry {self.location}: {e}") from None
    return wrapper


class OciStore:
    def __init__(self, url: str):
        import oras.provider

        self.host, self.prefix = parse_url(url)
        self.location = url
        plain = self.host.rsplit(":", 1)[0] in LOOPBACK or os.environ.get(PLAIN_HTTP_ENV) == "1"
        self.scheme = "http" if plain else "https"
        challenge = self._probe()
        basic = challenge.lower().startswith("basic")
        self.registry = oras.provider.Registry(hostname=self.host, insecure=plain,
                                               auth_backend="basic" if basic else "token")
        if challenge:
            self._login(basic)

    def where(self, name: str, ref: str) -> str:
        return f"{self.host}/{self.prefix}/{name}:{ref}"

    def _probe(self) -> str:
        """'' when the registry needs no credentials, else its WWW-Authenticate challenge."""
        import requests

        url = f"{self.scheme}://{self.host}/v2/"
        try:
            r = requests.get(url, timeout=PROBE_TIMEOUT_S)
        except requests.RequestException as e:
            hint = f"; a registry without TLS needs {PLAIN_HTTP_ENV}=1" if self.scheme == "https" else ""
            raise RegistryError(f"cannot reach registry {self.location} ({url}): {e.__class__.__name__}{hint}") from None
        if r.status_code == 401:
            return r.headers.get("WWW-Authenticate", "Bearer")
        if r.status_code != 200:
            raise RegistryError(f"{url} answered HTTP {r.status_code}: is {self.host} an OCI registry?")
        return ""

    def _login(self, basic: bool) -> None:
        import requests

        user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
        if user and password:
            self.registry.auth.set_basic_auth(user, password)
        elif docker_config().is_file():
            self.registry.auth.load_configs(self._container("_"), configs=[str(docker_config())])
        if not basic:
            return  # token registries: the SDK trades these credentials (or none, for public reads) for a token
        if not getattr(self.registry.auth, "_basic_auth", None):
            raise RegistryError(f"registry {self.location} needs credentials: set {USER_ENV} and {PASSWORD_ENV}, "
                                f"or log in with `docker login {self.host}` (read from {docker_config()})")
        self.registry.headers.update(self.registry.auth.get_auth_header())
        r = requests.get(f"{self.scheme}://{self.host}/v2/", headers=self.registry.headers, timeout=PROBE_TIMEOUT_S)
        if r.status_code != 200:
            who = f"user '{user}' from {USER_ENV}" if user else f"the credentials in {docker_config()}"
            raise RegistryError(f"registry {self.location} refused {who} (HTTP {r.status_code})")

    def _container(self, name: str, ref: str = "latest"):
        import oras.container

        container = oras.container.Container(f"{name}:{ref}", registry=self.host)
        container.namespace = self.prefix  # set, not parsed: a prefix like "my.org/x" would parse as a host
        return container

    @_speaks
    def names(self) -> list[str]:
        import urllib.parse

        url, repositories = f"{self.scheme}://{self.host}/v2/_catalog", []
        while url:
            r = self.registry.do_request(url, "GET")
            if r.status_code != 200:
                raise RegistryError(f"registry {self.location} does not list its repositories (HTTP {r.status_code} "
                                    "from /v2/_catalog); give a NAME: slimformer ls REGISTRY NAME")
            repositories += r.json().get("repositories") or []
            following = r.links.get("next", {}).get("url")
            url = urllib.parse.urljoin(url, following) if following else None
        start = self.prefix + "/"
        return sorted(repo[len(start):] for repo in repositories
                      if repo.startswith(start) and "/" not in repo[len(start):])

    @_speaks
    def tags(self, name: str) -> list[str]:
        container = self._container(name)
        r = self.registry.do_request(f"{self.scheme}://{container.tags_url()}", "GET")
        if r.status_code == 404:
            return []
        return list(self.registry.get_tags(container))

    @_speaks
    def manifest(self, name: str, ref: str) -> tuple[dict, str] | None:
        container = self._container(name, ref)
        r = self.registry.do_request(f"{self.scheme}://{container.manifest_url()}", "GET",
                                     headers={"Accept": MANIFEST_TYPE})
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise RegistryError(f"{self.where(name, ref)}: manifest request answered HTTP {r.status_code}")
        return json.loads(r.content), "sha256:" + hashlib.sha256(r.content).hexdigest()

    @_speaks
    def has_blob(self, name: str, digest: str) -> bool:
        return self.registry.blob_exists({"digest": digest}, self._container(name))

    def blob_chunks(self, name: str, digest: str):
        import requests

        try:
            with self.registry.get_blob(self._container(name), digest, stream=True) as r:
                if r.status_code != 200:
                    raise RegistryError(f"{self.where(name, digest)}: blob request answered HTTP {r.status_code}")
                yield from r.iter_content(CHUNK)
        except (requests.RequestException, ValueError) as e:
            raise RegistryError(f"registry {self.location}: {e}") from None

    @_speaks
    def put_blob(self, name: str, source: Path, digest: str, size: int, media_type: str) -> None:
        layer = {"mediaType": media_type, "digest": digest, "size": size}
        r = self.registry.upload_blob(str(source), self._container(name), layer)
        if r.status_code not in (200, 201, 202):
            raise RegistryError(f"{self.where(name, digest)}: upload of {source} answered HTTP {r.status_code}: "
                                f"{r.text[:300]}")

    @_speaks
    def put_manifest(self, name: str, manifest: dict, tags: list[str]) -> str:
        """PUT the manifest once per tag, in order: the version first, then each moving tag."""
        digest = None
        for tag in tags:
            r = self.registry.upload_manifest(manifest, self._container(name, tag))
            if r.status_code not in (200, 201, 202):
                raise RegistryError(f"{self.where(name, tag)}: manifest upload answered HTTP {r.status_code}: "
                                    f"{r.text[:300]}")
            digest = r.headers.get("Docker-Content-Digest", digest)
        return digest
