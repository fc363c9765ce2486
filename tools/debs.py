"""Docker Compose v2 (and, for the image, the Docker CLI) from Debian trixie, fetched and checked by apt itself.

Why: bookworm, our platform, packages only Compose v1 (1.29.2, Python); Debian's next release, trixie,
packages Compose v2 (`docker-compose` 2.26.x, a static Go binary needing only libc6 >= 2.34, which bookworm
has). Debian builds it from github.com/docker/compose and signs the archive, so it is the official source that
installs here. apt runs with a private sources list and state under STATE_DIR: the machine's own apt sources
and preferences stay untouched, and apt checks the trixie InRelease signature against Debian's keyring and
each .deb against the signed Packages index, as for any package.

  python -m tools.debs install docker-compose    fetch and install on this machine (./dev.sh does it)
  python -m tools.debs fetch DEST PKG...         fetch into DEST (the offline image build's wheelhouse)

The host keeps bookworm's docker.io (its CLI runs `docker stack`); trixie's docker-cli is for the image only,
where no docker.io is installed (it Breaks docker.io << 26).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

STATE_DIR = Path("/var/cache/keelson/apt-trixie")
SUITE = "trixie"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


class DebError(Exception):
    pass


def _mirror() -> str:
    from tools.image import ImageError, debian_mirror

    try:
        return debian_mirror()
    except ImageError:
        return DEFAULT_MIRROR


def apt_options(state: Path = STATE_DIR) -> list[str]:
    """apt-get options that use only our sources list and state (never the machine's)."""
    return ["-o", f"Dir::Etc::SourceList={state / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/nonexistent",
            "-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache::Archives={state / 'archives'}",
            "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=", "-o", "APT::Sandbox::User=root"]


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    res = subprocess.run(cmd, cwd=cwd, text=True, capture_output=True, check=False)
    if res.returncode != 0:
        raise DebError(f"{what} failed ({res.returncode}): {(res.stderr or res.stdout).strip()[-1500:]}")
    return res.stdout


def update(state: Path = STATE_DIR) -> None:
    """Refresh our trixie index (apt verifies InRelease against Debian's keyring or fails)."""
    for sub in ("lists/partial", "archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "sources.list").write_text(f"deb [signed-by={KEYRING}] {_mirror()} {SUITE} main\n")
    _run(["apt-get", *apt_options(state), "-q", "update"], f"apt-get update ({SUITE})")


def fetch(packages: list[str], dest: Path, state: Path = STATE_DIR) -> list[Path]:
    """Download `packages` (trixie's current versions) into dest; returns the files, provenance printed."""
    update(state)
    dest.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", *apt_options(state), "-q", "download", *packages], "apt-get download", cwd=dest)
    files: list[Path] = []
    for name in packages:
        found = sorted(dest.glob(f"{name}_*.deb"))
        if not found:
            raise DebError(f"apt-get download left no {name}_*.deb in {dest}")
        deb = found[-1]
        digest = hashlib.sha256(deb.read_bytes()).hexdigest()
        print(f"[debs] {deb.name} from Debian {SUITE} (signed index checked by apt), sha256 {digest}",
              file=sys.stderr)
        files.append(deb)
    return files


def compose_version(binary: str = "docker-compose") -> str:
    """The version `docker-compose version --short` reports, or "" when there is none that runs."""
    try:
        res = subprocess.run([binary, "version", "--short"], text=True, capture_output=True, check=False,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout.strip().removeprefix("v") if res.returncode == 0 else ""


def install(packages: list[str], state: Path = STATE_DIR) -> None:
    debs = fetch(packages, state / "debs", state)
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *[str(d) for d in debs]],
         "apt-get install")
    if "docker-compose" in packages:
        version = compose_version()
        if not version.startswith("2."):
            raise DebError(f"docker-compose reports {version or 'nothing'} after the install, not a v2 release")
        print(f"[debs] Docker Compose {version} installed", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.debs", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_install = sub.add_parser("install")
    p_install.add_argument("packages", nargs="+")
    p_fetch = sub.add_parser("fetch")
    p_fetch.add_argument("dest", type=Path)
    p_fetch.add_argument("packages", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "install":
            install(args.packages)
        else:
            fetch(args.packages, args.dest)
    except DebError as exc:
        print(f"[debs] {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
