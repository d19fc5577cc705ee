"""``make run``'s local admin key: ``LOOM_DEV_API_KEY`` when set, else one kept in ``.loom/dev-api-key``.

The file is created once with mode 0600 and reused on later runs, so a key
exported in a shell keeps working across restarts; loomctl reads the same file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.common.auth import generate_api_key

ENV = "LOOM_DEV_API_KEY"
FILE = Path(".loom") / "dev-api-key"


@dataclass(frozen=True)
class DevKey:
    key: str
    #: Where it came from: the environment variable, or the file's path.
    origin: str
    path: Path | None = None

    def shell(self) -> str:
        """Shell words that expand to the key, for the banner (which never prints the key itself)."""
        return f"${ENV}" if self.path is None else f"$(cat {self.path})"


def dev_api_key(root: Path, env: Mapping[str, str] | None = None) -> DevKey:
    """The key, from ``env`` or ``root/.loom/dev-api-key`` (written with a new key when missing or empty)."""
    env = os.environ if env is None else env
    if env.get(ENV, "").strip():
        return DevKey(env[ENV].strip(), ENV)
    path = root / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    key = generate_api_key()
    try:  # O_EXCL: two launchers racing end up with one key
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)  # an admin key must not be readable by others, whoever wrote the file
        existing = path.read_text().strip()
        if existing:
            return DevKey(existing, str(path), path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    return DevKey(key, str(path), path)
