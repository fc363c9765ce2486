"""Build the agent image where no registry is reachable: `python -m tools.image` (what `./dev.sh image` runs).

Why it is done this way:
- No registry: the Dockerfile's default base (python:3.11-slim-bookworm) cannot be pulled. A stand-in is made
  from Debian packages instead: `debootstrap --variant=minbase bookworm` with python3 and python3-venv (whose
  ensurepip gives pip), from the mirror this machine's apt uses, trimmed like Debian's slim images and imported
  with `docker import` as keelson-base:bookworm. The tarball is cached in .local/image/base-<key>/ (the key
  hashes the recipe), so only the first run pays for debootstrap.
- No network in RUN steps: the build engine is a private dockerd (tools.dockerd) in a network namespace of
  its own, so that building never touches the host's iptables, bridges or /var/lib/docker. Its RUN steps
  therefore have no network, and the build runs with OFFLINE=1: pip installs from deploy/wheelhouse/wheels
  (`pip wheel` of the dependencies, run here on the host, where PyPI is reachable) and apt from
  deploy/wheelhouse/debs (the .debs that `apt-get install --download-only serf` fetched into the base
  rootfs, so exactly what that base lacks). The same Dockerfile builds online with OFFLINE=0.
- Result: the image saved with `docker save` to .local/image/agent-<key>.tar, where the key hashes every
  build input (Dockerfile, .dockerignore, the allowlisted sources, the wheelhouse, the base); an unchanged tree
  reuses it at once. .local/image/agent.json names the current tarball and tag.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tools.debs import DebError
from tools.debs import fetch as fetch_trixie
from tools.dockerd import DOCKER_CLI, PrivateDockerd, new_run_id

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE_DIR = REPO_ROOT / ".local" / "image"
WHEELHOUSE = REPO_ROOT / "deploy" / "wheelhouse"
DEFAULT_TAG = "keelson/agent:latest"
BASE_TAG = "keelson-base:bookworm"
SUITE = "bookworm"
# What the stand-in base holds besides minbase (python:3.11-slim-bookworm has ca-certificates and netbase too).
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "netbase")
# What the Dockerfile's final stage installs with apt.
RUNTIME_DEBS = ("serf",)
# ... and from Debian trixie (tools/debs.py: Compose v2 for Edge stacks, the CLI for `docker stack deploy`).
TRIXIE_DEBS = ("docker-compose", "docker-cli")
# Bump when the base recipe changes in a way the key does not see.
BASE_RECIPE = 3
# The build context, as .dockerignore allows it (test_image.py checks that both lists agree).
CONTEXT_PATHS = ("pyproject.toml", "README.md", "agent", "proxy", "browse", "edge", "deploy/healthcheck.py",
                 "deploy/wheelhouse")
# Trimmed as Debian's slim images are: no documentation, manuals or translations (copyrights stay).
DPKG_EXCLUDES = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
"""
APT_CLEAN = """\
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
"""

Log = Callable[[str], None]


class ImageError(RuntimeError):
    """A prerequisite is missing or a build step failed; the message says which and how to get it."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


def _log(msg: str) -> None:
    print(f"[tools.image] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], what: str, timeout: float = 1800, **kw: object) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(cmd, text=True, capture_output=True, timeout=timeout, check=False,
                             **kw)  # type: ignore[call-overload]
    except subprocess.TimeoutExpired:
        raise ImageError(f"{what}: did not finish within {timeout:.0f}s") from None
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-25:])
        raise ImageError(f"{what} failed ({res.returncode}):\n{tail}", res.stdout + res.stderr)
    assert isinstance(res, subprocess.CompletedProcess)
    return res


# ---------------------------------------------------------------------- prerequisites


def require_tools(*tools: str) -> None:
    hints = {"debootstrap": "apt-get install -y debootstrap (./dev.sh image installs it)",
             "dockerd": "apt-get install -y docker.io", "nsenter": "apt-get install -y util-linux",
             "tar": "apt-get install -y tar"}
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ImageError("missing " + ", ".join(f"{t} ({hints.get(t, 'install it')})" for t in missing))
    if os.geteuid() != 0:
        raise ImageError("building the image needs root (debootstrap, a private dockerd in a network namespace)")


def debian_mirror(apt_dir: Path = Path("/etc/apt"), suite: str = SUITE) -> str:
    """The Debian mirror this machine's apt uses for `suite` main (sources.list or deb822 .sources)."""
    candidates: list[tuple[str, list[str], list[str]]] = []  # (uri, suites, components)
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in files:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()  # drop [options]
                if len(words) >= 4 and words[0] == "deb":
                    candidates.append((words[1], [words[2]], words[3:]))
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", path.read_text()):
                fields: dict[str, str] = {}
                for raw in stanza.splitlines():
                    if raw.startswith("#") or ":" not in raw or raw[:1].isspace():
                        continue
                    key, _, value = raw.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
                    continue
                for uri in fields.get("uris", "").split():
                    candidates.append((uri, fields.get("suites", "").split(), fields.get("components", "").split()))
    for uri, suites, components in candidates:
        if suite in suites and "main" in components and "security" not in uri:
            return uri.rstrip("/")
    raise ImageError(f"no Debian mirror for {suite} main in {apt_dir}/sources.list or sources.list.d "
                     "(debootstrap needs the mirror this machine's apt uses)")


# ---------------------------------------------------------------------- the stand-in base image


@dataclass(frozen=True)
class BaseImage:
    """The cached debootstrap base: `rootfs.tar` (for docker import) and `debs/` (for the offline build)."""

    dir: Path

    @property
    def tar(self) -> Path:
        return self.dir / "rootfs.tar"

    @property
    def debs(self) -> Path:
        return self.dir / "debs"

    @property
    def key(self) -> str:
        return self.dir.name.rsplit("-", 1)[-1]


def base_key(mirror: str) -> str:
    recipe = json.dumps([BASE_RECIPE, SUITE, BASE_PACKAGES, RUNTIME_DEBS, TRIXIE_DEBS, mirror, DPKG_EXCLUDES,
                         APT_CLEAN])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def ensure_base(cache_dir: Path = IMAGE_DIR, mirror: str | None = None, log: Log = _log) -> BaseImage:
    """The cached base for this recipe, made with debootstrap when missing (about a minute)."""
    mirror = mirror or debian_mirror()
    base = BaseImage(cache_dir / f"base-{SUITE}-{base_key(mirror)}")
    if (base.dir / "done").exists():
        log(f"base: cached {base.tar}")
        return base
    require_tools("debootstrap", "tar")
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = cache_dir / f"tmp-base-{new_run_id()}"
    rootfs = work / "rootfs"
    started = time.monotonic()
    log(f"base: debootstrap {SUITE} from {mirror} (once; cached in {base.dir})")
    try:
        work.mkdir()
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(rootfs),
              mirror], "debootstrap")
        debs = work / "debs"
        debs.mkdir()
        # Exactly what the base lacks for the runtime packages, resolved by the base's own apt.
        archives = rootfs / "var/cache/apt/archives"
        for old in archives.glob("*.deb"):
            old.unlink()
        _run(["chroot", str(rootfs), "apt-get", "install", "-y", "-q", "--download-only",
              "--no-install-recommends", *RUNTIME_DEBS], "apt-get --download-only in the base rootfs")
        for deb in archives.glob("*.deb"):
            shutil.move(str(deb), debs / deb.name)
        if not any(debs.glob("serf_*.deb")):
            raise ImageError(f"apt fetched no serf package into {debs}")
        try:
            fetch_trixie(list(TRIXIE_DEBS), debs)
        except DebError as exc:
            raise ImageError(str(exc)) from None
        _slim(rootfs)
        _run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(work / "rootfs.tar"), "."], "tar of the base")
        _remove_rootfs(rootfs)
        (work / "done").write_text(f"{SUITE} {mirror} {' '.join(BASE_PACKAGES)}\n")
        if base.dir.exists():
            shutil.rmtree(base.dir)
        work.rename(base.dir)
    finally:
        if work.exists():
            _remove_rootfs(rootfs)
            shutil.rmtree(work, ignore_errors=True)
    size = base.tar.stat().st_size / 2**20
    log(f"base: built in {time.monotonic() - started:.0f}s ({size:.0f} MiB uncompressed)")
    return base


def _slim(rootfs: Path) -> None:
    (rootfs / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/dpkg/dpkg.cfg.d/keelson-slim").write_text(DPKG_EXCLUDES)
    (rootfs / "etc/apt/apt.conf.d/keelson-clean").write_text(APT_CLEAN)
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*",
                    "usr/share/man/*", "usr/share/info/*", "usr/share/lintian/*", "var/log/*.log",
                    "var/log/apt/*", "var/cache/debconf/*-old", "var/lib/dpkg/*-old"):
        for path in rootfs.glob(pattern):
            _rm(path)
    for path in (rootfs / "usr/share/locale").glob("*"):
        if path.name != "locale.alias":
            _rm(path)
    for doc in (rootfs / "usr/share/doc").glob("*"):
        for path in doc.iterdir() if doc.is_dir() else []:
            if path.name != "copyright":
                _rm(path)
    # Docker writes these per container; debootstrap copied the host's.
    for name in ("etc/resolv.conf", "etc/hostname"):
        with contextlib.suppress(FileNotFoundError):
            (rootfs / name).unlink()


def _rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _remove_rootfs(rootfs: Path) -> None:
    """debootstrap mounts /proc and /sys in the rootfs while it works: never rm -r through a mount."""
    prefix = str(rootfs) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
              if line.split()[1].startswith(prefix)]
    for mount in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
    if rootfs.exists():
        shutil.rmtree(rootfs)


# ---------------------------------------------------------------------- the wheelhouse


def dependencies(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """The project's run-time dependencies and its build backend's requirements."""
    data = tomllib.loads(pyproject.read_text())
    return [*data["project"]["dependencies"], *data["build-system"]["requires"], "wheel"]


def fill_wheelhouse(base: BaseImage, python: str = sys.executable, wheelhouse: Path = WHEELHOUSE,
                    log: Log = _log) -> None:
    """deploy/wheelhouse/wheels: wheels of every dependency (pip wheel, here, where PyPI is reachable);
    deploy/wheelhouse/debs: the base's runtime .debs. Skipped when the stamp says it is current."""
    reqs = dependencies()
    version = _run([python, "-c", "import sys, sysconfig; print(sys.version_info[:2], sysconfig.get_platform())"],
                   "python version").stdout.strip()
    key = hashlib.sha256(json.dumps([reqs, version, base.key]).encode()).hexdigest()[:12]
    wheels, debs, stamp = wheelhouse / "wheels", wheelhouse / "debs", wheelhouse / "wheels" / ".stamp"
    if stamp.exists() and stamp.read_text().strip() == key and any(debs.glob("*.deb")):
        log(f"wheelhouse: current ({len(list(wheels.glob('*.whl')))} wheels)")
        return
    started = time.monotonic()
    for folder in (wheels, debs):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    log(f"wheelhouse: pip wheel {len(reqs)} requirements")
    _run([python, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), *reqs], "pip wheel (needs PyPI)")
    for deb in base.debs.glob("*.deb"):
        shutil.copy2(deb, debs / deb.name)
    stamp.write_text(key + "\n")
    log(f"wheelhouse: {len(list(wheels.glob('*.whl')))} wheels, {len(list(debs.glob('*.deb')))} debs in "
        f"{time.monotonic() - started:.0f}s")


# ---------------------------------------------------------------------- the image


def _context_files(root: Path = REPO_ROOT) -> Iterable[Path]:
    for entry in CONTEXT_PATHS:
        path = root / entry
        if path.is_file():
            yield path
        elif path.is_dir():
            for sub in sorted(path.rglob("*")):
                if sub.is_file() and "__pycache__" not in sub.parts and sub.suffix != ".pyc":
                    yield sub


def image_key(base: BaseImage, tag: str, root: Path = REPO_ROOT) -> str:
    """A hash of every build input: Dockerfile, .dockerignore, the build context, the base, the tag."""
    digest = hashlib.sha256(f"{base.key}\0{tag}\0".encode())
    for path in (root / "Dockerfile", root / ".dockerignore", *_context_files(root)):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class BuiltImage:
    """A saved image: `tag` (e.g. keelson/agent:latest) and `build_tag` (the same image tagged with its build
    key, e.g. keelson/agent:7f4a4b924616, so that a stack deployed with it changes whenever the build does)."""

    tag: str
    build_tag: str
    tar: Path
    seconds: float
    cached: bool


def build_tag_for(tag: str, key: str) -> str:
    repo = tag.rsplit(":", 1)[0] if ":" in tag.rsplit("/", 1)[-1] else tag
    return f"{repo}:{key}"


def build_image(tag: str = DEFAULT_TAG, cache_dir: Path = IMAGE_DIR, rebuild: bool = False,
                log: Log = _log) -> BuiltImage:
    """The image as a `docker save` tarball, built on a private engine unless an identical build is cached."""
    started = time.monotonic()
    require_tools("dockerd", "nsenter", "tar")
    base = ensure_base(cache_dir, log=log)
    fill_wheelhouse(base, log=log)
    key = image_key(base, tag)
    build_tag = build_tag_for(tag, key)
    tar = cache_dir / f"agent-{key}.tar"
    if tar.exists() and not rebuild:
        log(f"image: cached {tar} ({tag}, {build_tag})")
        _write_current(cache_dir, tag, build_tag, tar)
        return BuiltImage(tag, build_tag, tar, time.monotonic() - started, cached=True)
    run_id = new_run_id()
    engine = PrivateDockerd(root=Path(f"/tmp/kls-img-{run_id}"), netns=f"kls-img-{run_id}",
                            hostname=f"kls-img-{run_id}")
    try:
        engine.start()
        log(f"image: private dockerd {engine.host} (netns {engine.netns}: RUN steps have no network)")
        with base.tar.open("rb") as stream:
            _run([DOCKER_CLI, "-H", engine.host, "import", "-", BASE_TAG], "docker import of the base",
                 stdin=stream)
        t = time.monotonic()
        build_log = cache_dir / "build.log"
        try:
            res = _run([DOCKER_CLI, "-H", engine.host, "build", "--build-arg", f"BASE={BASE_TAG}", "--build-arg",
                        "OFFLINE=1", "-t", tag, "-t", build_tag, "-f", str(REPO_ROOT / "Dockerfile"), str(REPO_ROOT)],
                       "docker build", env={**os.environ, "DOCKER_BUILDKIT": "0"})
            build_log.write_text(res.stdout + res.stderr)
        except ImageError as exc:
            build_log.write_text(exc.output or str(exc))
            raise ImageError(f"{exc}\n(whole log: {build_log})") from None
        size = _run([DOCKER_CLI, "-H", engine.host, "image", "inspect", "--format", "{{.Size}}", tag],
                    "docker image inspect").stdout.strip()
        log(f"image: {tag} built in {time.monotonic() - t:.0f}s, {int(size) / 2**20:.0f} MiB")
        partial = tar.with_suffix(".partial")
        _run([DOCKER_CLI, "-H", engine.host, "save", "-o", str(partial), tag, build_tag], "docker save")
        partial.rename(tar)
    finally:
        engine.stop()
    for old in cache_dir.glob("agent-*.tar"):
        if old != tar:
            old.unlink()
    _write_current(cache_dir, tag, build_tag, tar)
    seconds = time.monotonic() - started
    log(f"image: saved to {tar} ({tar.stat().st_size / 2**20:.0f} MiB) in {seconds:.0f}s in all")
    return BuiltImage(tag, build_tag, tar, seconds, cached=False)


def _write_current(cache_dir: Path, tag: str, build_tag: str, tar: Path) -> None:
    data = {"tag": tag, "build_tag": build_tag, "tar": str(tar)}
    (cache_dir / "agent.json").write_text(json.dumps(data) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.image", description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default=DEFAULT_TAG)
    parser.add_argument("--rebuild", action="store_true", help="build even when an identical build is cached")
    parser.add_argument("--base-only", action="store_true", help="only make (or check) the cached base tarball")
    args = parser.parse_args(argv)
    try:
        if args.base_only:
            print(ensure_base().tar)
            return 0
        built = build_image(args.tag, rebuild=args.rebuild)
    except ImageError as exc:
        print(f"tools.image: {exc}", file=sys.stderr)
        return 1
    print(f"{built.tag} {built.build_tag} {built.tar}")
    print(f"load it with: docker load -i {built.tar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
